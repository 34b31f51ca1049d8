"""
bebop: the Bebop recipe for fast RL rollouts, in one file.

Paper: "Breaking Entropy Bounds: Accelerating RL Training via MTP with Rejection Sampling" (Li, Jiang et al.,
arXiv 2606.12370). A multi-token-prediction (MTP) layer drafts tokens, the policy verifies them all in one
forward, exact rejection sampling keeps every rollout on-policy, and the MTP layer is trained once before RL
with an end-to-end total-variation loss (Eq. 13) so that its acceptance stays high while GRPO changes the policy.

    python bebop.py                                     # SFT -> MTP training -> GRPO, then a summary
    python -m pytest -q                                 # the tests
    python bebop.py --experiment all                    # the paper's findings at toy scale
    python bebop.py --bench                             # speculative against plain decoding, measured
    torchrun --standalone --nproc_per_node=2 bebop.py   # data parallel (gloo on CPUs, NCCL on GPUs)

The recipe comes first, 1. config 2. model 3. losses 4. sampling 5. generation 6. toy task 7. RL algorithm,
and uses nothing defined after it. The harness follows: 8. CUDA graphs 9. choosing gamma 10. measures 11. runs
(data parallelism, checkpoints, training stages) 12. experiments 13. benchmark 14. main(). Notation follows the
paper: p the target (policy) law, q the draft (MTP) law, gamma the drafts per round, alpha the acceptance rate.
"""
import argparse
import functools
import inspect
import itertools
import json
import math
import numbers
import os
import re
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext, suppress
from copy import deepcopy
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------------------------
# 1. Config

@dataclass
class GPTConfig:
    vocab_size: int = 14        # the toy task's characters: digits, "SN=" and the end mark "."
    block_size: int = 48        # longest sequence, speculative decoding's lookahead included
    n_layer: int = 4            # backbone depth: a verify forward costs n_layer blocks, a draft step one
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4          # the MLP's hidden width is mlp_ratio * n_embd
    rope_base: float = 10000.0  # rotary positions: a row's position is just an index into a table
    mtp_train_steps: int = 5    # K recursive MTP steps trained before RL (paper: 5); drafting uses gamma <= K

@dataclass
class TrainConfig:
    """Everything a run is made of besides the model's shape. Each field is a flag (--sft-steps for sft_steps)
    whose help is the field's comment; a preset overrides some fields, and checkpoints record them all."""
    preset: str = "cpu"          # model and budget: tiny (a smoke test), cpu, gpu (the default on CUDA)
    seed: int = 1337             # seed of the initial weights, data order and rollouts
    task_seed: int = 1234        # seed of the toy task's house style and of the held-out prompts
    sft_steps: int = 1000        # supervised steps that teach the backbone the task
    sft_lr: float = 3e-3         # SFT learning rate
    batch_size: int = 64         # sequences per SFT and MTP step
    mtp_steps: int = 200         # pre-RL MTP steps: one epoch over mtp_steps x batch_size policy samples
    mtp_lr: float = 3e-3         # MTP learning rate
    mtp_loss: str = "e2e_tv"     # pre-RL MTP objective: ce, kl, rkl (reverse KL), tv (Eq. 10), e2e_tv (Eq. 13)
    mtp_ce_warmup: float = 0.5   # fraction of the MTP steps on CE first (TV's gradient, ~q, cannot find new tokens)
    rl_steps: int = 200          # GRPO steps
    rl_lr: float = 2.5e-5        # GRPO learning rate: small steps, as in the paper, keep the frozen head accepted
    rl_prompts: int = 8          # prompts per GRPO step
    group_size: int = 16         # samples per prompt; advantages are normalised within the group
    clip_eps: float = 0.2        # ratio clip of the GRPO surrogate (Eq. 3)
    kl_coef: float = 0.0         # weight of the k3 estimate of KL(policy || SFT policy) in the GRPO loss
    entropy_coef: float = 0.0    # GRPO entropy bonus: > 0 raises the policy's entropy, < 0 lowers it
    temperature: float = 1.0     # rollout sampling temperature; the trainer's log-probs use the same
    gamma: object = "auto"       # drafted tokens per rollout round: 0 (plain decoding), 1..5, or auto (per call)
    draft: str = "sample"        # sample: rejection sampling (RS); greedy: target-only verification (TO)
    mtp_online: str = "none"     # none: the MTP layer stays frozen during RL (the recipe); else its online loss
    mtp_online_lr: float = 3e-4  # learning rate of the online MTP updates (paper 5.3: its own)
    grad_clip: float = 1.0       # gradient-norm clip of every stage
    eval_prompts: int = 512      # held-out prompts (fixed by task_seed)
    ckpt_every: int = 50         # steps between checkpoints
    precision: str = "fp32"      # bf16: autocast in training and bf16 rollout weights; fp32
    cuda_graphs: bool = True     # replay decoding steps as CUDA graphs on CUDA (--no-cuda-graphs: eager)


# Named presets. Both real ones are deep and narrow like the paper's models (dozens of layers, one MTP layer):
# a draft step costs one block and a verify n_layer blocks, which is what makes drafting cheap.
PRESETS = {
    "tiny": dict(model=dict(n_layer=2, n_head=2, n_embd=32), sft_steps=300, mtp_steps=50, rl_steps=20,
                 batch_size=32, rl_prompts=8, group_size=8, rl_lr=3e-4, eval_prompts=128),
    "cpu": dict(model=dict(n_layer=6, n_head=4, n_embd=96)),
    "gpu": dict(model=dict(n_layer=24, n_head=8, n_embd=512), sft_steps=3000, mtp_steps=1000, rl_steps=200,
                batch_size=128, rl_prompts=32, sft_lr=1e-3, mtp_lr=1e-3, rl_lr=1e-5, precision="bf16"),
}

def build_config(tc: TrainConfig, task: "DigitSumTask") -> GPTConfig:
    """The model config of a preset, sized so that prompt + answer + the speculative lookahead fit."""
    cfg = GPTConfig(**PRESETS[tc.preset]["model"])
    cfg.block_size = max(cfg.block_size, task.seq_len + cfg.mtp_train_steps)
    return cfg

# ---------------------------------------------------------------------------------------------------------------
# 2. Model

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):   # in float32 whatever the weights' dtype (bf16 rollouts); a no-op in fp32 runs
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)

def apply_rope(x, cos, sin):
    """Rotate channel pairs by each token's own angle: x (..., B, nh, T, hs), cos and sin (B, 1, T, hs/2). Only
    position differences matter, so rows at different positions need no extra care."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)

class KVCache:
    """Preallocated keys and values of one attention layer, (B, n_head, S, head_dim), written in place. Each write
    names the absolute position of every new token (pos, (B, T)), so rows sit at their own positions; rolling back
    rejected drafts is moving a row's position back (stale entries are masked, then overwritten)."""

    def __init__(self, B: int, n_head: int, S: int, head_dim: int, device, dtype):
        self.k = torch.zeros(B, n_head, S, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.rows = torch.arange(B, device=device)[:, None]

    def writer(self, pos):
        def write(k, v):   # k, v (B, nh, T, hs) -> the whole cache, which the mask restricts
            self.k[self.rows, :, pos] = k.transpose(1, 2).to(self.k.dtype)
            self.v[self.rows, :, pos] = v.transpose(1, 2).to(self.v.dtype)
            return self.k, self.v
        return write

def cache_mask(pos, S: int):
    """A query at position i sees cache entries 0..i: (B, T) -> (B, 1, T, S) bool. This is the bottom-right
    aligned causal mask of a verify step (T queries against a longer cache); it also hides whatever a row left
    beyond its position (rolled-back drafts, padding)."""
    return (torch.arange(S, device=pos.device) <= pos[..., None]).unsqueeze(1)

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, rope, mask=None, kv=None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        (q, k), v = apply_rope(qkv[:2], *rope), qkv[2]
        if kv is not None:   # store the new keys and values, attend to every key of the cache
            k, v = kv(k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))

class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = RMSNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = RMSNorm(cfg.n_embd), MLP(cfg)

    def forward(self, x, rope, mask=None, kv=None):
        x = x + self.attn(self.ln_1(x), rope, mask, kv)
        return x + self.mlp(self.ln_2(x))

class MTPLayer(nn.Module):
    """One MTP module, DeepSeek-V3 / Qwen3.5 style, applied recursively: step k reads the previous hidden
    g^{k-1} (g^0 = the backbone's last hidden h) and the embedding of the token after it, and returns g^k,
    whose logits (own final norm, the backbone's shared head) predict one token further. Its own attention
    needs its own KV cache."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm_h, self.norm_e = RMSNorm(cfg.n_embd), RMSNorm(cfg.n_embd)
        self.proj = nn.Linear(2 * cfg.n_embd, cfg.n_embd, bias=False)
        self.block, self.norm_f = Block(cfg), RMSNorm(cfg.n_embd)

    def forward(self, g, emb, rope, mask=None, kv=None):
        return self.block(self.proj(torch.cat([self.norm_h(g), self.norm_e(emb)], dim=-1)), rope, mask, kv)

def mtp_chain_mask(T: int, depth: int, device=None):
    """The teacher-forced MTP pass's attention mask at `depth` ("training-time test"), (T, depth * T). Keys are stacked
    by depth; the query of anchor t sees the depth-1 entries of anchors <= t and its own chain's entries at depths
    2..depth: exactly the MTP cache a draft step sees, so training and drafting agree (a test checks it)."""
    t = torch.arange(T, device=device)
    own = torch.eye(T, dtype=torch.bool, device=device)
    return torch.cat([t[None, :] <= t[:, None]] + [own] * (depth - 1), dim=1)

class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.mtp = MTPLayer(cfg)   # the draft model: shares wte and lm_head with the backbone
        hs = cfg.n_embd // cfg.n_head
        angles = torch.outer(torch.arange(cfg.block_size + cfg.mtp_train_steps, dtype=torch.float32),
                             cfg.rope_base ** (-torch.arange(0, hs, 2, dtype=torch.float32) / hs))
        self.register_buffer("rope_cos", angles.cos(), persistent=False)   # (positions, hs/2)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        for p in self.parameters():   # GPT-2 init; then the residual projections scaled down with depth
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") and name != "mtp.proj.weight":
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def rope(self, pos):   # (B, T) absolute positions -> cos, sin (B, 1, T, hs/2)
        return self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)

    def hidden(self, idx, pos=None, mask=None, kvs=None):
        """Backbone hidden states before the final norm, (B, T, C): h_s is what predicts x_{s+1}. Without
        caches: causal attention from position 0. With caches: the tokens sit at positions `pos` (B, T)."""
        pos = torch.arange(idx.size(1), device=idx.device).expand_as(idx) if pos is None else pos
        x, rope = self.wte(idx), self.rope(pos)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, None if kvs is None else kvs[i])
        return x

    def head(self, h):
        return self.lm_head(self.ln_f(h))

    def mtp_head(self, g):
        # The MTP loss reaches only the MTP weights (the paper trains the MTP layer with the backbone,
        # embedding and head frozen): the shared head is used detached.
        return F.linear(self.mtp.norm_f(g), self.lm_head.weight.detach())

    def forward(self, idx):
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence length {idx.size(1)} exceeds block_size {self.config.block_size}")
        return self.head(self.hidden(idx))   # (B, T, vocab_size)

    @torch.no_grad()
    def backbone_outputs(self, idx):
        """(hidden states (B, T, C), logits (B, T, V)) of the frozen backbone, which the MTP layer reads and is
        measured against; computed once they serve any number of MTP heads on the same sequences."""
        h = self.hidden(idx)
        return h, self.head(h)

    def mtp_features(self, idx, n_steps: int, backbone=None):
        """Teacher-forced MTP chains for every anchor t and depth k = 1..n_steps: (target logits (B, T, V) of the frozen
        backbone, the MTP layer's normed hidden states (B, n_steps, T, C), which times the shared head give the draft
        logits). Depth k at anchor t reads (g^{k-1}_t, emb(x_{t+k})) at position t+k-1, as its query does when
        drafting, and attends as mtp_chain_mask says; gradients flow through the chain (the e2e TV loss needs them).
        Anchors with t + k > T - 1 have no input token: garbage, which the losses mask. backbone: backbone_outputs."""
        h, target_logits = self.backbone_outputs(idx) if backbone is None else backbone
        B, T = idx.shape
        keys, values, out, g = [], [], [], h

        def stack(k, v):   # this depth's keys and values join the shallower depths'
            keys.append(k)
            values.append(v)
            return torch.cat(keys, dim=2), torch.cat(values, dim=2)
        for k in range(1, n_steps + 1):
            emb = self.wte(F.pad(idx[:, k:], (0, k))).detach()   # x_{t+k}; the shared embedding gets no MTP gradient
            pos = (torch.arange(T, device=idx.device) + k - 1).expand(B, T)
            g = self.mtp(g, emb, self.rope(pos), mtp_chain_mask(T, k, idx.device), stack)
            out.append(g)
        return target_logits, self.mtp.norm_f(torch.stack(out, dim=1))

    def mtp_logits(self, idx, n_steps: int, backbone=None):
        """(target logits (B, T, V), draft logits (B, n_steps, T, V)): row [b, k-1, t] is q_k at anchor t, and its
        target is the backbone's row at position t+k."""
        target_logits, x = self.mtp_features(idx, n_steps, backbone)
        return target_logits, F.linear(x, self.lm_head.weight.detach())

class Caches:
    """The KV caches of one generation call: one per backbone layer, one for the MTP layer."""

    def __init__(self, model: GPT, B: int, S: int):
        cfg, w = model.config, model.lm_head.weight
        self.S = S
        self.backbone = [KVCache(B, cfg.n_head, S, cfg.n_embd // cfg.n_head, w.device, w.dtype)
                         for _ in range(cfg.n_layer + 1)]
        self.mtp = self.backbone.pop()

    def tensors(self):
        return [t for c in self.backbone + [self.mtp] for t in (c.k, c.v)]

def backbone_step(model: GPT, caches: Caches, tokens, pos):
    """Cached backbone forward of tokens (B, T) at positions pos (B, T): (logits (B, T, V), hidden (B, T, C))."""
    h = model.hidden(tokens, pos, cache_mask(pos, caches.S), [c.writer(pos) for c in caches.backbone])
    return model.head(h), h

def mtp_step(model: GPT, caches: Caches, g, tokens, pos):
    """Cached MTP forward of the inputs (g (B, T, C), tokens (B, T)) at positions pos (B, T): g^k (B, T, C)."""
    return model.mtp(g, model.wte(tokens), model.rope(pos), cache_mask(pos, caches.S), caches.mtp.writer(pos))

# ---------------------------------------------------------------------------------------------------------------
# 3. Losses for the MTP layer. The target p, the backbone's own law, is always detached.

def pack_bits(mask):
    """(R, V) bool -> (R, ceil(V/8)) uint8, eight vocabulary entries a byte."""
    m = F.pad(mask.to(torch.uint8), (0, -mask.size(-1) % 8)).view(mask.size(0), -1, 8)
    return (m << torch.arange(8, dtype=torch.uint8, device=m.device)).sum(-1, dtype=torch.uint8)

def unpack_bits(bits, V: int):
    """Inverse of pack_bits: (R, ceil(V/8)) uint8 -> (R, V) bool."""
    return ((bits[..., None] >> torch.arange(8, dtype=torch.uint8, device=bits.device)) & 1).flatten(-2)[:, :V].bool()

def logits_of(x, weight, dtype):
    """Logits of some rows in `dtype` (float32 or wider), autocast off so that forward and backward agree."""
    with torch.autocast(x.device.type, enabled=False):
        return x.to(dtype) if weight is None else x.to(dtype) @ weight.to(dtype).T

class TVDistance(torch.autograd.Function):
    """Per-row d_TV(p, q) = 1 - sum_v min(p_v, q_v) with q = softmax(z), memory-lean (App. F).

    z is the draft logits, or, given the head's weight W (V, C), z = x W^T for hidden states x (R, C): then the
    full (R, V) logits never exist, only `chunk` rows at a time (the shared head's matmul fused with the loss).
    Between forward and backward it keeps, per row, the log-sum-exp, S = sum_v q_v 1[q_v <= p_v] and a packed
    1-bit mask of q > p (V/8 bytes): no softmax and no target probabilities. The backward recomputes q a chunk
    at a time and applies Eq. 11, dL/dz = q (S - 1 + 1[q > p]), which is bounded by q (Prop. 3)."""

    @staticmethod
    def forward(ctx, x, weight, p, chunk: int):
        dtype = torch.promote_types(x.dtype, torch.float32)
        tv, lse, S = (torch.empty(x.size(0), device=x.device, dtype=dtype) for _ in range(3))
        bits = torch.empty(x.size(0), (p.size(-1) + 7) // 8, dtype=torch.uint8, device=x.device)
        for i in range(0, x.size(0), chunk):
            rows = slice(i, i + chunk)
            z, pc = logits_of(x[rows], weight, dtype), p[rows].to(dtype)
            lse[rows] = torch.logsumexp(z, dim=-1)
            q = torch.exp(z - lse[rows, None])
            tv[rows] = 1 - torch.minimum(pc, q).sum(-1)   # Eq. 10
            above = q > pc
            S[rows], bits[rows] = (q * ~above).sum(-1), pack_bits(above)
        ctx.save_for_backward(x, weight, lse, S, bits)
        ctx.chunk, ctx.V = chunk, p.size(-1)
        return tv

    @staticmethod
    def backward(ctx, grad_tv):
        x, weight, lse, S, bits = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight) if weight is not None and ctx.needs_input_grad[1] else None
        for i in range(0, x.size(0), ctx.chunk):
            rows = slice(i, i + ctx.chunk)
            q = torch.exp(logits_of(x[rows], weight, lse.dtype) - lse[rows, None])
            g = grad_tv[rows, None] * q * (S[rows, None] - 1 + unpack_bits(bits[rows], ctx.V).to(q.dtype))  # Eq. 11
            grad_x[rows] = (g if weight is None else g @ weight.to(g.dtype)).to(x.dtype)
            if grad_w is not None:
                grad_w += (g.T @ x[rows].to(g.dtype)).to(weight.dtype)
        return grad_x, grad_w, None, None

def tv_distance(draft, target_probs, head_weight=None, chunk: int = None):
    """d_TV(p, softmax(z)) over the last axis, (..., V) -> (...); p gets no gradient. draft is the logits z, or
    hidden states x (..., C) with head_weight W (V, C) and z = x W^T, fused chunk by chunk. chunk: rows
    materialised at a time (default: about 2^20 logits)."""
    V = target_probs.size(-1)
    tv = TVDistance.apply(draft.reshape(-1, draft.size(-1)), head_weight, target_probs.detach().reshape(-1, V),
                          chunk or max(1, 2**20 // V))
    return tv.view(draft.shape[:-1])

def e2e_tv_loss(draft, target_probs, mask=None, head_weight=None):
    """End-to-end TV loss, Eq. 13: 1 - (1/gamma) sum_j prod_{i<=j} (1 - d_TV(p_i, q_i)), averaged over chains. draft
    (logits, or hidden states with head_weight, as in tv_distance) and target_probs (N, gamma, V): a chain of gamma
    steps per row; mask (N, gamma) marks the steps that exist, a prefix per row. A chain cut short (k < gamma steps)
    is normalised by its own k: still one minus a normalised expected acceptance length. No stop-gradient inside the
    products: earlier steps weigh more by themselves, because they sit in every later product."""
    alpha = 1 - tv_distance(draft, target_probs, head_weight)        # per-step acceptance, Eq. 2
    mask = torch.ones_like(alpha, dtype=torch.bool) if mask is None else mask
    expected_len = (torch.cumprod(torch.where(mask, alpha, 1.0), dim=1) * mask).sum(1)   # Eq. 12
    steps = mask.sum(1)
    return (1 - expected_len[steps > 0] / steps[steps > 0]).mean()


MTP_LOSSES = ("ce", "kl", "rkl", "tv", "e2e_tv")

def mtp_loss(kind: str, draft, target_logits, labels, mask, head_weight=None):
    """One of the paper's MTP objectives on chains laid out (N, K, ...), targets detached: ce (cross-entropy on the
    sequences' tokens), kl (forward KL(p || q)), rkl (reverse KL(q || p)), tv (per-step TV, Eq. 10), e2e_tv
    (Eq. 13). mask (N, K) is a prefix per chain. draft is the draft logits (N, K, V), or hidden states (N, K, C)
    with the head's weight (V, C): the TV losses then never hold the full logits (App. F)."""
    if kind not in MTP_LOSSES:
        raise ValueError(f"unknown MTP loss {kind!r}; choose one of {MTP_LOSSES}")
    target_logp = F.log_softmax(target_logits.detach().float(), dim=-1)
    if kind == "e2e_tv":
        return e2e_tv_loss(draft, target_logp.exp(), mask, head_weight)
    if kind == "tv":
        per = tv_distance(draft, target_logp.exp(), head_weight)
    else:
        logits = (draft if head_weight is None else F.linear(draft, head_weight)).float()
        if kind == "ce":
            per = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)
        else:
            logq = F.log_softmax(logits, dim=-1)
            p_, q_ = (target_logp, logq) if kind == "kl" else (logq, target_logp)   # KL(p || q) or KL(q || p)
            per = (p_.exp() * (p_ - q_)).sum(-1)
    return (per * mask).sum() / mask.sum().clamp(min=1)

# ---------------------------------------------------------------------------------------------------------------
# 4. Sampling. Nothing here waits on the host, so a decoding step can be captured as a CUDA graph.

def one_hot(tokens, V: int):
    """(...) ids -> (..., V) float32 one-hots. Not F.one_hot: off CUDA it checks the ids on the host (a sync)."""
    return torch.zeros(*tokens.shape, V, device=tokens.device).scatter_(-1, tokens[..., None], 1.0)

def sampling_law(logits, temperature: float):
    """The law tokens are drawn from at a temperature, (log-probs, probabilities) (..., V) in float32. Temperature
    0 is greedy: a one-hot at the argmax (the log-probs are then those at temperature 1)."""
    logp = F.log_softmax(logits.float() / (temperature or 1.0), dim=-1)
    return logp, logp.exp() if temperature > 0 else one_hot(logits.argmax(-1), logits.size(-1))

def sample(probs, generator=None):
    """One draw per row from unnormalised probs (..., V): the argmax of probs / Exp(1) noise. The smallest of the
    independent Exp(1) / probs_v lands on v with chance probs_v / sum(probs), so there is no normalisation, no
    cumsum and no host sync; zeros never win."""
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(-1)

def sample_token(logits, temperature: float, generator=None):
    """One token per row (..., V) -> (...), and its log-prob under the sampling law."""
    logp, p = sampling_law(logits, temperature)
    x = sample(p, generator)
    return x, logp.gather(-1, x[..., None]).squeeze(-1)

def rejection_sample(target_probs, draft_probs, draft_tokens, generator=None):
    """Exact speculative sampling for a batch: every emitted token is distributed as the target p. target_probs
    (B, gamma+1, V): p at each draft position and the row after the last draft; draft_probs (B, gamma, V): the q each
    draft was drawn from (a one-hot at argmax q gives the target-only rule, TO, Eq. 1); draft_tokens (B, gamma).
    Probabilities, not logits. A draft is accepted with chance min(1, p/q), on average 1 - d_TV(p, q) (Eq. 2).
    Returns n_accepted (B,) in 0..gamma and tokens (B, gamma+1): the n accepted drafts, then the correction drawn
    from the residual max(0, p - q) renormalised, or the bonus from row gamma if all were accepted; then leftovers."""
    if draft_tokens.dim() != 2 or draft_tokens.is_floating_point() or draft_tokens.dtype == torch.bool:
        raise ValueError(f"draft_tokens must be (B, gamma) integer ids, got {tuple(draft_tokens.shape)} "
                         f"{draft_tokens.dtype}")
    B, gamma = draft_tokens.shape
    V = target_probs.size(-1)
    if target_probs.shape != (B, gamma + 1, V) or draft_probs.shape != (B, gamma, V) or not (
            target_probs.is_floating_point() and draft_probs.is_floating_point()):
        raise ValueError(f"expected float target_probs (B, gamma+1, V) = ({B}, {gamma + 1}, V) and draft_probs "
                         f"(B, gamma, V) = ({B}, {gamma}, V) with one V, got {tuple(target_probs.shape)} "
                         f"{target_probs.dtype} and {tuple(draft_probs.shape)} {draft_probs.dtype}")
    p, q = target_probs.float(), draft_probs.float()
    p_d = p[:, :gamma].gather(-1, draft_tokens[..., None]).squeeze(-1)   # (B, gamma)
    q_d = q.gather(-1, draft_tokens[..., None]).squeeze(-1)
    accepted = torch.rand(B, gamma, device=p.device, generator=generator) * q_d < p_d   # with chance min(1, p/q)
    n = accepted.long().cumprod(dim=1).sum(dim=1)                      # drafts accepted before the first reject
    # Correction or bonus: the residual of row n, where the "draft" of row gamma is nothing (q = 0).
    rows = torch.arange(B, device=p.device)
    p_n, q_n = p[rows, n], F.pad(q, (0, 0, 0, 1))[rows, n]
    residual = (p_n - q_n).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)   # p == q: never rejected
    tokens = F.pad(draft_tokens, (0, 1))                                 # gamma = 0 works too: a plain sample
    return n, tokens.scatter_(1, n[:, None], sample(residual, generator)[:, None])

# ---------------------------------------------------------------------------------------------------------------
# 5. Generation. Plain and speculative decoding share one shape: a prefill, then a step that updates a fixed set
# of tensors in place (no host sync, no data-dependent branch), repeated until every row is done. That shape is
# all section 8 needs to replay a step as a CUDA graph unchanged.

@dataclass
class Generation:
    tokens: object            # (B, P + max_new_tokens), or a list of 1-D rows for ragged prompts
    new_tokens: torch.Tensor  # (B, max_new_tokens); after an EOS the row is padded with the EOS id
    logprobs: torch.Tensor    # (B, max_new_tokens) target log p of each token at the sampling temperature; 0 after EOS
    mask: torch.Tensor        # (B, max_new_tokens) True for the tokens up to and including EOS
    rounds: torch.Tensor      # (B,) target forwards each row took after the prefill's
    stats: dict               # acceptance statistics over the tokens rows keep (acceptance_stats)

@dataclass
class DecodeState:
    """Every tensor a decoding step reads and updates in place (a CUDA graph replays the step over them)."""
    x: torch.Tensor           # (B,) the newest token, not yet read by the backbone: x_L
    L: torch.Tensor           # (B,) its position
    tokens: torch.Tensor      # (B, width) emitted tokens
    logprobs: torch.Tensor    # (B, width) their target log p
    count: torch.Tensor       # (B,) tokens emitted so far
    rounds: torch.Tensor      # (B,) rounds (target forwards) while the row was running
    done: torch.Tensor        # (B,) finished rows
    histogram: torch.Tensor   # (gamma+1,) row-rounds that kept i+1 tokens
    reached: torch.Tensor     # (gamma,) row-rounds whose draft j was verified where its token is kept
    accepted: torch.Tensor    # (gamma,) ... and accepted
    g1: torch.Tensor = None   # (B, C) the MTP layer's output at anchor L-1, where the next draft starts

    def tensors(self) -> list:
        return [t for t in vars(self).values() if t is not None]

def is_int(x) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)

def prepare(model: GPT, prompt, max_new_tokens, temperature, eos, generator, graphs, lookahead: int):
    """Check the generators' arguments (one clear error each) and right-pad the prompts into one batch:
    (idx (B, P), lengths (B,), ragged). Right-padding is safe: a query sees only cache entries at positions up to
    its own, and a row's padding lies where its own first new tokens overwrite it."""
    cfg, device = model.config, model.lm_head.weight.device
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if eos is not None and not (is_int(eos) and 0 <= eos < cfg.vocab_size):
        raise ValueError(f"eos must be None or an integer token id in [0, {cfg.vocab_size}), got {eos!r}")
    if generator is not None and not (isinstance(generator, torch.Generator) and generator.device.type == device.type):
        raise ValueError(f"generator must be None or a torch.Generator on the model's {device.type}, got {generator!r}")
    if graphs is not None and getattr(graphs, "model", None) is not model:
        raise ValueError("graphs must be None or a CudaGraphs made for this model")
    ragged = not (isinstance(prompt, torch.Tensor) and prompt.dim() == 2)
    if ragged:
        if not isinstance(prompt, (list, tuple)) or not prompt or any(torch.as_tensor(r).dim() != 1 for r in prompt):
            raise ValueError("prompt must be a (B, T) tensor of token ids or a non-empty list of 1-D sequences of them")
        rows = [torch.as_tensor(r) for r in prompt]
        lengths, idx = torch.tensor([len(r) for r in rows]), nn.utils.rnn.pad_sequence(rows, batch_first=True)
    else:
        lengths, idx = torch.full((prompt.size(0),), prompt.size(1)), prompt
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"prompt token ids must be integers, got {idx.dtype}")
    if idx.numel() == 0 or lengths.min() == 0:
        raise ValueError("empty prompt: every prompt needs at least one token")
    if idx.min() < 0 or idx.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got [{int(idx.min())}, {int(idx.max())}]")
    if idx.size(1) + max_new_tokens + lookahead > cfg.block_size:
        raise ValueError(f"prompt ({idx.size(1)}) + max_new_tokens ({max_new_tokens}) + lookahead ({lookahead}) "
                         f"exceeds block_size {cfg.block_size}")
    return idx.long().to(device), lengths.to(device), ragged

def prefill(model: GPT, caches: Caches, idx, lengths, max_new_tokens: int, gamma: int, temperature: float, eos,
            mtp: bool, generator=None) -> DecodeState:
    """The backbone reads the right-padded prompts (B, P) and samples x_L after each row's last prompt token; with
    mtp, the MTP layer then reads the depth-1 inputs (h_s, emb(x_{s+1})) of every prompt anchor, which gives the
    first g^1. Returns the state, with room for rounds of up to gamma drafts."""
    B, P = idx.shape
    rows, pos = torch.arange(B, device=idx.device), torch.arange(P, device=idx.device).expand(B, P)
    logits, h = backbone_step(model, caches, idx, pos)
    x, logp = sample_token(logits[rows, lengths - 1], temperature, generator)
    width = max_new_tokens + gamma + 1                # a round may write gamma + 1 tokens past the last one kept
    zeros = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype, device=idx.device)
    s = DecodeState(x=x, L=lengths.clone(), tokens=zeros(B, width), logprobs=zeros(B, width, dtype=torch.float),
                    count=torch.ones_like(lengths), rounds=zeros(B), done=(zeros(B) + max_new_tokens) < 2,
                    histogram=zeros(gamma + 1), reached=zeros(gamma), accepted=zeros(gamma))
    s.tokens[:, 0], s.logprobs[:, 0] = x, logp
    if eos is not None:
        s.done |= x == eos
    if mtp:
        nxt = F.pad(idx[:, 1:], (0, 1)).index_put((rows, lengths - 1), x)
        s.g1 = mtp_step(model, caches, h, nxt, pos)[rows, lengths - 1]
    return s

def emit(caches: Caches, s: DecodeState, n, tokens, logp, eos, max_new_tokens: int):
    """Emit and advance: write each running row's n accepted drafts and the token after them (tokens, logp
    (B, n+1 or more)), count what the row keeps, and move it on by its own n + 1. That is the whole rollback of
    rejected drafts: their cache entries lie beyond the row's new position, where the mask hides them and the
    next round overwrites them. Finished rows write nothing and stay parked inside the cache."""
    B, width = s.tokens.shape
    gamma = tokens.size(1) - 1
    ahead = torch.arange(gamma + 1, device=tokens.device)
    running = ~s.done
    valid = running[:, None] & (ahead <= n[:, None])
    write = torch.where(running[:, None], s.count[:, None] + ahead, width - 1)   # finished rows: the spare column
    s.tokens.scatter_(1, write, torch.where(valid, tokens, s.tokens.gather(1, write)))
    s.logprobs.scatter_(1, write, torch.where(valid, logp, s.logprobs.gather(1, write)))
    # Statistics count only the tokens a row keeps: up to its end mark and below max_new_tokens. Drafts verified
    # after an accepted end mark are easy (the policy predicts padding there) and would inflate acceptance.
    is_end = (valid & (tokens == eos)).long() if eos is not None else torch.zeros_like(tokens)
    kept = valid & (is_end.cumsum(1) - is_end == 0) & (s.count[:, None] + ahead < max_new_tokens)
    s.histogram[:gamma + 1] += ((kept.sum(1, keepdim=True) - 1 == ahead) & running[:, None]).sum(0)
    s.reached[:gamma] += kept[:, :gamma].sum(0)
    s.accepted[:gamma] += (kept[:, :gamma] & (ahead[:gamma] < n[:, None])).sum(0)
    s.rounds += running
    s.count += torch.where(running, n + 1, 0)
    s.L.copy_(torch.where(running, (s.L + n + 1).clamp(max=caches.S - s.reached.numel() - 1), s.L))
    s.x.copy_(torch.where(running, tokens.gather(1, n[:, None])[:, 0], s.x))
    s.done |= (s.count >= max_new_tokens) | is_end.bool().any(1)

def plain_step(model: GPT, caches: Caches, s: DecodeState, temperature: float, eos, max_new_tokens: int,
               generator=None):
    """One token for every row: the backbone reads x_L at its row's position and the next token is sampled."""
    logits, _ = backbone_step(model, caches, s.x[:, None], s.L[:, None])
    x, logp = sample_token(logits, temperature, generator)   # (B, 1)
    emit(caches, s, torch.zeros_like(s.L), x, logp, eos, max_new_tokens)

def draft(model: GPT, caches: Caches, s: DecodeState, gamma: int, temperature: float, greedy: bool, generator=None):
    """gamma drafts from the MTP layer, starting from g^1 at anchor L-1; step k >= 2 reads (g^{k-1}, emb(d_{k-1}))
    at MTP-cache position L+k-2. Returns the draft logits (B, gamma, V), the laws q the drafts were drawn from
    (B, gamma, V; one-hots for the greedy TO rule) and the drafts (B, gamma)."""
    V, g = model.config.vocab_size, s.g1
    logits, qs, ds = [g.new_zeros(len(g), 0, V)], [g.new_zeros(len(g), 0, V, dtype=torch.float)], [s.x[:, None][:, :0]]
    for k in range(1, gamma + 1):
        if k > 1:
            g = mtp_step(model, caches, g[:, None], ds[-1], (s.L + k - 2)[:, None])[:, 0]
        z = model.mtp_head(g)
        q = sampling_law(z, temperature)[1]
        d = q.argmax(-1) if greedy else sample(q, generator)
        logits.append(z[:, None])
        qs.append((one_hot(d, V) if greedy else q)[:, None])   # TO: the draft law is a one-hot
        ds.append(d[:, None])
    return torch.cat(logits, 1), torch.cat(qs, 1), torch.cat(ds, 1)

def speculative_round(model: GPT, caches: Caches, s: DecodeState, gamma: int, temperature: float, greedy: bool, eos,
                      max_new_tokens: int, generator=None) -> dict:
    """One round for every row, the paper's four steps: draft gamma tokens, verify [x_L, d_1..d_gamma] at positions
    L..L+gamma in one backbone forward, accept n of them plus one more token (rejection_sample), then emit and
    advance each row by its own n+1. Updates s in place and returns the round's internals (tests look at them).
    gamma may change from round to round up to what s was sized for; gamma = 0 is a plain step that also feeds
    the MTP layer its one new input, so that drafting can resume."""
    draft_logits, q, d = draft(model, caches, s, gamma, temperature, greedy, generator)
    positions = s.L[:, None] + torch.arange(gamma + 1, device=d.device)
    target_logits, h = backbone_step(model, caches, torch.cat([s.x[:, None], d], 1), positions)
    logp, p = sampling_law(target_logits, temperature)   # (B, gamma+1, V); the last row is for the bonus token
    n, tokens = rejection_sample(p, q, d, generator)
    internals = dict(L=s.L.clone(), running=~s.done, n=n, tokens=tokens, drafts=d, draft_logits=draft_logits,
                     draft_probs=q, target_logits=target_logits)
    # The MTP layer reads the depth-1 inputs of the gamma+1 new anchors (entries past n are garbage, hidden and
    # overwritten later); its output at index n is the next round's g^1.
    s.g1.copy_(mtp_step(model, caches, h, tokens, positions)[torch.arange(len(n), device=n.device), n])
    emit(caches, s, n, tokens, logp.gather(-1, tokens[..., None])[..., 0], eos, max_new_tokens)
    return internals

def decoding_loop(model: GPT, B: int, S: int, start, step, generator, max_steps: int, graphs=None) -> DecodeState:
    """start(caches) -> state, then step(caches, state, generator=) until every row is done. graphs: None decodes
    here, eagerly; a CudaGraphs (section 8) runs the same start and step over its own static caches and state and
    replays the step as a CUDA graph."""
    if graphs is not None:
        return graphs.decode(B, S, start, step, generator, max_steps)
    caches = Caches(model, B, S)
    s = start(caches)
    for _ in range(max_steps):
        if bool(s.done.all()):   # a host read each step: eager decoding waits for the device here
            break
        step(caches, s, generator=generator)
    return s

def tokens_per_forward(alphas) -> float:
    """Eq. 12: 1 + sum_j prod_{i<=j} alpha_i, the expected tokens per target forward (bonus included)."""
    return 1 + sum(itertools.accumulate(alphas, lambda a, b: a * b))

def kept_tokens(histogram) -> int:
    """Tokens kept over the row-rounds of a histogram (histogram[i]: row-rounds that kept i+1 tokens)."""
    return sum((i + 1) * h for i, h in enumerate(histogram))

def finish(idx, lengths, ragged: bool, s: DecodeState, max_new_tokens: int, eos) -> Generation:
    """The generators' shared ending: new tokens and log-probs copied out of the state (a CudaGraphs reuses it),
    padded after the first EOS, the prompts put back, and the acceptance statistics over the tokens rows keep:
    acceptance alpha_j = accepted / reached (conditional on reaching draft j; NaN if never reached),
    accept_length = kept tokens per row-round = tokens per target forward (1.0 when no round ran)."""
    new_tokens, logprobs = s.tokens[:, :max_new_tokens].clone(), s.logprobs[:, :max_new_tokens].clone()
    mask = torch.ones_like(new_tokens, dtype=torch.bool)
    if eos is not None:
        is_eos = (new_tokens == eos).long()
        mask = is_eos.cumsum(1) - is_eos == 0                    # up to and including the first EOS
        new_tokens, logprobs = new_tokens.masked_fill(~mask, eos), logprobs.masked_fill(~mask, 0.0)
    tokens = torch.cat([idx, new_tokens], dim=1)
    if ragged:   # drop each row's padding, then cut the flat result into rows
        keep = torch.cat([torch.arange(idx.size(1), device=idx.device) < lengths[:, None], mask | True], dim=1)
        tokens = list(tokens[keep].split((lengths + max_new_tokens).tolist()))
    hist, reached, accepted = s.histogram.tolist(), s.reached.tolist(), s.accepted.tolist()
    stats = dict(acceptance=[a / r if r else math.nan for a, r in zip(accepted, reached)],
                 accept_length=kept_tokens(hist) / sum(hist) if sum(hist) else 1.0, accept_histogram=hist,
                 drafts_reached=reached, drafts_accepted=accepted, target_forwards=int(s.rounds.max()) + 1,
                 gamma=len(reached))
    return Generation(tokens, new_tokens, logprobs, mask, s.rounds.clone(), stats)

@torch.no_grad()
def generate(model: GPT, prompt, max_new_tokens: int, *, temperature: float = 1.0, generator=None, eos=None,
             graphs=None) -> Generation:
    """Plain autoregressive sampling: one backbone forward per token, batched, KV-cached. prompt: (B, T) ids or a
    list of 1-D rows. graphs: a CudaGraphs of this model to replay each step as a CUDA graph (section 8)."""
    idx, lengths, ragged = prepare(model, prompt, max_new_tokens, temperature, eos, generator, graphs, 0)
    n, T = int(max_new_tokens), float(temperature)
    start = functools.partial(prefill, model, idx=idx, lengths=lengths, max_new_tokens=n, gamma=0, temperature=T,
                              eos=eos, mtp=False, generator=generator)
    step = functools.partial(plain_step, model, temperature=T, eos=eos, max_new_tokens=n)
    # Every step adds a token to each running row, so n - 1 steps after the prefill suffice.
    s = decoding_loop(model, idx.size(0), idx.size(1) + n, start, step, generator, n - 1, graphs)
    return finish(idx, lengths, ragged, s, n, eos)


DRAFT_RULES = ("sample", "greedy")

@torch.no_grad()
def speculative_generate(model: GPT, prompt, max_new_tokens: int, *, gamma: int = 3, temperature: float = 1.0,
                         draft: str = "sample", generator=None, eos=None, graphs=None) -> Generation:
    """MTP speculative decoding with exact verification, batched, each row advancing at its own pace: rounds of
    speculative_round until every row is done. gamma: drafted tokens per round, 0..K (K = the depth the MTP layer
    was trained to; 0 decodes plainly through the same machinery). draft="sample" is rejection sampling (RS),
    "greedy" target-only verification (TO); both emit exactly the target law. graphs: as in generate."""
    K = model.config.mtp_train_steps
    if not is_int(gamma) or not 0 <= gamma <= K:
        raise ValueError(f"gamma must be an integer in 0..{K} (the depth the MTP layer was trained to), got {gamma!r}")
    if draft not in DRAFT_RULES:
        raise ValueError(f"unknown draft rule {draft!r}; choose one of {DRAFT_RULES}")
    idx, lengths, ragged = prepare(model, prompt, max_new_tokens, temperature, eos, generator, graphs, int(gamma))
    n, T, gamma = int(max_new_tokens), float(temperature), int(gamma)
    start = functools.partial(prefill, model, idx=idx, lengths=lengths, max_new_tokens=n, gamma=gamma, temperature=T,
                              eos=eos, mtp=True, generator=generator)
    step = functools.partial(speculative_round, model, gamma=gamma, temperature=T, greedy=draft == "greedy", eos=eos,
                             max_new_tokens=n)
    # Every running row gains at least one token per round, so n - 1 rounds always suffice.
    s = decoding_loop(model, idx.size(0), idx.size(1) + n + gamma, start, step, generator, n - 1, graphs)
    return finish(idx, lengths, ragged, s, n, eos)

# ---------------------------------------------------------------------------------------------------------------
# 6. Toy task: "write N digits that sum to S", in a house style. The reward is verifiable; every prompt has many
# right answers, so the policy keeps real entropy; answers of 16-32 digits make rollouts dominate a step; and hitting
# the sum needs a running total that SFT teaches only roughly, which leaves GRPO something to do. The answers follow
# a random order-2 Markov "style" (Dirichlet(0.25) rows): next-digit laws peaked in some contexts and spread in
# others, as in language (uniform digits would be trivial to draft and hide the paper's effects).

VOCAB = "0123456789SN=."   # digits are their own ids; "." ends the answer
EOS = VOCAB.index(".")
PROMPT_LEN = 8             # "S" + 3 digits + "N" + 2 digits + "=", e.g. "S087N19="

def encode(text: str):
    return torch.tensor([VOCAB.index(c) for c in text], dtype=torch.long)

def decode(tokens) -> str:
    return "".join(VOCAB[int(t)] for t in tokens)

class DigitSumTask:
    def __init__(self, seed: int = 1234, n_min: int = 16, n_max: int = 32, concentration: float = 0.25):
        self.n_min, self.n_max = n_min, n_max
        g = torch.Generator().manual_seed(seed)
        # style[a, b]: the law of the next digit after digits a, b (10 = no digit yet), Dirichlet rows
        gam = torch._standard_gamma(torch.full((11, 11, 10), concentration), generator=g)
        self.style = gam / gam.sum(-1, keepdim=True)
        self.max_new_tokens = n_max + 1          # the digits and the end mark
        self.seq_len = PROMPT_LEN + n_max + 1

    def sample_answers(self, B: int, generator):
        """(digits (B, n_max), N (B,), S (B,)) drawn from the style; digits past N are padding."""
        N = torch.randint(self.n_min, self.n_max + 1, (B,), generator=generator)
        digits = torch.zeros(B, self.n_max, dtype=torch.long)
        a = b = torch.full((B,), 10)
        for i in range(self.n_max):   # a loop over positions, never over rows
            digits[:, i] = torch.multinomial(self.style[a, b], 1, generator=generator)[:, 0]
            a, b = b, digits[:, i]
        digits = digits * (torch.arange(self.n_max) < N[:, None])
        return digits, N, digits.sum(1)

    @staticmethod
    def prompt_tokens(S, N):
        """(B, PROMPT_LEN) tokens of "S{S:03d}N{N:02d}=" without going through strings."""
        col = lambda v: torch.full_like(S, VOCAB.index(v))
        return torch.stack([col("S"), S // 100, S // 10 % 10, S % 10, col("N"), N // 10, N % 10, col("=")], 1)

    def prompts(self, B: int, generator):
        """Prompts whose targets are reachable in the house style: (idx (B, 8), S, N)."""
        _, N, S = self.sample_answers(B, generator)
        return self.prompt_tokens(S, N), S, N

    def sft_batch(self, B: int, generator):
        """Teacher-forcing sequences (B, seq_len) [prompt, N digits, ".", padding] and their lengths."""
        digits, N, S = self.sample_answers(B, generator)
        answer = torch.cat([digits, torch.full((B, 1), EOS)], 1).scatter_(1, N[:, None], EOS)  # "." after digit N
        lengths = PROMPT_LEN + N + 1
        seq = torch.cat([self.prompt_tokens(S, N), answer], 1)
        return torch.where(torch.arange(self.seq_len) < lengths[:, None], seq, EOS), lengths

    @staticmethod
    def reward(new_tokens, S, N):
        """Reward in [0, 1] and exact correctness of answers (B, T) for targets S, N (B,). Well-formed = digits
        then "."; then half a point for the right count and up to half a point for the sum, falling linearly to 0
        at 10 away from S: 1.0 exactly when count and sum are both right."""
        T = new_tokens.size(1)
        is_end = new_tokens == EOS
        length = torch.where(is_end.any(1), is_end.float().argmax(1), T)
        before = torch.arange(T, device=new_tokens.device) < length[:, None]
        well_formed = is_end.any(1) & ((new_tokens < 10) | ~before).all(1)
        total = torch.where(before, new_tokens, 0).sum(1)
        S, N = S.to(new_tokens.device), N.to(new_tokens.device)
        closeness = (1 - (total - S).abs().float() / 10).clamp(min=0)
        reward = well_formed.float() * (0.5 * (length == N).float() + 0.5 * closeness)
        return reward, well_formed & (length == N) & (total == S)

def answer_mask(lengths, T: int, answer_start: int, device=None):
    """Positions (of T inputs) whose next token is part of the answer: answer_start-1 .. length-2, where the
    answer starts at position answer_start and sequence b has lengths[b] tokens."""
    t = torch.arange(T, device=device)
    return (t >= answer_start - 1) & (t <= lengths[:, None] - 2)

def mtp_chain_targets(seq, lengths, target_logits, draft, answer_start: int):
    """Lay out teacher-forced chains for the MTP losses, one per anchor t >= answer_start-1 (answers start at
    position answer_start; sequence b has lengths[b] tokens). draft (B, K, T, ...): draft logits or hidden states.
    Returns (draft (N, K, ...), target logits (N, K, V), labels (N, K), mask (N, K)): step k of anchor t targets
    the backbone's row at position t+k (its own next-token law, detached) and the data token x_{t+k+1}; a step
    whose target lies past the answer's end is masked (a prefix per chain)."""
    B, K, T = draft.shape[:3]
    t, k = torch.arange(T, device=seq.device), torch.arange(1, K + 1, device=seq.device)
    tgt = (t[None, :] + k[:, None]).clamp(max=T - 1)                                    # (K, T)
    labels = F.pad(seq, (0, 1))[:, (tgt + 1).clamp(max=T)]                              # (B, K, T)
    mask = (t >= answer_start - 1) & (t + k[:, None] <= lengths[:, None, None] - 2)      # (B, K, T)
    chain = lambda x: x.transpose(1, 2).flatten(0, 1)[mask[:, 0].flatten()]             # (B, K, T, ...) -> (N, K, ...)
    return chain(draft), chain(target_logits[:, tgt]), chain(labels), chain(mask)

# ---------------------------------------------------------------------------------------------------------------
# 7. The RL algorithm: the SFT loss, the pre-RL MTP loss (backbone frozen) and GRPO, whose rollouts come from
# exact speculative decoding. grpo_step is one whole step, to read or to copy.

def backbone_parameters(model: GPT):
    return [p for name, p in model.named_parameters() if not name.startswith("mtp.")]

def sft_loss(model: GPT, seq, lengths):
    """Next-token cross-entropy on the answer tokens only (digits and the end mark)."""
    logits = model(seq[:, :-1])
    mask = answer_mask(lengths, seq.size(1) - 1, PROMPT_LEN, seq.device)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), seq[:, 1:].flatten(), reduction="none").view(mask.shape)
    return (ce * mask).sum() / mask.sum()

def mtp_training_loss(model: GPT, kind: str, seq, lengths, n_steps: int, backbone=None):
    """MTP loss teacher-forced on sequences (B, T); no gradient reaches the backbone. backbone: the model's
    backbone_outputs(seq), if already computed (heads trained on one fixed set share them)."""
    target_logits, x = model.mtp_features(seq, n_steps, backbone)
    draft, target, labels, mask = mtp_chain_targets(seq, lengths, target_logits, x, PROMPT_LEN)
    # The shared head, detached, is applied inside the loss: the TV losses fuse it and never hold all the logits.
    return mtp_loss(kind, draft, target, labels, mask, head_weight=model.lm_head.weight.detach())

def group_advantages(rewards, group_size: int, eps: float = 1e-6):
    """GRPO: (R - mean_G) / (std_G + eps) within each group of G samples of one prompt. A group whose samples all
    scored the same has advantage 0: it teaches nothing, by design."""
    R = rewards.view(-1, group_size)
    return ((R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + eps)).flatten()

def grpo_loss(logp, old_logp, advantages, mask, clip_eps: float = 0.2, kl_coef: float = 0.0, ref_logp=None,
              entropy_coef: float = 0.0, entropy=None):
    """Clipped-ratio surrogate (Eq. 3), averaged per token within a sample, then over samples. logp (B, T) from the
    trainer's forward; old_logp (B, T) from the rollout (exact sampling makes them the policy's own: the ratio starts
    at 1); optional k3 estimate of KL(pi || pi_ref) (ref_logp (B, T)) and entropy bonus entropy_coef * H (B, T)."""
    ratio = torch.exp(logp - old_logp)
    A = advantages[:, None]
    per_token = -torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
    if kl_coef > 0:
        per_token = per_token + kl_coef * (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1)
    if entropy_coef != 0:
        per_token = per_token - entropy_coef * entropy
    mask = mask.float()
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()

def policy_logprobs(model: GPT, tokens, prompt_len: int, temperature: float = 1.0):
    """Trainer-side log p and entropy of every generated token at the sampling temperature, the law the rollouts
    were drawn from: (logp (B, T_new), entropy (B, T_new))."""
    logp_all = F.log_softmax(model(tokens[:, :-1])[:, prompt_len - 1:].float() / temperature, dim=-1)
    return logp_all.gather(-1, tokens[:, prompt_len:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)

def autocast(tc: TrainConfig, device):
    """bf16 autocast around the training forwards (weights, optimizer and loss math stay float32)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if tc.precision == "bf16" else nullcontext()

def update(loss, optimizer, params, grad_clip: float, sync=None):
    """backward, clip, step: one optimizer update, the same in every stage. sync(params), if given, runs between
    backward and clipping (data parallelism averages the gradients over the ranks there)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if sync is not None:
        sync(params)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()

def grpo_step(model: GPT, policy: GPT, optimizer, task: DigitSumTask, tc: TrainConfig, prompts, generator,
              gamma: int, *, graphs=None, ref=None, mtp_optimizer=None, sync=None):
    """One GRPO step: rollouts, rewards, group advantages, one clipped policy-gradient update (Eq. 3). prompts (idx, S,
    N) hold each prompt group_size times in a row; policy is what rollouts run on (the model, or a bf16 copy); gamma:
    drafts per round (0: plain decoding), chosen by the caller, and exact whatever it is, so rollouts are on-policy.
    ref: a frozen copy for the KL term; mtp_optimizer: with tc.mtp_online the MTP layer learns from the rollouts too
    (the recipe keeps it frozen); sync averages gradients over ranks. Returns (rollouts, this process's numbers)."""
    idx, S, N = prompts
    policy.eval()
    t0 = time.perf_counter()
    kw = dict(temperature=tc.temperature, generator=generator, eos=EOS, graphs=graphs)
    roll = (speculative_generate(policy, idx, task.max_new_tokens, gamma=gamma, draft=tc.draft, **kw) if gamma
            else generate(policy, idx, task.max_new_tokens, **kw))
    rollout_s = time.perf_counter() - t0
    rewards, correct = task.reward(roll.new_tokens, S, N)

    model.train()
    with autocast(tc, idx.device):
        logp, entropy = policy_logprobs(model, roll.tokens, PROMPT_LEN, tc.temperature)
        ref_logp = None if ref is None else policy_logprobs(ref, roll.tokens, PROMPT_LEN, tc.temperature)[0].detach()
    loss = grpo_loss(logp, roll.logprobs, group_advantages(rewards, tc.group_size), roll.mask, tc.clip_eps,
                     tc.kl_coef, ref_logp, tc.entropy_coef, entropy)
    update(loss, optimizer, backbone_parameters(model), tc.grad_clip, sync)
    if mtp_optimizer is not None:
        with autocast(tc, idx.device):
            mtp_l = mtp_training_loss(model, tc.mtp_online, roll.tokens, PROMPT_LEN + roll.mask.sum(1),
                                      model.config.mtp_train_steps)
        update(mtp_l, mtp_optimizer, list(model.mtp.parameters()), tc.grad_clip, sync)
    mask = roll.mask.float()
    return roll, dict(loss=loss.item(), reward=rewards.mean().item(), accuracy=correct.float().mean().item(),
                      entropy=((entropy.detach() * mask).sum() / mask.sum()).item(), rollout_s=rollout_s,
                      tokens=mask.sum().item(), kept_tokens=kept_tokens(roll.stats["accept_histogram"]),
                      row_rounds=sum(roll.stats["accept_histogram"]), drafts_reached=roll.stats["drafts_reached"],
                      drafts_accepted=roll.stats["drafts_accepted"], gamma=gamma)


# ===============================================================================================================
# The harness: everything above is the recipe, everything below runs it. Speed is switched on from outside (CUDA
# graphs, the draft length); then measures, data parallelism, checkpoints, the training stages, the experiments,
# the benchmark and main().
# ===============================================================================================================

# ---------------------------------------------------------------------------------------------------------------
# 8. CUDA graphs. A decoding step launches hundreds of small kernels; at small batches the GPU waits for the CPU to
# launch them. Captured once as a CUDA graph and replayed, a step is one launch. Whoever decodes repeatedly (the RL
# loop, the benchmark) owns a CudaGraphs and hands it to the generators, which hand it the step they run eagerly.

def cuda_graphs_supported(device) -> bool:
    return torch.device(device).type == "cuda" and hasattr(torch.cuda.CUDAGraph, "register_generator_state")

def capture_cuda_graph(step, tensors, generator):
    """Record step() as a CUDA graph and return its replay. step updates `tensors` in place, never waits on the host
    and draws random numbers only from `generator` (registered, so every replay draws fresh ones). It runs twice on a
    side stream first (lazy initialisation must precede a capture); then tensors and generator are put back."""
    saved, rng, side = [t.clone() for t in tensors], generator.get_state(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(), step()
    torch.cuda.current_stream().wait_stream(side)
    for t, v in zip(tensors, saved):
        t.copy_(v)
    generator.set_state(rng)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        step()
    return graph.replay

def repeat_until_done(step, done, max_steps: int, lag: int):
    """step() until every row of `done` (B,) is True, at most max_steps times. The flag goes to pinned memory behind
    each step and is read `lag` steps late, so the GPU always has the next step queued; a batch that has just ended
    runs `lag` idle steps, which change nothing (finished rows are parked and write nothing)."""
    if bool(done.all()):
        return
    cuda = done.is_cuda
    flags = torch.zeros(lag + 1, dtype=torch.bool, pin_memory=cuda)   # a ring: one slot per step in flight
    events = [torch.cuda.Event() if cuda else None for _ in range(lag + 1)]
    for i in range(max_steps):
        step()
        flags[i % (lag + 1)].copy_(done.all(), non_blocking=cuda)
        if cuda:
            events[i % (lag + 1)].record()
        if i >= lag:
            if cuda:
                events[(i - lag) % (lag + 1)].synchronize()
            if flags[(i - lag) % (lag + 1)]:
                return

class CudaGraphs:
    """CUDA graphs for one model's decoding. Per decoding shape (batch, cache length, the step and what it bakes in)
    it keeps caches, state and a generator at fixed addresses, captures the step on first use and replays it after.
    A call copies its fresh prefill into the state and reseeds the graph's generator from the caller's, which so
    still decides the samples. Weights moved to new storage drop everything (a graph reads fixed addresses). A failed
    capture warns and decodes that shape eagerly."""

    def __init__(self, model: GPT, lag: int = 1):
        if not cuda_graphs_supported(model.lm_head.weight.device):
            raise ValueError(f"CUDA graphs need a model on a CUDA device and torch >= 2.5; this model is on "
                             f"{model.lm_head.weight.device}, torch {torch.__version__}")
        self.model, self.lag, self.shapes, self.where = model, lag, {}, None

    def decode(self, B: int, S: int, start, step, generator, max_steps: int) -> DecodeState:
        if (where := [p.data_ptr() for p in self.model.parameters()]) != self.where:
            self.where, self.shapes = where, {}
        key = (B, S, step.func, tuple(sorted(step.keywords.items())), self.model.lm_head.weight.dtype)
        if key not in self.shapes:
            caches = Caches(self.model, B, S)
            self.shapes[key] = [caches, start(caches), torch.Generator(self.model.lm_head.weight.device), None]
        else:
            for dst, src in zip(self.shapes[key][1].tensors(), start(self.shapes[key][0]).tensors()):
                dst.copy_(src)
        caches, s, own, replay = self.shapes[key]
        own.manual_seed(int(torch.randint(2**62, (), generator=generator, device=getattr(generator, "device", "cpu"))))
        if replay is None:
            replay = functools.partial(step, caches, s, generator=own)
            try:
                replay = capture_cuda_graph(replay, s.tensors() + caches.tensors(), own)
            except RuntimeError as e:
                warnings.warn(f"CUDA graph capture failed, decoding this shape eagerly ({e})")
            self.shapes[key][3] = replay
        repeat_until_done(replay, s.done, max_steps, self.lag)
        return s

# ---------------------------------------------------------------------------------------------------------------
# 9. Choosing gamma. Whether drafting pays depends on the batch, the device and the acceptance: where a verify
# forward is compute bound, checking gamma + 1 tokens costs nearly gamma + 1 plain steps.

def seconds(fn, device):
    """(wall seconds of fn(), the device synchronised around it, what it returned)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out

@torch.no_grad()
def round_costs(model: GPT, B: int, P: int, max_new_tokens: int, K: int, cuda_graphs: bool) -> list:
    """Seconds of a plain step and of a round of gamma = 1..K at batch B (random prompts of length P), eager with the
    loop's host read of `done`, or replayed as graphs; interleaved, the best of three blocks (other work on a shared
    machine only adds time, and cannot land on one gamma alone). Rows may finish meanwhile: a step costs the same."""
    device = model.lm_head.weight.device
    gen = torch.Generator(device).manual_seed(0)
    idx, calls = torch.randint(0, model.config.vocab_size, (B, P), device=device, generator=gen), []
    for gamma in range(K + 1):
        caches = Caches(model, B, P + max_new_tokens + K)
        s = prefill(model, caches, idx, idx[:, 0] * 0 + P, max_new_tokens, K, 1.0, None, gamma > 0, gen)
        step = functools.partial(speculative_round, model, caches, s, gamma, 1.0, False) if gamma else \
            functools.partial(plain_step, model, caches, s, 1.0)
        fn = functools.partial(step, None, max_new_tokens, generator=gen)
        fn = capture_cuda_graph(fn, s.tensors() + caches.tensors(), gen) if cuda_graphs else fn
        calls.append(lambda fn=fn, s=s: [(fn(), cuda_graphs or bool(s.done.all())) for _ in range(2)])
    costs = [math.inf] * (K + 1)
    for _ in range(3):
        costs = [min(c, seconds(call, device)[0] / 2) for c, call in zip(costs, calls)]
    return costs

class GammaChooser:
    """gamma="auto": per batch shape, the draft length (0 = plain decoding) whose call should end soonest.

    A call lasts until its slowest row is done: rounds x C(gamma), C timed per shape by round_costs (again every
    `retime_every` calls). A round keeps 1 + k tokens with chance prod_{j<=k} alpha_j (1 - alpha_{k+1}), from the
    running per-depth acceptance, whose mean is Eq. 12. A row of n tokens needs about n / mean rounds, and the slowest
    of B rows about z_B sqrt(n var / mean^3) more, z_B the expected largest of B standard normals."""

    def __init__(self, K: int, retime_every: int = 100):
        self.alphas, self.measured, self.retime_every = [0.8] * K, [False] * K, retime_every
        self.costs, self.calls = {}, {}   # (B, P, max_new_tokens, graphs) -> [C(0), ..., C(K)] seconds; calls

    def rounds(self, gamma: int, n: int, B: int) -> float:
        reach = list(itertools.accumulate([1.0] + self.alphas[:gamma], lambda a, b: a * b)) + [0.0]
        chance = [reach[k] - reach[k + 1] for k in range(gamma + 1)]   # P(exactly k drafts accepted)
        mean = sum(c * (k + 1) for k, c in enumerate(chance))
        var = sum(c * (k + 1) ** 2 for k, c in enumerate(chance)) - mean ** 2
        z = torch.special.ndtri(torch.tensor((B - 0.375) / (B + 0.25), dtype=torch.float64)).item()   # Blom
        return n / mean + z * math.sqrt(max(var, 0.0) * n / mean ** 3)

    def __call__(self, model: GPT, B: int, P: int, max_new_tokens: int, graphs=None) -> int:
        shape = (B, P, max_new_tokens, graphs is not None)
        self.calls[shape] = self.calls.get(shape, 0) + 1
        if shape not in self.costs or self.calls[shape] % self.retime_every == 0:
            self.costs[shape] = round_costs(model, B, P, max_new_tokens, len(self.alphas), graphs is not None)
        cost = self.costs[shape]
        return min(range(len(cost)), key=lambda g: self.rounds(g, max_new_tokens - 1, B) * cost[g])

    def observe(self, stats: dict):
        """Fold a call's counted acceptance into the running estimates (a depth's first measurement replaces the
        prior); depths not yet drafted follow the deepest one measured."""
        for j, (a, r) in enumerate(zip(stats["drafts_accepted"], stats["drafts_reached"])):
            if r:
                self.alphas[j] = (self.alphas[j] + a / r) / 2 if self.measured[j] else a / r
                self.measured[j] = True
        if deepest := sum(self.measured):   # depths are reached in order: the first `deepest` are measured
            self.alphas[deepest:] = [self.alphas[deepest - 1]] * (len(self.alphas) - deepest)

# ---------------------------------------------------------------------------------------------------------------
# 10. Measures. Expected (teacher-forced) acceptance has no sampling noise; intervals resample what is independent.

def masked_mean(x, valid, dims=(0, 1)):
    return (x * valid).sum(dims) / valid.sum(dims).clamp(min=1)

@torch.no_grad()
def teacher_forced(model: GPT, tokens, mask, depth: int, temperature: float = 1.0, backbone=None) -> dict:
    """Expected acceptance of every draft the decoder could make on some answers (tokens (B, PROMPT_LEN + T), mask
    (B, T) of kept tokens): (B, PROMPT_LEN + T, depth) tensors over anchor t and depth k of H(p), the RS acceptance
    sum_v min(p, q) = 1 - d_TV (Eq. 2), the TO acceptance p(argmax q) (Eq. 1), and `valid` where the target is kept.
    Depth 1 is exactly what decoding sees (a test proves it); deeper, q conditions on the answer's own tokens where
    decoding conditions on accepted drafts, as Eq. 12 and the e2e TV loss assume."""
    target_logits, draft_logits = model.mtp_logits(tokens, depth, backbone)
    t, k = torch.arange(tokens.size(1), device=tokens.device)[:, None], torch.arange(1, depth + 1, device=tokens.device)
    p = sampling_law(target_logits[:, (t + k).clamp(max=tokens.size(1) - 1)], temperature)[1]   # (B, T, depth, V)
    q = sampling_law(draft_logits.transpose(1, 2), temperature)[1]
    return dict(entropy=-(p * p.clamp(min=1e-30).log()).sum(-1), rs=torch.minimum(p, q).sum(-1),
                to=p.gather(-1, q.argmax(-1, keepdim=True))[..., 0],
                valid=(t >= PROMPT_LEN - 1) & (t + k <= PROMPT_LEN + mask.sum(1)[:, None, None] - 2))

@torch.no_grad()
def evaluate(model: GPT, start: GPT, task: DigitSumTask, prompts, temperature: float = 1.0, seed: int = 0) -> dict:
    """The policy on fixed held-out prompts (idx, S, N), an answer each, drafted by its frozen MTP layer at gamma 3:
    reward, exact accuracy, each prompt's reward, the counted accept length, the expected RS and TO tokens per forward
    teacher-forced on the answers (Eq. 12), and KL(pi || start) per token (start: pi_0, where RL began)."""
    idx, S, N = prompts
    roll = speculative_generate(model.eval(), idx, task.max_new_tokens, gamma=3, temperature=temperature, eos=EOS,
                                generator=torch.Generator(idx.device).manual_seed(seed))
    reward, correct = task.reward(roll.new_tokens, S, N)
    tf = teacher_forced(model, roll.tokens, roll.mask, 3, temperature)
    return dict(reward=reward.mean().item(), accuracy=correct.float().mean().item(), rewards=reward.tolist(),
                counted=roll.stats["accept_length"],
                **{k: tokens_per_forward(masked_mean(tf[k], tf["valid"]).tolist()) for k in ("rs", "to")},
                kl=kl_per_token(model, start, roll.tokens, roll.mask))

@torch.no_grad()
def kl_per_token(model: GPT, ref: GPT, tokens, mask) -> float:
    """KL(model || ref) per kept answer token of tokens (B, PROMPT_LEN + T), mask (B, T): how far a policy moved."""
    logp, logr = (F.log_softmax(m(tokens[:, :-1])[:, PROMPT_LEN - 1:].float(), -1) for m in (model, ref))
    return masked_mean((logp.exp() * (logp - logr)).sum(-1), mask).item()

def lstsq(y, *columns) -> list:
    """Least-squares coefficients of y on [1, *columns]: [intercept, a slope per column]."""
    X = torch.stack([torch.ones(len(y))] + [torch.as_tensor(c) for c in columns], 1).double()
    return torch.linalg.lstsq(X, torch.as_tensor(y, dtype=torch.float64)[:, None]).solution[:, 0].tolist()

def bootstrap(stat, n: int, block: int = 1, draws: int = 1000) -> tuple:
    """95% interval of stat(indices) over resamples of n units: independent ones, or with block > 1 consecutive units
    of a series whose neighbours are not independent (a moving-block bootstrap)."""
    starts = torch.randint(0, n - block + 1, (draws, -(-n // block)), generator=torch.Generator().manual_seed(0))
    values = torch.tensor([stat(i) for i in (starts[..., None] + torch.arange(block)).flatten(1)[:, :n].tolist()],
                          dtype=torch.float64)
    return tuple(torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist())

def mean_ci(values) -> tuple:
    """(mean, 95% t interval) of a few independent values (seeds)."""
    v, t95 = torch.tensor(values, dtype=torch.float64), (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26)
    return v.mean().item(), tuple((v.mean() + s * t95[len(v) - 2] * v.std() / len(v) ** 0.5).item() for s in (-1, 1))

def ci_text(value: float, ci) -> str:
    return f"{value:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"

def table(title: str, rows: list):
    """Print rows (dicts with the same keys) as aligned columns under a title, numbers with three decimals."""
    cells = [list(rows[0])] + [[v if isinstance(v, str) else f"{v:.3f}" for v in r.values()] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    print(f"\n{title}\n" + "\n".join("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells))

# ---------------------------------------------------------------------------------------------------------------
# 11. Runs: data parallelism (nanoGPT's way: without RANK in the environment the same names take trivial values),
# checkpoints that never lose work, and the three training stages, each a flat loop.

def setup_ranks(device: str):
    """(rank, world size, device): under torchrun (RANK set) this process joins the group; else it runs alone."""
    if "RANK" not in os.environ:
        return 0, 1, device
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(device := f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
    return dist.get_rank(), dist.get_world_size(), device

def all_reduce(values: dict, world: int, op: str = "mean") -> dict:
    """Average (or sum) named numbers, floats or lists of floats, over the ranks; identity in one process."""
    if world == 1:
        return dict(values)
    flat = torch.tensor([x for v in values.values() for x in (v if isinstance(v, list) else [v])], dtype=torch.float64,
                        device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flat)
    it = iter((flat / world if op == "mean" else flat).tolist())
    return {k: [next(it) for _ in v] if isinstance(v, list) else next(it) for k, v in values.items()}

def average_gradients(params, world: int):
    """Data parallelism's gradient all-reduce, by hand, so that every stage (the MTP layer's too) is covered alike."""
    if world > 1 and (grads := [p.grad for p in params if p.grad is not None]):
        flat = torch.cat([g.flatten() for g in grads])   # one collective, not one per tensor
        dist.all_reduce(flat)
        for g, part in zip(grads, (flat / world).split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

class RunError(ValueError):
    """A run that cannot start or go on as asked: main() says why in one line."""

def changed(then: dict, now: dict) -> str:
    """The settings of `now` that `then` (what a saved result was made with) does not share: "name old -> new, ..."."""
    return ", ".join(f"{k} {then.get(k)!r} -> {v!r}" for k, v in now.items() if then.get(k) != v)

STAGES = ("sft", "mtp", "grpo")
STAGE_SETTINGS = {   # what each stage's result depends on, besides the model config and the stages before it
    "sft": ("preset", "seed", "task_seed", "sft_steps", "sft_lr", "batch_size", "grad_clip", "precision"),
    "mtp": ("mtp_steps", "mtp_lr", "mtp_loss", "mtp_ce_warmup"),
    "grpo": ("rl_steps", "rl_lr", "rl_prompts", "group_size", "clip_eps", "kl_coef", "entropy_coef", "temperature",
             "gamma", "draft", "mtp_online", "mtp_online_lr", "eval_prompts")}

class Run:
    """A run's folder: a checkpoint per stage, written atomically and restored only if made with this run's settings,
    and a JSON-lines log. As a context manager, Ctrl-C finishes the step in flight, saves and stops. A run removes
    another run's checkpoints only when told to overwrite them."""

    def __init__(self, out, tc: TrainConfig, cfg: GPTConfig, resume=False, overwrite=False, rank=0, world=1,
                 stages=STAGES, afresh="start afresh with --overwrite or another --out"):
        self.out, self.tc, self.cfg, self.resume, self.rank, self.world = out, tc, cfg, resume, rank, world
        self.stages, self.t0, self.interrupted, self.log = stages, time.time(), False, os.path.join(out, "log.jsonl")
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot use --out {out} as a folder: {e.strerror}") from None
        found = [s for s in stages if os.path.exists(self.path(s))]
        if found and not (resume or overwrite):
            raise RunError(f"{out} holds checkpoints of another run ({', '.join(s + '.pt' for s in found)}); continue "
                           f"it with --resume, replace it with --overwrite, or use another --out")
        if found and resume:   # the latest checkpoint holds the settings of its stage and of those before it
            ckpt = self.read(self.path(found[-1]))
            keys = [k for s in STAGES[:STAGES.index(found[-1]) + 1] for k in STAGE_SETTINGS[s]]
            then = {**ckpt["model_config"], **{k: ckpt["train"].get(k) for k in keys}, "ranks": ckpt["world_size"]}
            now = {**asdict(cfg), **{k: getattr(tc, k) for k in keys}, "ranks": world}
            if differ := changed(then, now):
                raise RunError(f"{self.path(found[-1])} was made with other settings ({differ}); resume "
                               f"with the same flags, or {afresh}")
            self.t0 -= ckpt["wall_seconds"]
        for stage in found if overwrite and rank == 0 else ():
            os.remove(self.path(stage))
        if rank == 0 and not resume:
            open(self.log, "w").close()

    def __enter__(self):
        main = threading.current_thread() is threading.main_thread()
        self.previous = signal.signal(signal.SIGINT, self.on_sigint) if main else None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def on_sigint(self, *_):
        self.interrupted = True
        signal.signal(signal.SIGINT, self.previous)   # a second Ctrl-C stops at once
        if self.rank == 0:
            tqdm.write("Ctrl-C: saving after the step in flight, then stopping (Ctrl-C again: at once)", sys.stderr)

    def path(self, stage: str) -> str:
        return os.path.join(self.out, f"{stage}.pt")

    def read(self, path: str, model: GPT = None, optimizers=()) -> dict:
        """A checkpoint, loaded into model and optimizers if given; a damaged or misfit one is refused."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            assert {"model", "optimizers", "rng", "train", "model_config", "step", "extra", "wall_seconds"} <= set(ckpt)
            if model is not None:   # a stage restored: its weights and every optimizer must fit
                model.load_state_dict(ckpt["model"])
                for optimizer, state in zip(optimizers, ckpt["optimizers"], strict=True):
                    optimizer.load_state_dict(state)
            return ckpt
        except Exception as e:
            why = " ".join(f"{type(e).__name__} {e}".split())[:100]   # one line, e.g. which tensor does not fit
            raise RunError(f"checkpoint {path} is unreadable or truncated, or does not fit this model ({why}); move "
                           f"it away or run without --resume") from None

    def restore(self, stage: str, model: GPT, optimizers, generators):
        """Where a stage starts: (step, extra) of its checkpoint, restoring model, optimizers and random streams;
        (0, {}) without one; None when a later stage's checkpoint exists (that one holds the weights)."""
        later = any(os.path.exists(self.path(s)) for s in self.stages[self.stages.index(stage) + 1:])
        if not self.resume or later or not os.path.exists(self.path(stage)):
            return None if self.resume and later else (0, {})
        ckpt = self.read(self.path(stage), model, optimizers)
        for g, state in zip(generators, ckpt["rng"][self.rank]["generators"]):
            g.set_state(state)
        torch.set_rng_state(ckpt["rng"][self.rank]["torch"])
        return ckpt["step"], ckpt["extra"]

    def save(self, stage: str, step: int, model: GPT, optimizers, generators, extra=None):
        """Every rank gives its random streams; rank 0 writes a temporary file and renames it over the checkpoint."""
        rng = [dict(generators=[g.get_state() for g in generators], torch=torch.get_rng_state())] * self.world
        if self.world > 1:
            dist.all_gather_object(rng, rng[0])
        if self.rank == 0:
            tmp = self.path(stage) + ".tmp"
            torch.save(dict(stage=stage, step=step, model=model.state_dict(), rng=rng, world_size=self.world,
                            optimizers=[o.state_dict() for o in optimizers], train=asdict(self.tc), extra=extra or {},
                            model_config=asdict(self.cfg), wall_seconds=time.time() - self.t0), tmp)
            os.replace(tmp, self.path(stage))

def progress(run: Run, stage: str, start: int, total: int):
    return tqdm(range(start, total), desc=stage, initial=start, total=total, dynamic_ncols=True, disable=run.rank > 0)

def after_step(run: Run, stage, step, total, bar, metrics: dict, shown: str, model, optimizers, generators, extra=None):
    """The end of a training step: stop at a non-finite loss, log, show, and checkpoint every ckpt_every steps, at the
    stage's end, and after a Ctrl-C, which then stops the run (the ranks agree when)."""
    if not math.isfinite(metrics["loss"]):   # the weights are spoiled already: save nothing
        raise RunError(f"{stage} step {step}: the loss is {metrics['loss']}; stopped, the last checkpoint is kept; "
                       f"lower a learning rate or a coefficient")
    if run.rank == 0:
        with open(run.log, "a") as log:
            print(json.dumps(dict(stage=stage, step=step, **metrics)), file=log)
    bar.set_postfix_str(shown, refresh=False)
    stop = all_reduce(dict(stop=float(run.interrupted)), run.world, "sum")["stop"] > 0
    if stop or (step + 1) % run.tc.ckpt_every == 0 or step + 1 == total:
        run.save(stage, step + 1, model, optimizers, generators, extra)
    if stop:
        bar.n = step + 1   # the bar shows the step that was saved
        bar.close()
        raise KeyboardInterrupt(f"saved {run.path(stage)} at step {step + 1}; continue with --resume")

def adamw(params, lr: float):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

def set_lr(optimizer, step: int, total: int, base: float, warmup: int):
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(1, total - warmup), 1.0)))
    for group in optimizer.param_groups:
        group["lr"] = base * (step + 1) / warmup if step < warmup else base * decay

def train_sft(run: Run, model: GPT, task: DigitSumTask, gen_data, device):
    """Supervised fine-tuning of the backbone on house-style examples (answer tokens only)."""
    tc, params = run.tc, backbone_parameters(model)
    opt = adamw(params, tc.sft_lr)
    if (resumed := run.restore("sft", model, [opt], [gen_data])) is None:
        return
    model.train()
    for step in (bar := progress(run, "sft", resumed[0], tc.sft_steps)):
        set_lr(opt, step, tc.sft_steps, tc.sft_lr, warmup=min(100, tc.sft_steps // 10 + 1))
        seq, lengths = task.sft_batch(tc.batch_size // run.world, gen_data)   # this rank's share
        with autocast(tc, device):
            loss = sft_loss(model, seq.to(device), lengths.to(device))
        update(loss, opt, params, tc.grad_clip, functools.partial(average_gradients, world=run.world))
        m = all_reduce(dict(loss=loss.item()), run.world)
        after_step(run, "sft", step, tc.sft_steps, bar, m, f"loss {m['loss']:.3f}", model, [opt], [gen_data])

@torch.no_grad()
def policy_samples(model: GPT, task: DigitSumTask, n: int, generator, rank: int = 0, batch: int = 1024):
    """n answers the frozen policy writes at temperature 1, laid out like task.sft_batch: the paper's RFT data. On its
    own samples a hard-label CE target is a draw from p, so CE estimates what forward KL does."""
    device, seqs, lengths = model.lm_head.weight.device, [], []
    for i in tqdm(range(0, n, batch), desc="mtp data: the policy's answers", leave=False, disable=rank > 0):
        idx = task.prompts(min(batch, n - i), generator)[0]
        gen = torch.Generator(device).manual_seed(int(torch.randint(2**62, (), generator=generator)))
        out = generate(model.eval(), idx.to(device), task.max_new_tokens, generator=gen, eos=EOS)
        seqs.append(torch.cat([idx, out.new_tokens.cpu()], 1))
        lengths.append(PROMPT_LEN + out.mask.sum(1).cpu())
    return torch.cat(seqs), torch.cat(lengths)

def train_mtp(run: Run, model: GPT, task: DigitSumTask, gen_data, device, data=None):
    """Pre-RL MTP training, backbone frozen: one epoch over mtp_steps x batch_size of the policy's own answers. The
    first mtp_ce_warmup of the steps are CE, as real MTP heads come CE-pretrained: TV's gradient q (S - 1 + 1[q > p])
    vanishes where the head gives no mass, so a cold TV head never learns a rare but certain token (the end mark).
    data() hands in answers (and the backbone's outputs on them) that heads share."""
    tc, K, params = run.tc, model.config.mtp_train_steps, list(model.mtp.parameters())
    opt, B = adamw(params, tc.mtp_lr), tc.batch_size // run.world
    if (resumed := run.restore("mtp", model, [opt], [gen_data])) is None or resumed[0] >= tc.mtp_steps:
        return
    g = torch.Generator().manual_seed(tc.seed + 2 + 1000 * run.rank)   # a resumed run makes the same set again
    columns = data() if data is not None else policy_samples(model, task, tc.mtp_steps * B, g, run.rank)
    order = torch.randperm(len(columns[0]), generator=g)[:tc.mtp_steps * B]
    columns = [c[order.to(c.device)] for c in columns]
    model.train()
    for step in (bar := progress(run, "mtp", resumed[0], tc.mtp_steps)):
        set_lr(opt, step, tc.mtp_steps, tc.mtp_lr, warmup=min(50, tc.mtp_steps // 10 + 1))
        kind = "ce" if step < int(tc.mtp_ce_warmup * tc.mtp_steps) else tc.mtp_loss
        seq, lengths, *backbone = [c[step * B:(step + 1) * B] for c in columns]
        with autocast(tc, device):
            loss = mtp_training_loss(model, kind, seq.to(device), lengths.to(device), K, backbone or None)
        update(loss, opt, params, tc.grad_clip, functools.partial(average_gradients, world=run.world))
        m = dict(all_reduce(dict(loss=loss.item()), run.world), objective=kind)
        after_step(run, "mtp", step, tc.mtp_steps, bar, m, f"{kind} {m['loss']:.3f}", model, [opt], [gen_data])

def rollout_weights(model: GPT, precision: str) -> GPT:
    """What rollouts run on: the model itself in fp32; in bf16 a copy with bf16 weights (rotary tables stay float32),
    refreshed in place before every rollout, as an RL system syncs the trainer's weights into its inference engine
    (not autocast, which re-casts every weight on every forward: a graph cannot keep its cast cache)."""
    if precision == "fp32":
        return model
    copy = deepcopy(model).eval().requires_grad_(False)
    for p in copy.parameters():
        p.data = p.data.to(torch.bfloat16)
    return copy

@torch.no_grad()
def refresh_rollout_weights(policy: GPT, model: GPT):
    """Copy the trainer's weights into the rollout copy in place (addresses kept: captured graphs stay valid)."""
    for dst, src in zip(policy.parameters(), model.parameters()) if policy is not model else ():
        dst.copy_(src)

def train_grpo(run: Run, model: GPT, task: DigitSumTask, gen_data, gen_roll, device, held_out) -> dict:
    """GRPO around grpo_step, with this rank's prompts (a group stays on one rank), rollout weights and their CUDA
    graphs, gamma per step (auto: GammaChooser), numbers reduced over ranks, and on rank 0 the policy evaluated on the
    held-out prompts before the first and the middle step. Returns the checkpointed `extra` (those evaluations, the
    last steps' numbers) with pi_0 (`start`), the rollout weights and their graphs."""
    tc, G, K = run.tc, run.tc.group_size, model.config.mtp_train_steps
    opt = adamw(backbone_parameters(model), tc.rl_lr)
    mtp_opt = [adamw(model.mtp.parameters(), tc.mtp_online_lr)] if tc.mtp_online != "none" else []   # paper 5.3
    start = deepcopy(model).eval().requires_grad_(False)   # pi_0, where RL starts: the KL reference
    step0, extra = run.restore("grpo", model, [opt] + mtp_opt, [gen_data, gen_roll])
    if step0 > 0:
        start.load_state_dict(run.read(run.path("mtp"))["model"])
    policy = rollout_weights(model, tc.precision)
    graphs = CudaGraphs(policy) if tc.cuda_graphs and cuda_graphs_supported(device) else None
    if chooser := GammaChooser(K) if tc.gamma == "auto" else None:
        chooser.alphas, chooser.measured = extra.get("chooser", (chooser.alphas, chooser.measured))
    for step in (bar := progress(run, "grpo", step0, tc.rl_steps)):
        t0 = time.perf_counter()
        idx, S, N = task.prompts(tc.rl_prompts // run.world, gen_data)
        prompts = tuple(x.repeat_interleave(G, 0).to(device) for x in (idx, S, N))
        refresh_rollout_weights(policy, model)
        if run.rank == 0 and step in (0, tc.rl_steps // 2):
            extra.setdefault("evaluations", {})[str(step)] = evaluate(policy, start, task, held_out, tc.temperature,
                                                                      tc.seed)
        gamma = chooser(policy, len(prompts[0]), PROMPT_LEN, task.max_new_tokens, graphs) if chooser else tc.gamma
        roll, m = grpo_step(model, policy, opt, task, tc, prompts, gen_roll, gamma, graphs=graphs,
                            ref=start if tc.kl_coef else None, mtp_optimizer=mtp_opt[0] if mtp_opt else None,
                            sync=functools.partial(average_gradients, world=run.world))
        if chooser and gamma:
            chooser.observe(roll.stats)
            extra["chooser"] = (chooser.alphas, chooser.measured)
        for k in ("drafts_reached", "drafts_accepted"):   # ranks and steps may draft different lengths
            m[k] = (m[k] + [0] * K)[:K]
        metrics = dict(**all_reduce({k: m[k] for k in ("loss", "reward", "accuracy", "entropy", "rollout_s")},
                                    run.world), gamma=gamma, step_s=time.perf_counter() - t0,
                       **all_reduce({k: m[k] for k in ("tokens", "kept_tokens", "row_rounds", "drafts_reached",
                                                       "drafts_accepted")}, run.world, "sum"))
        metrics.update(tokens_per_s=metrics["tokens"] / metrics["rollout_s"],
                       accept_length=metrics["kept_tokens"] / max(1, metrics["row_rounds"]))
        chosen = extra.setdefault("gamma_chosen", {})
        chosen[str(gamma)] = chosen.get(str(gamma), 0) + 1
        extra["recent"] = (extra.get("recent", []) + [metrics])[-10:]
        after_step(run, "grpo", step, tc.rl_steps, bar, metrics, f"reward {metrics['reward']:.3f} H "
                   f"{metrics['entropy']:.2f} gamma {gamma} len {metrics['accept_length']:.2f}", model,
                   [opt] + mtp_opt, [gen_data, gen_roll], extra)
    refresh_rollout_weights(policy, model)   # the summary evaluates the policy after its last update
    return dict(extra, start=start, policy=policy, graphs=graphs)

# ---------------------------------------------------------------------------------------------------------------
# 12. Experiments: the paper's findings at toy scale, `python bebop.py --experiment NAME` (or all), from the default
# run's SFT checkpoint (out/sft.pt). Heads and RL runs are cached in out/exp_*, so an interrupted sweep resumes.
# Exact verification makes rollouts independent of the drafter, so every frozen head is measured on the same run's
# rollouts, teacher-forced (expected acceptance, no sampling noise).

EXPERIMENTS = ("losses", "temperature", "rl", "entropy", "decomposition", "boundary")
SEEDS = (0, 1, 2)                             # MTP-training seeds (initialisation, data order) of each loss's heads
TEMPERATURES = (0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5)
RULES = {"to": ("ce", "to"), "rs_ce": ("ce", "rs"), "rs_kl": ("kl", "rs"), "rs_e2e_tv": ("e2e_tv", "rs")}  # head, rule
RL_RUNS = {   # name: (learning rate, entropy bonus, online MTP loss, seeds)
    "recipe": (TrainConfig.rl_lr, 0.0, "none", (0, 1)),        # the default, small steps: the paper's regime
    "fast": (2e-4, 0.0, "none", (0, 1)),                       # 8x larger steps: the policy's law drifts fast
    "entropy_up": (1e-4, 0.2, "none", (0,)),                   # an entropy bonus moves H (Fig. 1a, Eq. 16)
    "entropy_down": (1e-4, -0.2, "none", (0,)),
    "online_ce": (TrainConfig.rl_lr, 0.0, "ce", (0,)),         # the head updated during RL (Fig. 9a)
    "online_e2e_tv": (TrainConfig.rl_lr, 0.0, "e2e_tv", (0,))}
ENTROPY_RUNS = ("entropy_up_s0", "entropy_down_s0", "recipe_s0", "recipe_s1")   # pooled for Fig. 1a
MIN_ENTROPY_CHANGE = 0.2   # nats: below it Eq. 16's entropy term b dH is undetermined, and is not reported

def held_out_prompts(task: DigitSumTask, n: int, task_seed: int, device):
    """Fixed evaluation prompts (idx, S, N), never trained on: drawn from their own seed."""
    return tuple(x.to(device) for x in task.prompts(n, torch.Generator().manual_seed(task_seed + 1)))

class Lab:
    """What the experiments share: the SFT policy (restored from --out, or trained there), its answers to train heads
    on, eval_prompts / 2 held-out prompts, fixed contexts (the SFT policy's answers to them), heads and rollouts."""

    def __init__(self, args):
        tc, self.task, self.cfg, self.device, _, _ = configure(args)
        torch.manual_seed(tc.seed)
        self.sft, self.out, self.heads, self.cache, self.columns = GPT(self.cfg).to(self.device), args.out, {}, {}, None
        self.overwrite = args.overwrite   # redo the heads and RL runs cached in --out
        with Run(args.out, tc, self.cfg, resume=True, stages=("sft",),
                 afresh="use another --out: experiments start from its sft.pt") as run:
            train_sft(run, self.sft, self.task, torch.Generator().manual_seed(tc.seed), self.device)
        # Heads train on half the default run's batch; RL runs take 2/5 of its steps and half its prompts: the budget.
        self.tc = replace(tc, gamma=3, batch_size=max(1, tc.batch_size // 2), rl_prompts=max(1, tc.rl_prompts // 2),
                          rl_steps=max(2, tc.rl_steps * 2 // 5))
        self.held = held_out_prompts(self.task, max(1, tc.eval_prompts // 2), tc.task_seed, self.device)
        ctx = generate(self.sft.eval(), self.held[0], self.task.max_new_tokens, eos=EOS,
                       generator=torch.Generator(self.device).manual_seed(tc.seed + 7))
        self.contexts, self.start = (ctx.tokens, ctx.mask), None

    def data(self):
        """The heads' training set: the SFT policy's answers, with the frozen backbone's outputs on them."""
        if self.columns is None:
            seq, lengths = policy_samples(self.sft, self.task, self.tc.mtp_steps * self.tc.batch_size,
                                          torch.Generator().manual_seed(self.tc.seed + 2))
            outs = [self.sft.backbone_outputs(chunk.to(self.device)) for chunk in seq.split(1024)]
            self.columns = (seq, lengths) + tuple(torch.cat(parts) for parts in zip(*outs))
        return self.columns

    def head(self, loss: str, seed: int = 0) -> GPT:
        """The SFT policy with an MTP layer trained by `loss` (every loss: the same budget, data and seed), kept in
        out/exp_mtp_{loss}_s{seed}/."""
        if (loss, seed) not in self.heads:
            tc, model = replace(self.tc, mtp_loss=loss, seed=self.tc.seed + seed), deepcopy(self.sft)
            torch.manual_seed(1000 + seed)
            model.mtp.load_state_dict(GPT(self.cfg).mtp.state_dict())   # this seed's fresh MTP layer
            with Run(f"{self.out}/exp_mtp_{loss}_s{seed}", tc, self.cfg, resume=not self.overwrite,
                     overwrite=self.overwrite, stages=("mtp",)) as r:
                train_mtp(r, model, self.task, torch.Generator().manual_seed(tc.seed), self.device, self.data)
            self.heads[loss, seed] = model.eval()
        return self.heads[loss, seed]

    def per_token(self, T: float) -> dict:
        """Per row of the e2e-TV head's RS rollouts at temperature T (exact: distributed as p), the depth-1 expected
        acceptance of each head teacher-forced on its kept tokens, and the policy's entropy H(p) there."""
        if ("tokens", T) not in self.cache:
            roll, rows = self.rollouts("e2e_tv", T), {}
            for head in ("ce", "kl", "e2e_tv"):
                tf = teacher_forced(self.head(head), roll.tokens, roll.mask, 1, T)
                for k, name in (("rs", f"rs_{head}"), ("to", f"to_{head}"), ("entropy", "entropy")):
                    rows[name] = [x[v] for x, v in zip(tf[k][..., 0], tf["valid"][..., 0])]
            self.cache["tokens", T] = rows
        return self.cache["tokens", T]

    def rollouts(self, loss: str, temperature=1.0, draft="sample", seed=0) -> Generation:
        """Speculative rollouts (gamma 3) of the held-out prompts with the head of (loss, seed)."""
        if (key := (loss, temperature, draft, seed)) not in self.cache:
            self.cache[key] = speculative_generate(self.head(loss, seed), self.held[0], self.task.max_new_tokens,
                                                   gamma=3, temperature=temperature, draft=draft, eos=EOS,
                                                   generator=torch.Generator(self.device).manual_seed(0))
        return self.cache[key]

def counted(roll: Generation, rows=slice(None)) -> float:
    """Counted accept length of some rows of a rollout: kept tokens after each row's first, over its rounds."""
    return ((roll.mask[rows].sum(1) - 1).sum() / roll.rounds[rows].sum().clamp(min=1)).item()

def experiment_losses(lab: Lab) -> dict:
    """Table 2: RS and TO tokens per forward at gamma 3 of heads trained with each loss, three seeds each: expected
    (teacher-forced on the fixed contexts, Eq. 12) and counted (held-out rollouts); and e2e TV minus each other loss,
    paired by seed, with a 95% t interval."""
    result, keys = {}, ("rs_expected", "rs_counted", "to_expected", "to_counted")
    for loss in MTP_LOSSES:
        rows = []
        for seed in SEEDS:
            tf = teacher_forced(lab.head(loss, seed), *lab.contexts, 3)
            rs, to = (masked_mean(tf[k], tf["valid"]).tolist() for k in ("rs", "to"))
            rows.append(dict(rs_alphas=rs, rs_expected=tokens_per_forward(rs), to_expected=tokens_per_forward(to),
                             **{f"{k}_counted": counted(lab.rollouts(loss, draft=d, seed=seed))
                                for k, d in (("rs", "sample"), ("to", "greedy"))}))
        result[loss] = dict(seeds=rows, **{k: mean_ci([r[k] for r in rows]) for k in keys})
    paired = lambda r, k: mean_ci([a[k] - b[k] for a, b in zip(result["e2e_tv"]["seeds"], r["seeds"])])
    result["e2e_tv_minus"] = {name: {k: paired(r, k) for k in keys} for name, r in result.items() if name != "e2e_tv"}
    minus = lambda loss, k: ci_text(*result["e2e_tv_minus"][loss][k]) if loss != "e2e_tv" else ""
    alphas = lambda r: "/".join(f"{sum(a) / len(a):.3f}" for a in zip(*[s["rs_alphas"] for s in r["seeds"]]))
    table(f"losses (paper Table 2: RS e2e_tv > tv > rkl >= kl = ce; TO < 0.3 points apart): tokens per forward at "
          f"gamma 3, mean of {len(SEEDS)} seeds, and e2e_tv minus each loss, paired by seed [95%]", [dict(
              loss=loss, rs_alphas=alphas(r), **{k: r[k][0] for k in keys},
              **{f"minus_{k}": minus(loss, k) for k in keys[:2]})
              for loss, r in list(result.items())[:-1]])
    return result

def experiment_temperature(lab: Lab) -> dict:
    """Fig. 12a: counted accept length of RS and TO rollouts across temperatures (CE and e2e-TV heads), and its change
    from the lowest to the highest temperature with a 95% interval over prompts (resampled jointly)."""
    result, lo, hi = {}, TEMPERATURES[0], TEMPERATURES[-1]
    for loss in ("ce", "e2e_tv"):
        for rule, d in (("rs", "sample"), ("to", "greedy")):
            dc = lambda i: counted(lab.rollouts(loss, hi, d), i) - counted(lab.rollouts(loss, lo, d), i)
            result[f"{rule}_{loss}"] = dict(accept_length=[counted(lab.rollouts(loss, T, d)) for T in TEMPERATURES],
                                            change=(dc(slice(None)), bootstrap(dc, len(lab.held[0]))))
    table("temperature (paper Fig. 12a: RS roughly flat, TO falls sharply as T rises): counted accept length", [
        dict(rule=k, **{f"T={T}": x for T, x in zip(TEMPERATURES, r["accept_length"])}, change=ci_text(*r["change"]))
        for k, r in result.items()])
    return result

def head_acceptance(model: GPT, heads: dict, tokens, mask) -> tuple:
    """Each head's expected RS and TO acceptance per depth on some answers, under `model`'s backbone (its MTP layer
    is overwritten), and the policy's mean entropy there: ({head: {rs, to}}, H)."""
    backbone, out = model.backbone_outputs(tokens), {}
    for name, state in heads.items():
        model.mtp.load_state_dict(state)
        tf = teacher_forced(model, tokens, mask, 3, backbone=backbone)
        out[name] = {k: masked_mean(tf[k], tf["valid"]).tolist() for k in ("rs", "to")}
    return out, masked_mean(tf["entropy"][..., 0], tf["valid"][..., 0]).item()

def rl_run(lab: Lab, name: str, seed: int) -> dict:
    """A GRPO run of RL_RUNS from the SFT policy and its seed-0 e2e-TV head. Rollouts are exact whoever drafts them, so
    they decode plainly (the cheapest here), and per step each head's expected acceptance is teacher-forced on an
    eighth of them and on 32 fixed contexts, with the policy's entropy there and KL(pi_t || pi_0) on the contexts;
    the held-out evaluation (evaluate) at both ends. Cached in out/exp_rl_{name}_s{seed}.json."""
    lr, coef, online, _ = RL_RUNS[name]
    tc, path = replace(lab.tc, rl_lr=lr, entropy_coef=coef, mtp_online=online), f"{lab.out}/exp_rl_{name}_s{seed}.json"
    if os.path.exists(path) and not lab.overwrite:
        now = {k: getattr(tc, k) for s in STAGES for k in STAGE_SETTINGS[s]}   # what the run's result depends on
        cached = json.load(open(path))
        if differ := changed(cached["train"], now) if "train" in cached else "it records none":
            raise RunError(f"{path} was made with other settings ({differ}); use the same flags, or --overwrite")
        return cached
    model = deepcopy(lab.head("e2e_tv"))
    start, scratch = deepcopy(model), deepcopy(model)
    heads = {h: lab.head(h).mtp.state_dict() for h in ("ce", "kl", "e2e_tv")}
    opt, mtp_opt = adamw(backbone_parameters(model), lr), adamw(model.mtp.parameters(), tc.mtp_online_lr)
    gen, gen_roll = torch.Generator().manual_seed(100 + seed), torch.Generator(lab.device).manual_seed(200 + seed)
    tokens, mask, steps = lab.contexts[0][:32], lab.contexts[1][:32], []
    for _ in tqdm(range(tc.rl_steps), desc=f"rl {name} seed {seed}", leave=False):
        prompts = tuple(x.repeat_interleave(tc.group_size, 0).to(lab.device)
                        for x in lab.task.prompts(tc.rl_prompts, gen))
        scratch.load_state_dict(model.state_dict())   # the weights that write this step's rollouts
        roll, m = grpo_step(model, model, opt, lab.task, tc, prompts, gen_roll, 0,
                            mtp_optimizer=mtp_opt if online != "none" else None)
        own = {"online": deepcopy(scratch.mtp.state_dict())} if online != "none" else {}
        rollouts, _ = head_acceptance(scratch, {**own, **heads}, roll.tokens[::8], roll.mask[::8])
        fixed, fixed_entropy = head_acceptance(scratch, heads, tokens, mask)
        steps.append(dict(reward=m["reward"], entropy=m["entropy"], rollouts=rollouts, fixed=fixed,
                          fixed_entropy=fixed_entropy, kl_to_start=kl_per_token(scratch, start, tokens, mask)))
    lab.start = lab.start or evaluate(start, start, lab.task, lab.held)
    result = dict(name=name, seed=seed, lr=lr, online=online, train=asdict(tc), steps=steps, start=lab.start,
                  end=evaluate(model, start, lab.task, lab.held))
    json.dump(result, open(path, "w"))
    return result


def series(run: dict, rule: str, where: str = "rollouts") -> list:
    """A run's expected tokens per forward (Eq. 12) per step, for a rule of RULES, on its rollouts or fixed contexts."""
    return [tokens_per_forward(s[where][RULES[rule][0]][RULES[rule][1]]) for s in run["steps"]]

def change(x: list, n: int = 10) -> float:
    return sum(x[-n:]) / n - sum(x[:n]) / n   # the last n values' mean minus the first n's

def experiment_rl(lab: Lab) -> dict:
    """The GRPO runs of RL_RUNS (Fig. 1a, 3, 6, 9a) and the regimes compared: held-out reward and the frozen head's
    counted acceptance, start -> end; and its fixed-context alpha_1 change by the KL to pi_0 the recipe runs reach."""
    runs = {f"{name}_s{seed}": rl_run(lab, name, seed) for name, (*_, seeds) in RL_RUNS.items() for seed in seeds}
    kl = min(r["steps"][-1]["kl_to_start"] for key, r in runs.items() if key.startswith("recipe"))
    ends = lambda x: f"{sum(x[:10]) / 10:.2f} -> {sum(x[-10:]) / 10:.2f}"
    for r in runs.values():
        a1 = [s["fixed"]["e2e_tv"]["rs"][0] for s in r["steps"]]
        r["alpha1_change_at_matched_kl"] = next((a - a1[0] for a, s in zip(a1, r["steps"])
                                                 if s["kl_to_start"] >= kl), None)
    table(f"rl: GRPO runs of {lab.tc.rl_steps} steps x {lab.tc.rl_prompts} prompts x {lab.tc.group_size}, the e2e-TV "
          f"head frozen unless online: held-out reward and counted accept length, start -> end; entropy and expected "
          f"accept length, first -> last 10 steps; the fixed-context alpha_1 change by KL(pi_t || pi_0) = {kl:.4f}",
          [dict(
              run=k, lr=f"{r['lr']:.1e}", entropy=ends([s["entropy"] for s in r["steps"]]),
              reward=f"{r['start']['reward']:.3f} -> {r['end']['reward']:.3f}",
              counted=f"{r['start']['counted']:.2f} -> {r['end']['counted']:.2f}",
              expected=ends(series(r, "rs_e2e_tv")), kl_to_start=r["steps"][-1]["kl_to_start"],
              alpha1_at_kl=r["alpha1_change_at_matched_kl"] if r["alpha1_change_at_matched_kl"] is not None else "n/a",
              online_head=ends([tokens_per_forward(s["rollouts"]["online"]["rs"]) for s in r["steps"]])
              if r["online"] != "none" else "") for k, r in runs.items()])
    return dict(runs=runs, matched_kl=kl)

def slope_ci(xs: list, ys: list, block: int = 0) -> tuple:
    """Slope of y on x with a 95% interval: xs, ys lists of runs' series (whole runs resampled), or one run's series
    and block > 0 (a moving-block bootstrap of consecutive steps)."""
    pick = lambda runs, i: [runs[j] for j in i] if block else [v for j in i for v in runs[j]]
    slope = lambda i: lstsq(pick(ys, i), pick(xs, i))[1]
    return slope(range(len(xs))), bootstrap(slope, len(xs), min(block, len(xs)) or 1)

def experiment_entropy(lab: Lab, rl: dict) -> dict:
    """Fig. 1a in the paper's units: expected tokens per forward (gamma 3) against the policy's mean entropy, a point
    per RL step, pooled over ENTROPY_RUNS (95%: whole runs resampled) and per run (moving blocks of 10 steps). And the
    policy fixed: alpha_1 against H(p) per token of held-out rollouts at T = 0.7, 1.0, 1.3 (95%: rows resampled), with
    the RS-e2eTV slope minus the RS-CE slope on the same tokens."""
    runs = [rl["runs"][key] for key in ENTROPY_RUNS]
    H = [[s["entropy"] for s in r["steps"]] for r in runs]
    result = dict(pooled={rule: slope_ci(H, [series(r, rule) for r in runs]) for rule in RULES},
                  per_run={k: {rule: slope_ci(h, series(r, rule), 10) for rule in RULES}
                           for k, r, h in zip(ENTROPY_RUNS, runs, H)})
    rows = {k: sum((lab.per_token(T)[k] for T in (0.7, 1.0, 1.3)), [])
            for k in ("entropy", "to_ce", "rs_ce", "rs_e2e_tv")}
    slope = lambda rule, i: lstsq(torch.cat([rows[rule][j] for j in i]), torch.cat([rows["entropy"][j] for j in i]))[1]
    stats = {rule: functools.partial(slope, rule) for rule in ("to_ce", "rs_ce", "rs_e2e_tv")}
    stats["rs_e2e_tv_minus_rs_ce"] = lambda i: slope("rs_e2e_tv", i) - slope("rs_ce", i)
    n = len(rows["entropy"])
    result["per_token"] = {k: (fn(range(n)), bootstrap(fn, n, draws=300)) for k, fn in stats.items()}
    table("entropy (paper Fig. 1a: tokens per forward per nat of policy entropy, a point per RL step, runs pooled: TO "
          "-1.68, RS-CE -1.68, RS-TV -0.06): pooled [95%, runs resampled], and per run [moving blocks of 10 steps]",
          [dict(rule=rule, pooled=ci_text(*v), **{k: ci_text(*p[rule]) for k, p in result["per_run"].items()})
           for rule, v in result["pooled"].items()])
    table("entropy, the policy fixed: alpha_1 per nat of H(p), per token of held-out rollouts [95%, rows resampled]",
          [dict(rule=k, slope=ci_text(*v)) for k, v in result["per_token"].items()])
    return result

def decompose(H: list, alpha: list, block: int = 5) -> dict:
    """Eq. 16 for one run: the change of alpha (last 10 steps against the first 10) = b dH + residual (the mismatch),
    b the slope of alpha on H over the first third of the run, fitted with a linear trend in the step as well so that
    a drift that starts early is not taken for entropy (Eq. 16 assumes none); b's interval: moving blocks of steps."""
    n = min(len(H), max(len(H) // 3, 4 * block))
    fit = lambda i: lstsq([alpha[j] for j in i], [H[j] for j in i], list(i))[1]
    b = fit(range(n))
    return dict(b=b, b_ci=bootstrap(fit, n, min(block, n)), delta=change(alpha), entropy_term=b * change(H),
                residual=change(alpha) - b * change(H))

def experiment_decomposition(lab: Lab, rl: dict) -> dict:
    """Eq. 16 / Fig. 3 per rule, for every RL run whose entropy moved at least MIN_ENTROPY_CHANGE nats: the change of
    expected tokens per forward = entropy term + residual on its rollouts, and on the fixed contexts with the same b
    (fixed contexts remove the change in which contexts are visited, not the change of p_t, entropy included, on them).
    Every run: the fixed-context changes of H and of each rule, KL to pi_0, held-out reward gained."""
    result, rows = {}, []
    for key, r in rl["runs"].items():
        H, Hf = [s["entropy"] for s in r["steps"]], [s["fixed_entropy"] for s in r["steps"]]
        e = result[key] = dict(entropy_change=change(H), fixed_entropy_change=change(Hf), rules={},
                               fixed_change={rule: change(series(r, rule, "fixed")) for rule in RULES},
                               kl_to_start=r["steps"][-1]["kl_to_start"],
                               reward_gain=r["end"]["reward"] - r["start"]["reward"])
        for rule in RULES if abs(e["entropy_change"]) >= MIN_ENTROPY_CHANGE else ():
            d = e["rules"][rule] = decompose(H, series(r, rule))
            d.update(fixed_delta=e["fixed_change"][rule], fixed_entropy_term=d["b"] * change(Hf))
            d["fixed_residual"] = d["fixed_delta"] - d["fixed_entropy_term"]
            rows.append(dict(run=key, rule=rule, b=ci_text(d["b"], d["b_ci"]), **{k: d[k] for k in (
                "delta", "entropy_term", "residual", "fixed_delta", "fixed_entropy_term", "fixed_residual")}))
        if not e["rules"]:
            e["untestable"] = f"entropy moved {e['entropy_change']:+.3f} nats, under {MIN_ENTROPY_CHANGE}: b dH is 0"
    table(f"decomposition (paper Eq. 16 / Fig. 3: TO both terms, RS-CE mostly entropy, RS-TV near zero in both): "
          f"runs with |dH| >= {MIN_ENTROPY_CHANGE} nats, change of expected tokens per forward, last - first 10 steps "
          f"= b dH + residual (b [95%, moving blocks of 5 steps]), on the rollouts and on the fixed contexts",
          rows or [dict(runs="none")])
    table("decomposition, every run on the fixed contexts: changes of H and of each rule; KL(pi_t || pi_0); held-out "
          "reward gained", [dict(run=k, dH=e["entropy_change"], dH_fixed=e["fixed_entropy_change"], **e["fixed_change"],
                          kl_to_start=e["kl_to_start"], reward_gain=e["reward_gain"]) for k, e in result.items()])
    return result

def experiment_boundary(lab: Lab) -> dict:
    """App. E / Fig. 13: which rule wins. Per head and temperature (the paper's model-task pairs), the winner by counted
    alpha_1 of RS and TO rollouts; per token (Eq. 48: RS wins iff d_TV < 1 - p(argmax q)), the share RS wins, by
    entropy."""
    result, bins = {}, (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, math.inf)
    H = torch.cat([torch.cat(lab.per_token(T)["entropy"]) for T in TEMPERATURES])
    for loss in ("ce", "kl", "e2e_tv"):
        pairs = [dict(temperature=T, **{k: lab.rollouts(loss, T, d).stats["acceptance"][0] for k, d in zip(("rs", "to"),
                 DRAFT_RULES)}) for T in TEMPERATURES]
        wins = torch.cat([torch.cat(lab.per_token(T)[f"rs_{loss}"]) > torch.cat(lab.per_token(T)[f"to_{loss}"])
                          for T in TEMPERATURES]).float()
        result[loss] = dict(pairs=pairs, rs_wins_pairs=sum(p["rs"] > p["to"] for p in pairs), tokens=len(H),
                            rs_wins_tokens=wins.mean().item(), by_entropy={
                                f"H {lo:g}-{hi:g}": wins[(H >= lo) & (H < hi)].mean().item()
                                for lo, hi in zip(bins, bins[1:]) if ((H >= lo) & (H < hi)).any()})
    table(f"boundary (paper App. E / Fig. 13: RS wins 23 of 24 model-task pairs; per token iff d_TV < 1 - p(argmax q)):"
          f" temperatures (of {len(TEMPERATURES)}) where RS wins by counted alpha_1; the share of tokens RS wins, by "
          f"entropy",
          [dict(head=loss, rs_wins=str(r["rs_wins_pairs"]), tokens=r["rs_wins_tokens"], **r["by_entropy"])
           for loss, r in result.items()])
    return result

def run_experiments(args) -> dict:
    """Run the named experiment, or all, and update out/experiments.json: a key per experiment, holding what its
    function returns (per-seed and per-step values, each estimate with its 95% interval as (value, (low, high)))."""
    t0, lab, took = time.time(), Lab(args), {}
    path = os.path.join(args.out, "experiments.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    for name in EXPERIMENTS if args.experiment == "all" else (args.experiment,):
        t = time.time()
        if name in ("entropy", "decomposition") and "rl" not in took:   # both read the rl runs (cached on disk)
            results["rl"], took["rl"] = experiment_rl(lab), time.time() - t
        fn = globals()[f"experiment_{name}"]
        results[name] = fn(lab, results["rl"]) if name in ("entropy", "decomposition") else fn(lab)
        took[name] = time.time() - t
        json.dump(results, open(path, "w"), indent=1)
    print(f"\nexperiments done in {time.time() - t0:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in took.items())
          + f"); results in {path}")
    return results

# ---------------------------------------------------------------------------------------------------------------
# 13. Benchmark: `python bebop.py --bench`. Speed claims are ratios measured side by side in one run.

def alternate(kinds, one, calls: int, seconds_each: float, device) -> dict:
    """Time one(kind, r) for call r = 1, 2, ... of every kind, the kinds alternated call by call (so that the machine's
    noise hits all alike), until each has run `calls` calls and `seconds_each` seconds, after an untimed call r = 0
    each. Returns {kind: [(seconds, what one returned) per call]}."""
    for kind in kinds:
        one(kind, 0)
    out = {kind: [] for kind in kinds}
    while min(len(v) for v in out.values()) < calls or min(sum(t for t, _ in v) for v in out.values()) < seconds_each:
        for kind, v in out.items():
            v.append(seconds(functools.partial(one, kind, len(v) + 1), device))
    return out

def spread(ratios) -> tuple:
    """(median, min, max) of per-call ratios."""
    ratios = sorted(ratios)
    return ratios[len(ratios) // 2], ratios[0], ratios[-1]

def time_rollouts(model: GPT, prompts, B: int, max_new_tokens: int, modes, seconds_each=2.0, calls=6, graphs=None):
    """Tokens/s of decoding B prompts per mode (0 plain, 1..K that gamma, "auto"), alternated call by call; call r
    decodes prompts r*B.. with seed r in every mode. Per mode: tokens_per_s (calls pooled), ratio_to_plain (spread over
    calls of its tokens/s over the first mode's in the same call), accept_length, calls, chosen ({gamma: calls})."""
    chooser = GammaChooser(model.config.mtp_train_steps)

    @torch.no_grad()
    def one(mode, r):
        idx = prompts[(r * B + torch.arange(B, device=prompts.device)) % len(prompts)]
        gamma = chooser(model, B, idx.size(1), max_new_tokens, graphs) if mode == "auto" else mode
        kw = dict(generator=torch.Generator(prompts.device).manual_seed(r), eos=EOS, graphs=graphs)
        out = speculative_generate(model, idx, max_new_tokens, gamma=gamma, **kw) if gamma else \
            generate(model, idx, max_new_tokens, **kw)
        if mode == "auto" and gamma:
            chooser.observe(out.stats)
        hist = out.stats["accept_histogram"]
        return out.mask.sum().item(), kept_tokens(hist), sum(hist), gamma
    rec = alternate(modes, one, calls, seconds_each, prompts.device)
    rate = lambda call: call[1][0] / call[0]
    return {m: dict(tokens_per_s=sum(c[1][0] for c in v) / sum(c[0] for c in v), calls=len(v),
                    ratio_to_plain=spread(rate(c) / rate(p) for c, p in zip(v, rec[modes[0]])),
                    accept_length=sum(c[1][1] for c in v) / max(1, sum(c[1][2] for c in v)),
                    chosen={g: [c[1][3] for c in v].count(g) for g in sorted({c[1][3] for c in v})})
            for m, v in rec.items()}

def time_grpo_steps(model: GPT, task: DigitSumTask, tc: TrainConfig, device, kinds: dict, steps: int) -> dict:
    """Seconds of a GRPO step (grpo_step: rollouts and update) per kind of rollout ({name: gamma or "auto"}), the kinds
    alternated step by step, each on its own copy of the model, optimizer and rollout weights (as train_grpo keeps
    them), on the same prompts and seeds. Per kind: seconds (mean), ratio_to_plain (spread over steps of the first
    kind's time over this one's), gammas."""
    graphs = tc.cuda_graphs and cuda_graphs_supported(device)
    runs = {k: dict(model=(m := deepcopy(model)), opt=adamw(backbone_parameters(m), tc.rl_lr),
                    policy=(p := rollout_weights(m, tc.precision)), graphs=CudaGraphs(p) if graphs else None,
                    chooser=GammaChooser(model.config.mtp_train_steps)) for k in kinds}
    data = torch.Generator().manual_seed(0)
    prompts = [tuple(x.repeat_interleave(tc.group_size, 0).to(device) for x in task.prompts(tc.rl_prompts, data))
               for _ in range(steps + 1)]

    def one(kind, step):
        r, gamma = runs[kind], kinds[kind]
        refresh_rollout_weights(r["policy"], r["model"])
        g = gamma if gamma != "auto" else r["chooser"](r["policy"], len(prompts[0][0]), PROMPT_LEN, task.max_new_tokens,
                                                       r["graphs"])
        roll, _ = grpo_step(r["model"], r["policy"], r["opt"], task, tc, prompts[step % len(prompts)],
                            torch.Generator(device).manual_seed(step), g, graphs=r["graphs"])
        if gamma == "auto" and g:
            r["chooser"].observe(roll.stats)
        return g
    rec = alternate(list(kinds), one, steps, 0.0, device)
    first = rec[next(iter(kinds))]
    return {k: dict(seconds=sum(t for t, _ in v) / len(v), gammas=[g for _, g in v],
                    ratio_to_plain=spread(p[0] / c[0] for c, p in zip(v, first))) for k, v in rec.items()}

def tv_memory_probe(variant: str, device: str, rows=768, vocab=32768, hidden=512, K=3) -> float:
    """MB of peak memory above the inputs (hidden states (rows, hidden), head weight (vocab, hidden), p (rows, vocab))
    of forward + backward of the head's matmul and a TV loss. variant "{plain,lean}_{tv,e2e}": plain autograd of the
    formula, or the memory-lean TVDistance fused with the head; per-step TV, or Eq. 13 on rows/K chains of K steps.
    CUDA: max_memory_allocated; CPU: the peak resident set (Linux), so a fresh process per variant (the peak never
    goes down), after the same at a tiny size (code paged in, not counted)."""
    cuda = device.startswith("cuda")
    peak = lambda: torch.cuda.max_memory_allocated() if cuda else next(
        int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    if rows > 8 * K:
        tv_memory_probe(variant, device, 8 * K, 64, 16, K)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(rows, hidden, device=device, generator=g).requires_grad_(True)
    weight = torch.randn(vocab, hidden, device=device, generator=g) / hidden ** 0.5
    p = torch.rand(rows, vocab, device=device, generator=g)
    p /= p.sum(-1, keepdim=True)   # in place: no freed temporary that the loss could reuse unseen
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:   # Linux: "5" resets the peak resident set to the current one
        open("/proc/self/clear_refs", "w").write("5")
    base = torch.cuda.memory_allocated() if cuda else peak()
    alpha = 1 - tv_distance(x, p, head_weight=weight) if variant.startswith("lean") else \
        torch.minimum(p, F.softmax(x @ weight.T, -1)).sum(-1)
    loss = (1 - alpha).mean() if variant.endswith("tv") else (1 - torch.cumprod(alpha.view(-1, K), 1).mean(1)).mean()
    loss.backward()
    return (peak() - base) / 2**20

def tv_memory_benchmark(device: str) -> dict:
    """{variant: MB} of tv_memory_probe, each variant in its own process."""
    import subprocess
    code = "import bebop, sys; print(bebop.tv_memory_probe(sys.argv[1], sys.argv[2]))"
    run = lambda v: subprocess.run([sys.executable, "-c", code, v, str(device)], capture_output=True, text=True,
                                   check=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout
    return {v: float(run(v).split()[-1]) for v in ("plain_tv", "lean_tv", "plain_e2e", "lean_e2e")}

def run_benchmark(args) -> list:
    """`python bebop.py --bench` on the preset's SFT policy and MTP layer (trained, or restored from --out), side by
    side: tokens/s of plain decoding, each gamma and auto at several batches (with and without CUDA graphs on a GPU);
    the pieces of a round; a GRPO step per kind of rollout; the memory-lean TV loss against plain autograd. Writes
    out/bench.json, a row per measurement: mode "plain" or "spec" (gamma: an int or "auto"), batch, cuda_graphs,
    tokens_per_s, accept_length, calls, ratio_to_plain (median, min, max over calls), chosen ({gamma: calls}); mode
    "pieces" (seconds of a plain step t_plain and of rounds t_round for gamma 1..5; their least-squares fixed part
    t_fixed and part per drafted token t_per_draft; ideal_speedup = gamma 3's accept length x t_plain / its round;
    achieved); mode "grpo_step" (rollout, seconds, ratio_to_plain, gammas); mode "tv_memory" (variant, peak_mb)."""
    tc, task, cfg, device, _, _ = configure(args)
    torch.manual_seed(tc.seed)
    model, cuda, rows = GPT(cfg).to(device), device.startswith("cuda"), []
    with Run(args.out, tc, cfg, resume=True, stages=("sft", "mtp"),
             afresh="use another --out: the bench times the run in it") as run:
        train_sft(run, model, task, gen := torch.Generator().manual_seed(tc.seed), device)
        train_mtp(run, model, task, gen, device)
    policy, held = rollout_weights(model.eval(), tc.precision), held_out_prompts(task, 512, tc.task_seed, device)[0]
    modes, K = [0, *range(1, cfg.mtp_train_steps + 1), "auto"], cfg.mtp_train_steps
    each, calls = (0.1, 3) if tc.preset == "tiny" else (3.0, 8)   # seconds and calls per mode, at least
    for B in (1, 16, 64, 256) if cuda else (1, 4, 16, tc.rl_prompts * tc.group_size):
        for graphs in (False, True) if cuda_graphs_supported(device) and tc.cuda_graphs else (False,):
            speed = time_rollouts(policy, held, B, task.max_new_tokens, modes, each, calls,
                                  CudaGraphs(policy) if graphs else None)
            rows += [dict(mode="spec" if m else "plain", gamma=m or None, batch=B, cuda_graphs=graphs, **speed[m])
                     for m in modes]
            c = round_costs(policy, B, PROMPT_LEN, task.max_new_tokens, K, graphs)   # the pieces of a round
            fixed, per_draft = lstsq(c[1:], range(1, K + 1))
            rows.append(dict(mode="pieces", batch=B, cuda_graphs=graphs, t_plain=c[0], t_round=c[1:], t_fixed=fixed,
                             t_per_draft=per_draft, ideal_speedup=speed[3]["accept_length"] * c[0] / c[3],
                             achieved=speed[3]["ratio_to_plain"][0]))
            table(f"batch {B}, CUDA graphs {'on' if graphs else 'off'}: tokens/s, {calls}+ calls per mode alternated, "
                  f"and each mode over plain in the same call, median [min-max]", [dict(
                      mode=str(m), tokens_per_s=x["tokens_per_s"], accept_length=x["accept_length"],
                      chose=str(x["chosen"]), over_plain="{:.2f}x [{:.2f}-{:.2f}]".format(*x["ratio_to_plain"]))
                      for m, x in speed.items()])
    table("the pieces of a round, ms: a plain step; a round as a fixed part + a part per drafted token (least squares "
          "over gamma 1..5); gamma 3: the round, the speedup its cost allows at its accept length, the one measured",
          [dict(batch=str(r["batch"]), graphs=str(r["cuda_graphs"]), t_plain=r["t_plain"] * 1e3, t_fixed=r["t_fixed"] *
                1e3, t_per_draft=r["t_per_draft"] * 1e3, t_round_3=r["t_round"][2] * 1e3, ideal=r["ideal_speedup"],
                achieved=r["achieved"]) for r in rows if r["mode"] == "pieces"])
    grpo = time_grpo_steps(model, task, tc, device, dict(plain=0, spec=3, auto="auto"), calls)
    rows += [dict(mode="grpo_step", rollout=k, batch=tc.rl_prompts * tc.group_size, **v) for k, v in grpo.items()]
    table(f"GRPO step, {tc.rl_prompts} prompts x {tc.group_size}, {calls} steps each, kinds alternated", [dict(
        rollout=k, seconds=v["seconds"], plain_time_over_this="{:.2f}x [{:.2f}-{:.2f}]".format(*v["ratio_to_plain"]),
        gammas=str(v["gammas"])) for k, v in grpo.items()])
    tv = tv_memory_benchmark(device)
    rows += [dict(mode="tv_memory", variant=k, peak_mb=v) for k, v in tv.items()]
    table("TV loss + head matmul, forward + backward, 768 rows x vocabulary 32768 x hidden 512: peak memory above the "
          "inputs, MB, a process each", [dict(**{k: f"{v:.0f}" for k, v in tv.items()})])
    json.dump(rows, open(os.path.join(args.out, "bench.json"), "w"), indent=1)
    return rows

# ---------------------------------------------------------------------------------------------------------------
# 14. main(): a flag per TrainConfig field, SFT -> MTP training -> GRPO, and the summary.

RANGES = dict(seed=(0, 2**63 - 1), task_seed=(0, 2**63 - 1), gamma=(0, GPTConfig.mtp_train_steps), mtp_ce_warmup=(0, 1),
              group_size=(2, 2**16), batch_size=(1, 2**16), rl_prompts=(1, 2**16), eval_prompts=(1, 2**16),
              entropy_coef=(-100, 1e6))   # else 1..10^7 for integers, [0, 10^6] for numbers
POSITIVE = ("sft_lr", "mtp_lr", "rl_lr", "mtp_online_lr", "clip_eps", "grad_clip", "temperature")   # above 0

def flag_value(name: str, text: str):
    """The value of --name from its text, or an error that says what is allowed."""
    kind, gamma = int if name == "gamma" else type(getattr(TrainConfig, name)), name == "gamma"
    low, high = RANGES.get(name, (1, 10**7) if kind is int else (0, 1e6))
    with suppress(ValueError):
        if math.isfinite(value := kind(text)) and low <= value <= high and (value > 0 or name not in POSITIVE):
            return value
    if gamma and text == "auto":
        return text
    allowed = f"an integer in {low}..{high}" if kind is int else \
        f"a finite number in {'(' if name in POSITIVE else '['}{low:g}, {high:g}]"
    allowed = "auto, or " * gamma + allowed + " (0: plain rollouts)" * gamma
    raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")

def parse_args(argv=None):
    """The run's own flags, then a flag per TrainConfig field with the field's comment as help; a field not given is
    None, and configure() takes the preset's value or TrainConfig's."""
    ap = argparse.ArgumentParser(description="The Bebop recipe at toy scale: SFT, pre-RL MTP training, GRPO with MTP "
                                 "speculative rollouts verified by exact rejection sampling.", allow_abbrev=False)
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    ap.add_argument("--out", default="out", help="folder of checkpoints, log.jsonl, summary.json (default: out)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out (same flags)")
    ap.add_argument("--overwrite", action="store_true", help="start afresh where --out holds another run's checkpoints "
                    "(with --experiment: redo its heads and RL runs, keeping the SFT policy)")
    ap.add_argument("--bench", action="store_true", help="time speculative against plain decoding (out/bench.json)")
    ap.add_argument("--experiment", choices=EXPERIMENTS + ("all",), help="the paper's findings (out/experiments.json)")
    comments = dict(re.findall(r"^    (\w+): .*?# (.*)$", inspect.getsource(TrainConfig), re.M))
    choices = dict(preset=tuple(PRESETS), mtp_loss=MTP_LOSSES, draft=DRAFT_RULES,
                   mtp_online=("none",) + MTP_LOSSES, precision=("bf16", "fp32"))
    for f in fields(TrainConfig):
        default = ", ".join([str(f.default)] + [f"{p} preset {v[f.name]}" for p, v in PRESETS.items() if f.name in v])
        kind = dict(action=argparse.BooleanOptionalAction) if f.name == "cuda_graphs" else dict(
            choices=choices[f.name]) if f.name in choices else dict(type=functools.partial(flag_value, f.name))
        ap.add_argument("--" + f.name.replace("_", "-"), help=f"{comments[f.name]} (default: {default})", **kind)
    args = ap.parse_args(argv)
    for bad, why in ((args.device == "cuda" and not torch.cuda.is_available(), "--device cuda: no CUDA on this host"),
                     (args.resume and args.overwrite, "--resume continues the run in --out, --overwrite replaces it"),
                     (args.bench and args.experiment, "--bench and --experiment are separate jobs"),
                     (args.bench and args.overwrite, "--bench times the run in --out, --overwrite replaces it"),
                     ((args.bench or args.experiment) and "RANK" in os.environ,
                      ("--bench" if args.bench else "--experiment") + " runs in one process, not under torchrun")):
        if bad:
            ap.error(why + ": choose one" * ("--" in why[2:]))
    return args

def configure(args):
    """(train config, task, model config, device, rank, world size); the train config is TrainConfig's defaults, then
    the preset's values, then the flags given."""
    rank, world, device = setup_ranks(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.startswith("cuda"):   # TF32 tensor cores for the float32 matmuls
        torch.set_float32_matmul_precision("high")
    preset = args.preset or ("gpu" if device.startswith("cuda") else "cpu")
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    tc = TrainConfig(**{**{k: v for k, v in PRESETS[preset].items() if k != "model"}, **given, "preset": preset})
    if tc.rl_prompts * tc.group_size > 2**16:
        raise RunError(f"--rl-prompts {tc.rl_prompts} x --group-size {tc.group_size} rollouts per step: at most 65536")
    if tc.batch_size % world or tc.rl_prompts % world:
        raise RunError(f"--batch-size {tc.batch_size} and --rl-prompts {tc.rl_prompts} must divide by {world} ranks")
    task = DigitSumTask(seed=tc.task_seed)
    return tc, task, build_config(tc, task), device, rank, world

def train(args):
    """SFT -> pre-RL MTP training -> GRPO -> the summary (rank 0). Returns (model, summary)."""
    tc, task, cfg, device, rank, world = configure(args)
    torch.manual_seed(tc.seed)   # the same initial weights on every rank
    model = GPT(cfg).to(device)
    with Run(args.out, tc, cfg, args.resume, args.overwrite, rank, world) as run:
        if rank == 0:
            size = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"bebop: preset {tc.preset} on {device} x {world}, {size:.2f}M parameters ({cfg.n_layer} layers + 1 "
                  f"MTP layer, d={cfg.n_embd}); task: write N digits that sum to S")
        gen_data = torch.Generator().manual_seed(tc.seed + 1000 * rank)   # each rank its own data and rollouts
        gen_roll = torch.Generator(device).manual_seed(tc.seed + 1 + 1000 * rank)
        held_out = held_out_prompts(task, tc.eval_prompts, tc.task_seed, device)
        train_sft(run, model, task, gen_data, device)
        train_mtp(run, model, task, gen_data, device)
        rl = train_grpo(run, model, task, gen_data, gen_roll, device, held_out)
    summary = summarize(run, task, held_out, rl, device) if rank == 0 else None   # all saved: Ctrl-C here stops at once
    if world > 1:
        dist.destroy_process_group()
    return model, summary

def summarize(run: Run, task: DigitSumTask, held_out, rl: dict, device) -> dict:
    """The policy on the held-out prompts at the start, middle and end of RL (evaluate), and rollout speed at the RL
    batch side by side with plain decoding: printed, and written to summary.json: reward_before / _after and
    reward_gain_ci (95%, prompts resampled), accuracy_before / _after, frozen_head (per stage: counted, rs, to, kl),
    acceptance (per depth) and accept_length over the last steps that drafted, entropy, tokens_per_s and
    rollout_speedup at rollout_batch, gamma_chosen_in_rl ({gamma: steps}), wall_seconds (the run's, resumes added)."""
    tc, n, B, recent = run.tc, len(held_out[0]), run.tc.rl_prompts * run.tc.group_size, rl["recent"]
    ev = {k: rl["evaluations"][str(step)] for k, step in (("start", 0), ("middle", tc.rl_steps // 2))}
    ev["end"] = evaluate(rl["policy"], rl["start"], task, held_out, tc.temperature, tc.seed)
    before, after, drafting = ev["start"], ev["end"], [m for m in recent if m["gamma"]]
    gain = [a - b for a, b in zip(after["rewards"], before["rewards"])]
    ci, modes = bootstrap(lambda i: sum(gain[j] for j in i) / n, n), [0, *dict.fromkeys(m for m in (3, tc.gamma) if m)]
    speed = time_rollouts(rl["policy"], held_out[0], B, task.max_new_tokens, modes, 0.1 if tc.preset == "tiny" else 2.0,
                          graphs=rl["graphs"])
    per_depth = lambda key: [sum(c) for c in zip(*[m[key] for m in drafting])]   # summed over the drafting steps
    accepted, reached = per_depth("drafts_accepted"), per_depth("drafts_reached")
    kept, row_rounds = sum(m["kept_tokens"] for m in drafting), sum(m["row_rounds"] for m in drafting)
    summary = dict(preset=tc.preset, device=str(device), gamma=tc.gamma, eval_prompts=n,
                   reward_before=before["reward"], reward_after=after["reward"], reward_gain_ci=ci,
                   accuracy_before=before["accuracy"], accuracy_after=after["accuracy"],
                   frozen_head={k: {m: e[m] for m in ("counted", "rs", "to", "kl")} for k, e in ev.items()},
                   acceptance=[a / r if r else None for a, r in zip(accepted, reached)],
                   accept_length=kept / max(1, row_rounds) or 1.0, rollout_batch=B,
                   entropy=sum(m["entropy"] for m in recent) / max(1, len(recent)),
                   rollout_speedup=speed[tc.gamma]["tokens_per_s"] / speed[0]["tokens_per_s"],
                   tokens_per_s={str(m): speed[m]["tokens_per_s"] for m in modes}, wall_seconds=time.time() - run.t0,
                   gamma_chosen_in_rl=rl.get("gamma_chosen"))
    json.dump(summary, open(os.path.join(run.out, "summary.json"), "w"), indent=2)
    smoke = " (preset tiny: a smoke test, too small and short to learn the task)" * (tc.preset == "tiny")
    table(f"GRPO, {tc.rl_steps} steps{smoke}: the policy on {n} held-out prompts, and its frozen MTP layer drafting at "
          f"gamma 3 (tokens per forward: counted; expected, teacher-forced, RS and TO)", [dict(
              when=k, reward=e["reward"], exactly_right=e["accuracy"], counted=e["counted"], expected_rs=e["rs"],
              expected_to=e["to"], kl_to_start=e["kl"]) for k, e in ev.items()])
    verdict = "raised" if ci[0] > 0 else "lowered" if ci[1] < 0 else "not measurably changed"
    drafted = ", ".join(f"{'nothing (plain)' if g == '0' else g} on {k} step" + "s" * (k > 1)
                        for g, k in summary["gamma_chosen_in_rl"].items())
    speeds = ", ".join(f"{m if m == 'auto' else f'gamma {m}' if m else 'plain'} {speed[m]['tokens_per_s']:.0f}"
                       for m in modes)
    per_call = "{:.2f}x [{:.2f}-{:.2f}]".format(*speed[tc.gamma]["ratio_to_plain"])   # noise between calls
    print(f"  held-out reward {verdict}: {sum(gain) / n:+.3f} [95% over prompts {ci[0]:+.3f}, {ci[1]:+.3f}]; the head "
          f"kept {after['counted'] / before['counted']:.1%} of its counted tokens per forward\n"
          f"  the rollouts drafted {drafted}; the last {len(recent)} steps: entropy {summary['entropy']:.3f} nats"
          + f", {summary['accept_length']:.2f} tokens per forward on the {len(drafting)} that drafted" * bool(drafting)
          + f"\n  rollouts at batch {B}, tokens/s: {speeds} ({tc.gamma}: {summary['rollout_speedup']:.2f}x plain; per "
          f"call {per_call} median [min-max])\n"
          f"  wall time {summary['wall_seconds']:.0f} s; summary in {os.path.join(run.out, 'summary.json')}")
    return summary

def main(argv=None):
    try:
        args = parse_args(argv)
        return run_benchmark(args) if args.bench else run_experiments(args) if args.experiment else train(args)[1]
    except KeyboardInterrupt as e:
        raise SystemExit(f"\ninterrupted: {e}" if str(e) else "\ninterrupted")
    except RunError as e:   # one clear line, no traceback
        raise SystemExit(f"bebop: error: {e}")


if __name__ == "__main__":
    main()
