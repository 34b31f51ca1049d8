"""
bebop: the Bebop recipe for fast RL rollouts, in one file.

Paper: "Breaking Entropy Bounds: Accelerating RL Training via MTP with Rejection Sampling"
(Li, Jiang et al., arXiv 2606.12370). The recipe: a multi-token-prediction (MTP) layer drafts tokens,
the policy verifies them all in one forward, exact rejection sampling keeps every rollout on-policy,
and the MTP layer is trained once before RL with an end-to-end total-variation loss (Eq. 13) so that
its acceptance stays high while GRPO changes the policy.

Run it:
    pip install -r requirements.txt && python bebop.py        # SFT -> MTP training -> GRPO -> timing
    pip install -r requirements.txt && python -m pytest -q    # the test suite
    python bebop.py --experiment all                          # the paper's findings at toy scale
    python bebop.py --bench                                   # speculative vs plain decoding, measured
    torchrun --standalone --nproc_per_node=2 bebop.py         # data-parallel (gloo on CPU, NCCL on GPUs)

The recipe, in data-flow order (search for the ruler lines "# ---"); a reader who stops after section 7
has read all of it:
    1. Config          GPTConfig, TrainConfig and the named presets that override it
    2. Model           RMSNorm, rotary attention, static KV cache with per-row positions, GPT, MTP layer
    3. Losses          CE, KL, reverse KL, per-step TV (Eq. 10/11, memory-lean, fused with the head), e2e TV (Eq. 13)
    4. Sampling        the temperature law, exponential-race sampling, the exact rejection sampler (RS and TO)
    5. Generation      plain and MTP speculative decoding: a prefill, then a step repeated until done;
                       a speculative round is draft -> verify -> accept -> emit and advance
    6. Toy task        "write N digits that sum to S" in a random Markov style, its reward, the MTP chain layout
    7. RL algorithm    SFT loss, MTP training loss, group advantages, the GRPO loss, one grpo_step
The harness that runs it (speed, persistence, scale, measurement):
    8. CUDA graphs     capture/replay of a decoding step over static buffers, handed in by its owner
    9. Draft length    gamma="auto": the draft length with the most expected tokens per second, from measured costs
    10. Data parallel  torchrun ranks: gradient averaging and reduced metrics, no branches in the algorithm
    11. Checkpoints    runs that never lose work; resume refuses other settings
    12. Training       the SFT, MTP and GRPO stages with progress bars and checkpoints
    13. Experiments    losses (Table 2), temperature (Fig. 12a), rl + entropy (Fig. 1a), decomposition (Eq. 16,
                       Fig. 3), boundary (App. E), all with teacher-forced (noise-free) acceptance
    14. Benchmark      tokens/s per draft length, the cost of each piece of a round, GRPO step, TV-loss memory
    15. main()         argparse derived from TrainConfig, the summary

Notation follows the paper: p is the target (policy) distribution, q the draft (MTP) distribution,
gamma the number of drafted tokens per round, alpha the acceptance rate, d_TV the total variation.
"""
import argparse
import contextlib
import functools
import itertools
import json
import math
import numbers
import os
import signal
import threading
import time
import warnings
from copy import deepcopy
from dataclasses import asdict, dataclass, field, fields
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------------
# 1. Config


@dataclass
class GPTConfig:
    vocab_size: int = 14        # the toy task's characters: digits, "SN=" and the end-of-answer "."
    block_size: int = 48        # longest sequence, including the gamma lookahead of speculative decoding
    n_layer: int = 4            # backbone depth; verification costs n_layer blocks, a draft step one block
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4          # hidden width of the MLP is mlp_ratio * n_embd
    rope_base: float = 10000.0  # rotary positions: per-row positions are just an index into a table
    mtp_train_steps: int = 5    # K recursive MTP steps trained before RL (paper: 5); drafting uses gamma <= K


@dataclass
class TrainConfig:
    """Everything a run is made of besides the model's shape. A preset overrides some fields, flags any
    (each field is a flag: --sft-steps for sft_steps), and a checkpoint records them all."""
    preset: str = "cpu"          # model shape and budget (PRESETS below); on CUDA the default is gpu
    seed: int = 1337             # initial weights, data order and rollouts
    task_seed: int = 1234        # fixes the house style of the toy task and the held-out prompts
    sft_steps: int = 1000        # supervised steps that teach the backbone the task
    sft_lr: float = 3e-3
    batch_size: int = 64         # sequences per SFT and MTP step
    mtp_steps: int = 200         # pre-RL MTP training steps (one epoch over the policy's samples)
    mtp_lr: float = 3e-3
    mtp_loss: str = "e2e_tv"     # the paper's headline objective (Eq. 13); see MTP_LOSSES
    mtp_data: str = "policy"     # "policy": the frozen policy's own samples (paper's RFT data); "sft": SFT data
    mtp_ce_warmup: float = 0.5   # first fraction of MTP steps on CE: real MTP heads come CE-pretrained,
                                 # and TV alone cannot learn a token the head gives no mass (grad ~ q)
    rl_steps: int = 100          # GRPO steps
    rl_lr: float = 2e-4
    rl_prompts: int = 8          # prompts per GRPO step; each gets group_size samples
    group_size: int = 16         # G samples per prompt: advantages are normalised within the group
    clip_eps: float = 0.2        # PPO-style ratio clip of the GRPO surrogate (Eq. 3)
    kl_coef: float = 0.0         # weight of the k3 estimate of KL(policy || SFT policy); 0: no reference model
    entropy_coef: float = 0.0    # + rewards policy entropy, - penalises it; 0 is the recipe (moves H on purpose)
    temperature: float = 1.0     # sampling temperature of the rollouts; the trainer's log-probs use the same
    gamma: object = "auto"       # drafted tokens per round at rollout time: 1..K, or "auto" (chosen per call
                                 # from measured costs and running acceptance); the paper uses 3
    rollout: str = "spec"        # "spec" (MTP speculative, exact) or "ar" (plain autoregressive)
    draft: str = "sample"        # "sample" = rejection sampling (RS), "greedy" = target-only (TO)
    mtp_online: str = "none"     # "none" keeps the MTP layer frozen in RL (the paper's recipe), else its loss
    mtp_online_lr: float = 3e-4  # the online MTP layer's own learning rate (paper 5.3)
    grad_clip: float = 1.0       # gradient-norm clip of every stage
    eval_prompts: int = 256      # held-out prompts, fixed by task_seed
    ckpt_every: int = 50         # steps between checkpoints (and one at the end of every stage)
    precision: str = "fp32"      # "bf16" (the gpu preset): autocast in training, bf16 weights for rollouts
    cuda_graphs: bool = True     # replay the decoding step as a CUDA graph where that works (CUDA)


# Named presets. "tiny" is for tests, "cpu" is the default on a laptop, "gpu" is picked on CUDA. Both real
# presets are deep and narrow, like the paper's models (dozens of layers, one MTP layer): a draft step
# costs one block and a verify n_layer blocks, which is what makes drafting cheap next to verifying.
# Wall time of `python bebop.py --preset NAME`, for --help (2-core CPU; gpu on one H100-class card).
PRESET_TIMES = dict(tiny="a 30-second smoke test (its reward can fall)", cpu="about 10 minutes on a 2-core CPU",
                    gpu="minutes on one GPU")


PRESETS = {
    "tiny": dict(model=dict(n_layer=2, n_head=2, n_embd=32), sft_steps=300, mtp_steps=50, rl_steps=20,
                 batch_size=32, rl_prompts=8, group_size=8, rl_lr=3e-4),
    "cpu": dict(model=dict(n_layer=6, n_head=4, n_embd=96), sft_steps=1000, mtp_steps=200, rl_steps=100,
                batch_size=64, rl_prompts=8, group_size=16, rl_lr=2e-4),
    "gpu": dict(model=dict(n_layer=24, n_head=8, n_embd=512), sft_steps=3000, mtp_steps=1000, rl_steps=200,
                batch_size=128, rl_prompts=32, group_size=16, sft_lr=1e-3, mtp_lr=1e-3, rl_lr=1e-4, precision="bf16"),
}


def build_config(train: TrainConfig, task: "DigitSumTask") -> GPTConfig:
    """The model config of a preset, sized so prompt + answer + the speculative lookahead fit."""
    cfg = GPTConfig(**PRESETS[train.preset]["model"])
    cfg.block_size = max(cfg.block_size, task.seq_len + cfg.mtp_train_steps)
    return cfg

# ---------------------------------------------------------------------------------------------------
# 2. Model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # In float32 whatever the input (bf16 activations, bf16 rollout weights); a no-op in fp32 runs.
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


def rope_tables(head_dim: int, n_pos: int, base: float):
    """cos/sin of the rotary angles for positions 0..n_pos-1, each (n_pos, head_dim/2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x1, x2) of channels by each token's own angle; x (..., B, nh, T, hs), cos/sin (B, 1, T, hs/2)."""
    # Rotary positions only depend on position differences, so per-row positions need no extra care.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache:
    """Preallocated keys and values of one attention layer: (B, n_head, S, head_dim), written in place.

    Rows of a batch sit at different positions: every write names the absolute position of each new
    token (pos, (B, T)). Rolling back after a rejected draft is just moving a row's position back: stale
    entries beyond it are hidden by the attention mask and overwritten by the next write."""

    def __init__(self, B, n_head, S, head_dim, device, dtype):
        # Allocated once per generation call: fixed shapes, no reallocation as rows advance.
        self.k = torch.zeros(B, n_head, S, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.rows = torch.arange(B, device=device)[:, None]

    def writer(self, pos):
        # Advanced indexing writes each row's T new entries at that row's own positions, in place.
        def write(k, v):  # k, v (B, nh, T, hs) -> the whole cache, which the mask restricts
            self.k[self.rows, :, pos] = k.transpose(1, 2).to(self.k.dtype)
            self.v[self.rows, :, pos] = v.transpose(1, 2).to(self.v.dtype)
            return self.k, self.v
        return write


def cache_mask(pos, S):
    """Query at absolute position i sees cache entries 0..i: (B, T) -> (B, 1, T, S) bool.

    This is the bottom-right-aligned causal mask of a verify step (T queries against a longer cache),
    and it also hides whatever a row left beyond its position (rolled-back drafts, padding)."""
    return (torch.arange(S, device=pos.device) <= pos[..., None]).unsqueeze(1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, rope, mask=None, kv=None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        (q, k), v = apply_rope(qkv[:2], *rope), qkv[2]   # queries and keys rotated in one go (fewer ops)
        if kv is not None:  # store the new keys/values, get back every key these queries may look at
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
    """One MTP module, DeepSeek-V3 / Qwen3.5 style, applied recursively.

    Step k takes the previous hidden g^{k-1} (g^0 = the backbone's last hidden h) and the embedding of
    the token after it, and returns g^k, whose logits (own final norm, the backbone's shared head)
    predict one token further ahead. It has its own attention, hence its own KV cache."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm_h, self.norm_e = RMSNorm(cfg.n_embd), RMSNorm(cfg.n_embd)
        self.proj = nn.Linear(2 * cfg.n_embd, cfg.n_embd, bias=False)
        self.block = Block(cfg)
        self.norm_f = RMSNorm(cfg.n_embd)

    def forward(self, g, emb, rope, mask=None, kv=None):
        x = self.proj(torch.cat([self.norm_h(g), self.norm_e(emb)], dim=-1))
        return self.block(x, rope, mask, kv)


def mtp_chain_mask(T: int, depth: int, device=None):
    """Attention mask of the teacher-forced MTP pass at `depth` (the "training-time test" mask).

    Keys are stacked by depth: [depth-1 entries of every anchor, depth-2 entries, ..., depth entries].
    The query of anchor t at this depth sees the depth-1 entries of anchors <= t and its own chain's
    entries at depths 2..depth: exactly the MTP cache a draft step sees at inference, so that training
    and drafting agree by construction (a test checks the q rows used online against this path)."""
    t = torch.arange(T, device=device)
    causal = t[None, :] <= t[:, None]                       # depth-1 entries of earlier anchors
    own = torch.eye(T, dtype=torch.bool, device=device)     # this anchor's own chain
    return torch.cat([causal] + [own] * (depth - 1), dim=1)  # (T, depth * T)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.mtp = MTPLayer(cfg)  # the draft model: shares wte and lm_head with the backbone
        cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size + cfg.mtp_train_steps, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections down with depth
            if name.endswith("proj.weight") and "mtp.proj" not in name:
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def rope(self, pos):  # (B, T) absolute positions -> cos, sin (B, 1, T, hs/2)
        return self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)

    def hidden(self, idx, pos=None, mask=None, kvs=None):
        """Backbone hidden states before the final norm, (B, T, C): h_s is what predicts x_{s+1}.
        Without a cache: plain causal attention from position 0. With one: tokens at positions `pos`."""
        if pos is None:
            pos = torch.arange(idx.size(1), device=idx.device).expand_as(idx)
        x, rope = self.wte(idx), self.rope(pos)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, None if kvs is None else kvs[i])
        return x

    def head(self, h):
        return self.lm_head(self.ln_f(h))

    def mtp_head(self, g):
        # The MTP loss must reach only the MTP weights (the paper trains the MTP layer with the backbone,
        # embedding and head frozen): the shared head is used detached.
        return F.linear(self.mtp.norm_f(g), self.lm_head.weight.detach())

    def forward(self, idx):
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence length {idx.size(1)} exceeds block_size {self.config.block_size}")
        return self.head(self.hidden(idx))  # (B, T, vocab_size)

    def mtp_hidden(self, idx, h, n_steps: int):
        """Teacher-forced MTP chains for every anchor t and depth k = 1..n_steps, (B, n_steps, T, C).

        Depth k at anchor t reads (g^{k-1}_t, emb(x_{t+k})) and sits at position t+k-1, as its query does
        at inference; gradients flow through the chain (the e2e TV loss needs them). Anchors with
        t + k > T - 1 have no input token and are garbage: the losses mask them."""
        B, T = idx.shape
        t = torch.arange(T, device=idx.device)
        keys, values, out, g = [], [], [], h
        def stack(k, v):  # this depth's keys join those of the shallower depths
            keys.append(k)
            values.append(v)
            return torch.cat(keys, dim=2), torch.cat(values, dim=2)
        for k in range(1, n_steps + 1):
            nxt = F.pad(idx[:, k:], (0, k))                        # x_{t+k}, zero past the end
            pos = (t + k - 1).expand(B, T)
            emb = self.wte(nxt).detach()                          # shared embedding gets no MTP gradient
            mask = mtp_chain_mask(T, k, idx.device)
            g = self.mtp(g, emb, self.rope(pos), mask, stack)
            out.append(g)
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def backbone_outputs(self, idx):
        """(hidden states (B, T, C), logits (B, T, V)) of the frozen backbone: what the MTP layer reads and
        is measured against. Computed once, they serve any number of MTP heads on the same sequences."""
        h = self.hidden(idx)
        return h, self.head(h)

    def mtp_features(self, idx, n_steps: int, backbone=None):
        """(target logits (B, T, V) of the frozen backbone, the MTP layer's normed hidden states
        (B, n_steps, T, C)): the draft logits are these times the shared head, detached. backbone: this
        model's backbone_outputs(idx), if already computed."""
        h, target_logits = backbone if backbone is not None else self.backbone_outputs(idx)
        return target_logits, self.mtp.norm_f(self.mtp_hidden(idx, h, n_steps))

    def mtp_logits(self, idx, n_steps: int, backbone=None):
        """(target logits (B, T, V) of the frozen backbone, draft logits (B, n_steps, T, V)).

        Draft row [b, k-1, t] is q_k at anchor t; its target is the backbone's row at position t+k."""
        target_logits, x = self.mtp_features(idx, n_steps, backbone)
        return target_logits, F.linear(x, self.lm_head.weight.detach())


class Caches:
    """Every KV cache one generation call needs: one per backbone layer and one for the MTP layer."""

    def __init__(self, model: GPT, B: int, S: int):
        cfg, p = model.config, next(model.parameters())
        hs = cfg.n_embd // cfg.n_head
        self.S = S
        self.backbone = [KVCache(B, cfg.n_head, S, hs, p.device, p.dtype) for _ in range(cfg.n_layer)]
        self.mtp = KVCache(B, cfg.n_head, S, hs, p.device, p.dtype)

    def all(self):
        return self.backbone + [self.mtp]

    def tensors(self):
        return [t for c in self.all() for t in (c.k, c.v)]


def backbone_step(model: GPT, caches: Caches, tokens, pos):
    """Cached backbone forward of tokens (B, T) at positions pos (B, T): (logits, hidden)."""
    kvs = [c.writer(pos) for c in caches.backbone]
    h = model.hidden(tokens, pos, cache_mask(pos, caches.S), kvs)
    return model.head(h), h


def mtp_step(model: GPT, caches: Caches, g, tokens, pos):
    """Cached MTP forward: inputs (g (B, T, C), tokens (B, T)) written at positions pos (B, T)."""
    return model.mtp(g, model.wte(tokens), model.rope(pos), cache_mask(pos, caches.S), caches.mtp.writer(pos))

# ---------------------------------------------------------------------------------------------------
# 3. Losses for the MTP layer. The target p (the backbone's own distribution) is always detached.


def pack_bits(mask):
    """(R, V) bool -> (R, ceil(V/8)) uint8, eight vocabulary entries a byte."""
    m = F.pad(mask.to(torch.uint8), (0, -mask.size(-1) % 8)).view(mask.size(0), -1, 8)
    return (m << torch.arange(8, dtype=torch.uint8, device=m.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(bits, V: int):
    """Inverse of pack_bits: (R, ceil(V/8)) uint8 -> (R, V) bool."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits[..., None] >> shifts) & 1).flatten(-2)[:, :V].bool()


def logits_of(x, weight, dtype):
    """Logits of some rows in `dtype` (float32 or wider), autocast off so that forward and backward agree."""
    with torch.autocast(x.device.type, enabled=False):
        return x.to(dtype) if weight is None else x.to(dtype) @ weight.to(dtype).T


class TVDistance(torch.autograd.Function):
    """Per-row d_TV(p, q) = 1 - sum_v min(p_v, q_v) with q = softmax(z), memory-lean (App. F).

    z is the draft logits, or, given the head's weight W (V, C), z = x W^T for hidden states x (R, C):
    then the full (R, V) logits never exist, only `chunk` rows of them at a time (the shared head's matmul
    fused with the loss). Forward keeps no softmax and no target probabilities: per row the log-sum-exp,
    S = sum_v q_v 1[q_v <= p_v] and a packed 1-bit mask of q > p (V/8 bytes). Backward recomputes q a
    chunk at a time and applies the analytic gradient of Eq. 11, dL/dz = q (S - 1 + 1[q > p]), which is
    bounded by q (Prop. 3)."""

    @staticmethod
    def forward(ctx, x, weight, p, chunk: int):
        dtype = torch.promote_types(x.dtype, torch.float32)
        tv = torch.empty(x.size(0), device=x.device, dtype=dtype)
        lse, S = torch.empty_like(tv), torch.empty_like(tv)
        bits = torch.empty(x.size(0), (p.size(-1) + 7) // 8, dtype=torch.uint8, device=x.device)
        for i in range(0, x.size(0), chunk):
            rows = slice(i, i + chunk)
            z = logits_of(x[rows], weight, dtype)
            pc = p[rows].to(dtype)
            lse[rows] = torch.logsumexp(z, dim=-1)
            q = torch.exp(z - lse[rows, None])
            tv[rows] = 1 - torch.minimum(pc, q).sum(-1)            # Eq. 10, one row at a time
            above = q > pc
            S[rows] = (q * ~above).sum(-1)
            bits[rows] = pack_bits(above)
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
            z = logits_of(x[rows], weight, lse.dtype)
            q = torch.exp(z - lse[rows, None])
            g = grad_tv[rows, None] * q * (S[rows, None] - 1 + unpack_bits(bits[rows], ctx.V).to(q.dtype))  # Eq. 11
            if weight is None:
                grad_x[rows] = g.to(x.dtype)
            else:
                grad_x[rows] = (g @ weight.to(g.dtype)).to(x.dtype)
                if grad_w is not None:
                    grad_w += (g.T @ x[rows].to(g.dtype)).to(weight.dtype)
        return grad_x, grad_w, None, None


def tv_distance(draft, target_probs, head_weight=None, chunk: int = None):
    """d_TV(p, softmax(z)) over the last axis, (..., V) -> (...); p gets no gradient. draft is the logits
    z, or hidden states x (..., C) with head_weight W (V, C) and z = x W^T, fused chunk by chunk. chunk:
    rows materialised at a time (default: about 1M logits, 4 MB in float32)."""
    V = target_probs.size(-1)
    chunk = chunk or max(1, 2**20 // V)
    tv = TVDistance.apply(draft.reshape(-1, draft.size(-1)), head_weight, target_probs.detach().reshape(-1, V), chunk)
    return tv.view(draft.shape[:-1])


def e2e_tv_loss(draft, target_probs, mask=None, head_weight=None):
    """End-to-end TV loss, Eq. 13: 1 - (1/gamma) sum_j prod_{i<=j} (1 - d_TV(p_i, q_i)), averaged.

    draft (logits, or hidden states with head_weight, see tv_distance), target_probs (N, gamma, V): one
    chain of gamma steps per row. mask (N, gamma) marks the steps that exist; it must be a prefix per row.
    A chain cut short by the end of its sequence (k < gamma valid steps) is normalised by its own length
    k, not by gamma, so that it still means one minus a normalised expected acceptance length. No
    stop-gradient inside the products: earlier steps get more weight by themselves, because they sit in
    every later product."""
    alpha = 1 - tv_distance(draft, target_probs, head_weight)         # per-step acceptance, Eq. 2
    if mask is None:
        mask = torch.ones_like(alpha, dtype=torch.bool)
    alpha = torch.where(mask, alpha, torch.ones_like(alpha))
    expected_len = (torch.cumprod(alpha, dim=1) * mask).sum(1)       # Eq. 12 with measured alphas
    steps = mask.sum(1)
    keep = steps > 0
    return (1 - expected_len[keep] / steps[keep]).mean()


MTP_LOSSES = ("ce", "kl", "rkl", "tv", "e2e_tv")


def mtp_loss(kind: str, draft, target_logits, labels, mask, head_weight=None):
    """One of the paper's MTP objectives on chains laid out (N, K, ...), targets detached.

    ce: cross-entropy on the sequences' tokens (hard labels); kl: forward KL(p || q); rkl: reverse KL(q || p);
    tv: per-step TV (Eq. 10); e2e_tv: end-to-end TV (Eq. 13). mask (N, K) is a prefix per chain. draft is
    the draft logits (N, K, V), or hidden states (N, K, C) with the head's weight (V, C): the TV losses
    then never materialise the full logits (memory-lean, App. F), the others compute them."""
    if kind not in MTP_LOSSES:
        raise ValueError(f"unknown MTP loss {kind!r}; choose one of {MTP_LOSSES}")
    target_logp = F.log_softmax(target_logits.detach().float(), dim=-1)
    if kind == "e2e_tv":
        return e2e_tv_loss(draft, target_logp.exp(), mask, head_weight)
    if kind == "tv":
        per = tv_distance(draft, target_logp.exp(), head_weight)
    else:
        logits = draft if head_weight is None else F.linear(draft, head_weight)
        if kind == "ce":
            per = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), reduction="none").view(labels.shape)
        else:
            draft_logq = F.log_softmax(logits.float(), dim=-1)
            if kind == "kl":
                per = (target_logp.exp() * (target_logp - draft_logq)).sum(-1)
            else:
                per = (draft_logq.exp() * (draft_logq - target_logp)).sum(-1)
    return (per * mask).sum() / mask.sum().clamp(min=1)

# ---------------------------------------------------------------------------------------------------
# 4. Sampling. Everything here runs on the device without a host sync, so it can be graph-captured.


def one_hot(tokens, V: int):
    """(...) token ids -> (..., V) float32 one-hot rows. Not F.one_hot: off CUDA it reads the ids back to
    check their range, a host sync inside the step."""
    return torch.zeros(*tokens.shape, V, device=tokens.device).scatter_(-1, tokens[..., None], 1.0)


def probs_from_logits(logits, temperature: float):
    """Sampling distribution at a temperature, in float32; temperature 0 is greedy (a one-hot)."""
    logits = logits.float()
    if temperature == 0:
        return one_hot(logits.argmax(-1), logits.size(-1))
    return F.softmax(logits / temperature, dim=-1)


def sample(probs, generator=None):
    """One draw per row from unnormalised probs (..., V): argmax of probs / Exp(1) noise.

    The smallest of the independent Exp(1)/probs_v is Exp(sum probs) and lands on v with chance
    probs_v / sum(probs), so no normalisation, cumsum or host sync is needed; zeros never win."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


def sampling_law(logits, temperature: float):
    """The law tokens are drawn from at a temperature: (log-probs, probabilities) (..., V) in float32, from
    one log-softmax. Temperature 0 is greedy: a one-hot at the argmax (its log-probs are those at T = 1)."""
    logp = F.log_softmax(logits.float() / (temperature or 1.0), dim=-1)
    return logp, logp.exp() if temperature > 0 else probs_from_logits(logits, 0)


def sample_token(logits, temperature: float, generator=None):
    """One token per row (..., V) -> (...), and its log-prob under the sampling law."""
    logp, p = sampling_law(logits, temperature)
    x = sample(p, generator)
    return x, logp.gather(-1, x[..., None]).squeeze(-1)


def rejection_sample(target_probs, draft_probs, draft_tokens, generator=None):
    """Exact speculative sampling for a batch: every emitted token is distributed as the target p.

    target_probs (B, gamma+1, V): p at each draft position, plus the row after the last draft.
    draft_probs (B, gamma, V): the q each draft token was drawn from; a one-hot at argmax q turns
    this into the target-only rule (TO, Eq. 1), where acceptance is p(argmax q).
    draft_tokens (B, gamma). Returns n_accepted (B,) in 0..gamma and tokens (B, gamma+1): the first
    n_accepted are the drafts, position n_accepted holds the correction drawn from the residual
    max(0, p - q) renormalised, or the bonus drawn from row gamma when every draft was accepted.
    Entries after n_accepted are left-over drafts: ignore them.

    Contract: probabilities, not logits; each row non-negative and summing to 1 (check_distributions
    checks that, at the cost of a host sync). Shapes and dtypes are checked here, which costs nothing."""
    if draft_tokens.dim() != 2 or draft_tokens.is_floating_point() or draft_tokens.dtype == torch.bool:
        raise ValueError(f"draft_tokens must be (B, gamma) integer ids, got {tuple(draft_tokens.shape)} "
                         f"{draft_tokens.dtype}")
    B, gamma = draft_tokens.shape
    V = target_probs.size(-1)
    if target_probs.shape != (B, gamma + 1, V) or draft_probs.shape != (B, gamma, V):
        raise ValueError(f"expected target_probs (B, gamma+1, V) = ({B}, {gamma + 1}, V) and draft_probs (B, gamma, V) "
                         f"= ({B}, {gamma}, V) with one V, got {tuple(target_probs.shape)} and {tuple(draft_probs.shape)}")
    if not (target_probs.is_floating_point() and draft_probs.is_floating_point()):
        raise ValueError(f"target_probs and draft_probs must be floating point probabilities, got "
                         f"{target_probs.dtype} and {draft_probs.dtype}")
    p = target_probs.float()
    q = draft_probs.float()
    p_d = p[:, :gamma].gather(-1, draft_tokens[..., None]).squeeze(-1)   # (B, gamma)
    q_d = q.gather(-1, draft_tokens[..., None]).squeeze(-1)
    u = torch.rand(B, gamma, device=p.device, generator=generator)
    accepted = u * q_d < p_d                                  # accept with prob min(1, p/q)
    n = accepted.long().cumprod(dim=1).sum(dim=1)             # drafts accepted before the first reject
    # Correction or bonus: residual of row n, where the "draft" of row gamma is nothing (q = 0).
    rows = torch.arange(B, device=p.device)
    p_n = p[rows, n]                                          # (B, V)
    q_n = F.pad(q, (0, 0, 0, 1))[rows, n]
    residual = (p_n - q_n).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)  # p == q: never rejected
    new = sample(residual, generator)
    tokens = F.pad(draft_tokens, (0, 1))                      # gamma = 0 works too: a plain sample from p
    tokens.scatter_(1, n[:, None], new[:, None])
    return n, tokens


def check_distributions(probs, name: str, atol: float = 1e-3):
    """Raise ValueError unless every row of probs (..., V) is a distribution: finite, non-negative, summing
    to 1. It reads values back to the host (a sync), so the generators call it only with debug=True."""
    bad = ~torch.isfinite(probs).all(-1) | (probs < 0).any(-1) | ((probs.sum(-1) - 1).abs() > atol)
    if bad.any():
        row = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} row {row} is not a probability distribution (finite, >= 0, sums to 1): "
                         f"sum {probs[row].sum().item():.4g}, min {probs[row].min().item():.4g}; pass probabilities, "
                         f"not logits")

# ---------------------------------------------------------------------------------------------------
# 5. Generation. Plain and speculative decoding have one shape: a prefill, then a step function that
# updates a fixed set of tensors in place (no host sync, no data-dependent branch), repeated until every
# row is done (`decoding_loop`). That shape is all section 8 needs to replay a step as a CUDA graph unchanged.


@dataclass
class Generation:
    tokens: object        # (B, T_prompt + max_new_tokens) for equal-length prompts, else a list of 1-D rows
    new_tokens: torch.Tensor  # (B, max_new_tokens); after an EOS the row is padded with the EOS id
    logprobs: torch.Tensor    # (B, max_new_tokens) target log p of each emitted token; 0 after EOS
    mask: torch.Tensor        # (B, max_new_tokens) True for emitted tokens up to and including EOS
    stats: dict = field(default_factory=dict)


def prepare_prompts(model: GPT, prompt, max_new_tokens: int, lookahead: int):
    """Validate prompts and right-pad them into one (B, P) batch; returns (idx, lengths, ragged)."""
    cfg = model.config
    device = next(model.parameters()).device
    rows = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
    for r in rows:
        t = torch.as_tensor(r) if not isinstance(r, torch.Tensor) else r
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"prompt token ids must be integers, got dtype {t.dtype}")
    if isinstance(prompt, torch.Tensor) and prompt.dim() == 2:
        idx, ragged = prompt.long(), False
        lengths = torch.full((idx.size(0),), idx.size(1))
    elif isinstance(prompt, (list, tuple)) and len(prompt) > 0:
        rows, ragged = [torch.as_tensor(r, dtype=torch.long) for r in prompt], True
        if any(r.dim() != 1 for r in rows):
            raise ValueError("each prompt must be a 1-D sequence of token ids")
        lengths = torch.tensor([r.numel() for r in rows])
        idx = nn.utils.rnn.pad_sequence(rows, batch_first=True)
    else:
        raise ValueError("prompt must be a (B, T) LongTensor or a non-empty list of 1-D token tensors")
    max_new_tokens = int(max_new_tokens)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    if idx.numel() == 0 or lengths.min() == 0:
        raise ValueError("empty prompt: every prompt needs at least one token")
    P = idx.size(1)
    if P > cfg.block_size:
        raise ValueError(f"prompt length {P} exceeds block_size {cfg.block_size}")
    if P + max_new_tokens + lookahead > cfg.block_size:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) + lookahead ({lookahead}) = "
                         f"{P + max_new_tokens + lookahead} exceeds block_size {cfg.block_size}")
    if idx.min() < 0 or idx.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got range [{idx.min()}, {idx.max()}]")
    # Right-padding is safe: a query sees only cache entries at positions <= its own, and a row's padding
    # lies past its prompt, where its own first generated tokens overwrite it.
    return idx.to(device), lengths.to(device), ragged


def is_integer(x) -> bool:
    """A Python or numpy integer (or a 0-d integer tensor), not a bool."""
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)   # numpy's bool is not Integral


def check_sampling_args(model: GPT, max_new_tokens, temperature, eos, generator, trace=None, graphs=None):
    """Clear errors for the generators' arguments, each naming what was wrong and what is allowed."""
    if not is_integer(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    V = model.config.vocab_size
    if eos is not None and (not is_integer(eos) or not 0 <= int(eos) < V):
        raise ValueError(f"eos must be None or an integer token id in [0, {V}), got {eos!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        device = model.lm_head.weight.device
        if generator.device.type != device.type:
            raise ValueError(f"generator lives on {generator.device}, the model on {device}: make it with "
                             f"torch.Generator({device.type!r})")
    if trace is not None and not isinstance(trace, list):
        raise TypeError(f"trace must be a list (rounds are appended to it) or None, got {type(trace).__name__}")
    if graphs is not None and getattr(graphs, "model", None) is not model:
        raise ValueError(f"graphs must be None or a CudaGraphs made for this model (CudaGraphs(model)), got "
                         f"{type(graphs).__name__}")


def finish(idx, lengths, ragged, s, max_new_tokens: int, eos, stats):
    """The generators' shared ending: the new tokens and log-probs out of the state's buffers (copies: a
    CudaGraphs reuses the state in its next call of this shape), padded after the first EOS, and the
    prompts and new tokens assembled."""
    new_tokens, logprobs = s.tokens[:, :max_new_tokens].clone(), s.logprobs[:, :max_new_tokens].clone()
    mask = torch.ones_like(new_tokens, dtype=torch.bool)
    if eos is not None:
        is_eos = (new_tokens == eos).long()
        mask = (is_eos.cumsum(1) - is_eos) == 0                  # up to and including the first EOS
        new_tokens = torch.where(mask, new_tokens, torch.full_like(new_tokens, eos))
        logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))
    tokens = torch.cat([idx, new_tokens], dim=1)
    if ragged:   # drop each row's padding, then cut the flat result into rows
        in_prompt = torch.arange(idx.size(1), device=idx.device) < lengths[:, None]
        keep = torch.cat([in_prompt, torch.ones_like(mask)], dim=1)
        tokens = list(tokens[keep].split((lengths + new_tokens.size(1)).tolist()))
    return Generation(tokens, new_tokens, logprobs, mask, stats)


def decoding_loop(model: GPT, key, B: int, S: int, prefill, step, generator, max_steps: int, graphs=None):
    """Prefill, then repeat a decoding step until every row is done; returns the final state.

    prefill(caches) -> state, a SimpleNamespace of tensors; step(caches, state, generator) updates them in
    place. graphs: None decodes eagerly, here; a CudaGraphs (section 8) runs the same prefill and step with
    its own static caches and state and replays the step as a CUDA graph; key names what the step bakes in
    (shapes, temperature, EOS), so that calls which may share one captured step find it."""
    if graphs is not None:
        return graphs.decode(key, B, S, prefill, step, generator, max_steps)
    caches = Caches(model, B, S)
    s = prefill(caches)
    for _ in range(max_steps):
        if bool(s.done.all()):   # a host read each step: eager decoding waits for the device here
            break
        step(caches, s, generator=generator)
    return s


def prefill(model: GPT, caches: Caches, idx, lengths, width: int, max_new_tokens: int, temperature: float,
            generator, eos):
    """The backbone reads the right-padded prompts (B, P) and samples x_L after each row's last prompt
    token. Returns the prompts' hidden states and the state both decoders start from."""
    B, P = idx.shape
    rows = torch.arange(B, device=idx.device)
    logits, h = backbone_step(model, caches, idx, torch.arange(P, device=idx.device).expand(B, P))
    x, logp = sample_token(logits[rows, lengths - 1], temperature, generator)
    s = SimpleNamespace(
        x=x,                                                                  # (B,) last emitted token, x_L
        tokens=torch.zeros(B, width, dtype=torch.long, device=idx.device),   # (B, width) emitted tokens
        logprobs=torch.zeros(B, width, device=idx.device),                   # ... and their target log p
        done=torch.full((B,), max_new_tokens <= 1, device=idx.device))      # (B,) rows that are finished
    s.tokens[:, 0], s.logprobs[:, 0] = x, logp
    if eos is not None:
        s.done |= x == eos
    return h, s


def plain_prefill(model: GPT, caches: Caches, idx, lengths, max_new_tokens: int, temperature: float,
                  generator, eos):
    """prefill, plus where each row's next token goes; the state plain_step advances."""
    # A spare last column for steps past the end (the bench calls a step any number of times).
    _, s = prefill(model, caches, idx, lengths, max_new_tokens + 1, max_new_tokens, temperature, generator, eos)
    s.pos = lengths.clone()                                         # (B,) position of x, the next to forward
    s.count = torch.ones((), dtype=torch.long, device=idx.device)   # tokens emitted so far (all rows alike)
    s.forwards = torch.ones((), device=idx.device)                  # target forwards, the prefill's included
    return s


def plain_step(model: GPT, caches: Caches, s, temperature: float, eos, max_new_tokens: int, generator):
    """One token for every row: forward the last token at its row's position, sample the next."""
    s.forwards += ~s.done.all()                             # an idle step (all rows done) is not counted
    logits, _ = backbone_step(model, caches, s.x[:, None], s.pos[:, None])
    x, logp = sample_token(logits[:, 0], temperature, generator)
    col = s.count.clamp(max=max_new_tokens).view(1)         # (1,) a tensor, so a graph can replay it
    s.tokens.index_copy_(1, col, x[:, None])
    s.logprobs.index_copy_(1, col, logp[:, None])
    s.x.copy_(x)
    s.pos.copy_((s.pos + 1).clamp(max=caches.S - 1))
    s.count += 1
    s.done |= s.count >= max_new_tokens
    if eos is not None:
        s.done |= x == eos


@torch.no_grad()
def generate(model: GPT, prompt, max_new_tokens: int, *, temperature: float = 1.0, generator=None, eos=None,
             graphs=None):
    """Plain autoregressive sampling: one backbone forward per token, batched, KV-cached.
    graphs: a CudaGraphs of this model to replay each step as a CUDA graph (section 8); None: eager."""
    check_sampling_args(model, max_new_tokens, temperature, eos, generator, graphs=graphs)
    max_new_tokens, temperature, eos = int(max_new_tokens), float(temperature), None if eos is None else int(eos)
    idx, lengths, ragged = prepare_prompts(model, prompt, max_new_tokens, lookahead=0)
    B, P = idx.shape
    key = ("plain", B, P, max_new_tokens, temperature, eos)
    prefill = lambda caches: plain_prefill(model, caches, idx, lengths, max_new_tokens, temperature, generator, eos)
    step = functools.partial(plain_step, model, temperature=temperature, eos=eos, max_new_tokens=max_new_tokens)
    # Every step adds a token to each running row, so max_new_tokens - 1 steps after the prefill suffice.
    s = decoding_loop(model, key, B, P + max_new_tokens, prefill, step, generator, max_new_tokens - 1, graphs)
    return finish(idx, lengths, ragged, s, max_new_tokens, eos, dict(target_forwards=int(s.forwards), accept_length=1.0))


DRAFT_RULES = ("sample", "greedy")


def draft_tokens(model: GPT, caches: Caches, g1, L, gamma: int, temperature: float, greedy: bool, generator=None):
    """Draft: gamma tokens from the MTP layer, starting from g^1 at anchor L-1 (B, C).

    Step k >= 2 reads (g^{k-1}, emb(d_{k-1})) at MTP-cache position L+k-2. Returns the draft logits
    (B, gamma, V), the distributions q the drafts were drawn from (one-hot for the greedy/TO rule),
    and the drafts (B, gamma)."""
    if gamma == 0:   # a plain step: nothing drafted
        V = model.config.vocab_size
        return g1.new_zeros(g1.size(0), 0, V), g1.new_zeros(g1.size(0), 0, V, dtype=torch.float32), \
            torch.zeros(g1.size(0), 0, dtype=torch.long, device=g1.device)
    logits, qs, ds, g = [], [], [], g1
    for k in range(1, gamma + 1):
        if k > 1:
            g = mtp_step(model, caches, g[:, None], ds[-1][:, None], (L + k - 2)[:, None])[:, 0]
        z = model.mtp_head(g)
        q = probs_from_logits(z, temperature)
        d = q.argmax(-1) if greedy else sample(q, generator)
        logits.append(z)
        qs.append(one_hot(d, q.size(-1)) if greedy else q)   # TO: the draft law is a one-hot
        ds.append(d)
    return torch.stack(logits, 1), torch.stack(qs, 1), torch.stack(ds, 1)


def verify(model: GPT, caches: Caches, x, drafts, L, temperature: float):
    """Verify: the backbone reads [x_L, d_1..d_gamma] at positions L..L+gamma in one forward. Returns the
    target logits, the target law at the sampling temperature as log-probs and probabilities (B, gamma+1, V)
    (the last row is for the bonus token), and the backbone's hidden states, which the MTP layer reads next."""
    positions = L[:, None] + torch.arange(drafts.size(1) + 1, device=L.device)   # (B, gamma+1)
    target_logits, h = backbone_step(model, caches, torch.cat([x[:, None], drafts], 1), positions)
    return (target_logits, *sampling_law(target_logits, temperature), h)


def speculative_prefill(model: GPT, caches: Caches, idx, lengths, max_new_tokens: int, gamma: int,
                        temperature: float, generator, eos):
    """prefill, then the MTP layer reads the depth-1 inputs (h_s, emb(x_{s+1})) of every prompt anchor,
    giving the first g^1. Returns the round state, sized for rounds of up to `gamma` drafts."""
    B, P = idx.shape
    rows = torch.arange(B, device=idx.device)
    # A round may write gamma+1 tokens past the last needed one.
    h, s = prefill(model, caches, idx, lengths, max_new_tokens + gamma + 1, max_new_tokens, temperature, generator, eos)
    nxt = F.pad(idx[:, 1:], (0, 1))
    nxt[rows, lengths - 1] = s.x
    # g^1 (B, C): the MTP layer's output at anchor L-1, from which the next round drafts d_1.
    s.g1 = mtp_step(model, caches, h, nxt, torch.arange(P, device=idx.device).expand(B, P))[rows, lengths - 1]
    s.L = lengths.clone()                                                   # (B,) position of x_L
    s.count = torch.ones(B, dtype=torch.long, device=idx.device)           # (B,) tokens emitted so far
    s.histogram = torch.zeros(gamma + 1, dtype=torch.long, device=idx.device)  # kept tokens - 1 per row-round
    s.reached = torch.zeros(gamma, dtype=torch.long, device=idx.device)        # per draft step: kept if accepted
    s.accepted = torch.zeros(gamma, dtype=torch.long, device=idx.device)       # ... and accepted
    s.rounds = torch.zeros((), dtype=torch.long, device=idx.device)
    s.gamma_rounds = torch.zeros(gamma + 1, dtype=torch.long, device=idx.device)  # rounds run with each gamma
    return s


def emit_and_advance(model: GPT, caches: Caches, s, n, tokens, target_logp, h, eos, max_new_tokens: int):
    """Emit and advance: write each active row's n accepted drafts and its correction or bonus, count what
    the row keeps, feed the MTP layer, and move the row on by its own n+1 (rolling back the rest)."""
    B, gamma = tokens.size(0), tokens.size(1) - 1
    rows, ahead = torch.arange(B, device=tokens.device), torch.arange(gamma + 1, device=tokens.device)
    active = ~s.done
    positions = s.L[:, None] + ahead
    # The MTP layer reads the depth-1 inputs of the gamma+1 new anchors (entries past n are garbage,
    # later hidden and overwritten); its output at index n is the next round's g^1.
    s.g1.copy_(mtp_step(model, caches, h, tokens, positions)[rows, n])
    # Emit; finished rows write nothing (their writes go to the spare last column, unchanged).
    lp = target_logp.gather(-1, tokens[..., None]).squeeze(-1)
    width = s.tokens.size(1)
    write = torch.where(active[:, None], s.count[:, None] + ahead, width - 1)
    valid = active[:, None] & (ahead[None, :] <= n[:, None])
    s.tokens.scatter_(1, write, torch.where(valid, tokens, s.tokens.gather(1, write)))
    s.logprobs.scatter_(1, write, torch.where(valid, lp, s.logprobs.gather(1, write)))
    # Statistics count only the tokens a row keeps: slots up to and including its end mark, below
    # max_new_tokens. Drafts verified after an accepted end mark are easy (the policy predicts padding
    # there) and would inflate acceptance; slots past the cap are drawn but thrown away.
    is_end = valid & (tokens == eos) if eos is not None else torch.zeros_like(valid)
    before_end = (is_end.long().cumsum(1) - is_end.long()) == 0                     # no end mark before
    kept = valid & before_end & (s.count[:, None] + ahead < max_new_tokens)       # (B, gamma+1)
    n_kept = kept.sum(1)                                                           # >= 1 for active rows
    s.histogram[:gamma + 1] += ((n_kept[:, None] - 1 == ahead) & active[:, None]).sum(0)
    s.reached[:gamma] += kept[:, :gamma].sum(0)               # draft j reached and its slot would be kept
    s.accepted[:gamma] += (kept[:, :gamma] & (ahead[:gamma] < n[:, None])).sum(0)
    s.gamma_rounds[gamma] += active.any()
    # Advance each active row by its own n+1; finished rows stay parked inside the cache, so an idle
    # round never writes out of bounds.
    s.count += torch.where(active, n + 1, 0)
    lookahead = s.reached.numel()                       # the longest round the caches have room for
    s.L.copy_(torch.where(active, torch.clamp(s.L + n + 1, max=caches.S - lookahead - 1), s.L))
    s.x.copy_(torch.where(active, tokens[rows, n], s.x))
    s.rounds += active.any()
    s.done |= (s.count >= max_new_tokens) | is_end.any(1)


def speculative_round(model: GPT, caches: Caches, s, gamma: int, temperature: float, greedy: bool, eos,
                      max_new_tokens: int, generator, trace=None, debug=False):
    """One round for every row, the paper's four steps: draft gamma tokens, verify them in one backbone
    forward, accept n of them plus one more token (rejection_sample), emit and advance each active row by
    its own n+1. Updates the state s in place.

    gamma may change from round to round (up to what the state was sized for); gamma = 0 is a plain
    decoding step that also feeds the MTP layer its one new depth-1 input, so that g^1 stays current and
    drafting can resume."""
    draft_logits, q, d = draft_tokens(model, caches, s.g1, s.L, gamma, temperature, greedy, generator)
    target_logits, target_logp, p, h = verify(model, caches, s.x, d, s.L, temperature)
    if debug:
        check_distributions(p, "target_probs")
        check_distributions(q, "draft_probs")
    n, tokens = rejection_sample(p, q, d, generator)
    if trace is not None:
        trace.append(dict(L=s.L.clone(), n=n, tokens=tokens, drafts=d, draft_logits=draft_logits, draft_probs=q,
                          target_logits=target_logits, active=~s.done))
    emit_and_advance(model, caches, s, n, tokens, target_logp, h, eos, max_new_tokens)


def acceptance_stats(histogram, reached, accepted):
    """Acceptance statistics over the tokens rows keep. histogram[i]: row-rounds that kept i+1 tokens;
    reached[j-1] / accepted[j-1]: row-rounds whose draft j was verified / accepted, counted only where
    its token would be kept. Returns alpha_j = accepted / reached (conditional on reaching step j; NaN for
    a step never reached) and accept_length, the mean tokens a row keeps per round (drafts + the
    correction or bonus), i.e. tokens per target forward (1.0 when no round ran: each row's only token
    came from the prefill's forward)."""
    rounds = sum(histogram)
    kept = sum((i + 1) * h for i, h in enumerate(histogram))
    return dict(acceptance=[a / r if r else math.nan for a, r in zip(accepted, reached)],
                accept_length=kept / rounds if rounds else 1.0, drafts_reached=list(reached),
                drafts_accepted=list(accepted), accept_histogram=list(histogram))


@torch.no_grad()
def speculative_generate(model: GPT, prompt, max_new_tokens: int, *, gamma=3, temperature: float = 1.0,
                         draft: str = "sample", generator=None, eos=None, trace=None, graphs=None,
                         debug: bool = False, chooser=None):
    """MTP speculative decoding with exact verification, batched, rows advancing at their own pace.

    A round: the MTP layer drafts d_1..d_gamma; the backbone verifies [x_L, d_1..d_gamma]
    at positions L..L+gamma in one forward; rejection_sample accepts n drafts and adds one token.
    draft="sample" is rejection sampling (RS); draft="greedy" is target-only verification (TO).
    gamma: an integer 1..K (K = the depth the MTP layer was trained to); "auto", the draft length that
    maximises expected tokens per second for this batch, decided by `chooser` (a DraftLengthChooser,
    section 9, which keeps measured round costs and the acceptance of earlier calls: pass the same one to
    every call; without one each call profiles afresh) where 0 means plain decoding; or a list of
    integers 0..K, a forced per-round schedule (cycled; eager), which tests use.
    Pass a list as `trace` to record every round's internals (tests and the tutorial use it; eager only).
    graphs: a CudaGraphs of this model to replay each round as a CUDA graph (section 8); None: eager.
    debug=True checks every round's p and q with check_distributions (host syncs; eager)."""
    if draft not in DRAFT_RULES:
        raise ValueError(f"unknown draft rule {draft!r}; choose one of {DRAFT_RULES}")
    K = model.config.mtp_train_steps
    if gamma == "auto":
        return adaptive_generate(model, prompt, max_new_tokens, chooser or DraftLengthChooser(K),
                                 temperature=temperature, draft=draft, generator=generator, eos=eos, graphs=graphs)
    schedule = [int(g) for g in gamma] if isinstance(gamma, (list, tuple)) and gamma and all(
        is_integer(g) and 0 <= int(g) <= K for g in gamma) else None
    if schedule is None and (not is_integer(gamma) or not 1 <= int(gamma) <= K):
        raise ValueError(f"gamma must be an integer in 1..{K} (the depth the MTP layer was trained to), \"auto\", "
                         f"or a list of integers in 0..{K}; got {gamma!r}")
    if trace is not None and graphs is not None:
        raise ValueError("trace records every round eagerly: pass graphs=None with it")
    check_sampling_args(model, max_new_tokens, temperature, eos, generator, trace, graphs)
    max_new_tokens, temperature, eos = int(max_new_tokens), float(temperature), None if eos is None else int(eos)
    lookahead = max(schedule) if schedule else int(gamma)
    idx, lengths, ragged = prepare_prompts(model, prompt, max_new_tokens, lookahead=lookahead)
    B, P = idx.shape
    key = ("speculative", B, P, max_new_tokens, lookahead, temperature, draft, eos)
    prefill = lambda caches: speculative_prefill(model, caches, idx, lengths, max_new_tokens, lookahead, temperature,
                                                 generator, eos)
    round_of = lambda g: functools.partial(speculative_round, model, gamma=g, temperature=temperature,
                                           greedy=draft == "greedy", eos=eos, max_new_tokens=max_new_tokens,
                                           trace=trace, debug=debug)
    if schedule:   # a host-side round counter picks each round's gamma
        rounds = itertools.count()
        step = lambda caches, s, generator: round_of(schedule[next(rounds) % len(schedule)])(caches, s, generator=generator)
    else:
        step = round_of(lookahead)
    # Every active row gains at least one token per round, so max_new_tokens - 1 rounds always suffice.
    s = decoding_loop(model, key, B, P + max_new_tokens + lookahead, prefill, step, generator, max_new_tokens - 1,
                      None if debug or schedule else graphs)
    stats = acceptance_stats(s.histogram.tolist(), s.reached.tolist(), s.accepted.tolist())
    stats.update(target_forwards=int(s.rounds) + 1, rounds=int(s.rounds), gamma=gamma if schedule else lookahead,
                 gamma_rounds=dict(enumerate(s.gamma_rounds.tolist())))
    return finish(idx, lengths, ragged, s, max_new_tokens, eos, stats)


# ---------------------------------------------------------------------------------------------------
# 6. Toy task: "write N digits that sum to S", in a house style.
#
# Why this task: the reward is verifiable and exact; every prompt has many correct answers, so the
# policy keeps real entropy; answers are 16-32 digits plus an end mark, so rollouts dominate a step;
# and hitting the sum exactly needs a running total that a small model learns only roughly from SFT,
# leaving room for GRPO. The SFT answers follow a random order-2 Markov "style" (Dirichlet(0.25) rows),
# so the policy's next-digit distributions are peaked in some contexts and spread in others, as in
# language. Uniform digits would be trivially easy to draft and would hide every effect in the paper.


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
        # style[a, b] = law of the next digit after digits a, b (10 = "no digit yet"): Dirichlet rows
        gam = torch._standard_gamma(torch.full((11, 11, 10), concentration), generator=g)
        self.style = gam / gam.sum(-1, keepdim=True)
        self.max_new_tokens = n_max + 1          # the digits and the end mark
        self.seq_len = PROMPT_LEN + n_max + 1

    def sample_answers(self, B: int, generator):
        """(digits (B, n_max), N (B,), S (B,)) drawn from the style; digits past N are padding."""
        N = torch.randint(self.n_min, self.n_max + 1, (B,), generator=generator)
        digits = torch.zeros(B, self.n_max, dtype=torch.long)
        a = b = torch.full((B,), 10)
        for i in range(self.n_max):  # a loop over positions, never over rows
            digits[:, i] = torch.multinomial(self.style[a, b], 1, generator=generator)[:, 0]
            a, b = b, digits[:, i]
        digits = digits * (torch.arange(self.n_max) < N[:, None])
        return digits, N, digits.sum(1)

    @staticmethod
    def prompt_tokens(S, N):
        """(B, PROMPT_LEN) tokens of "S{S:03d}N{N:02d}=" without going through strings."""
        B = S.size(0)
        col = lambda v: torch.full((B,), VOCAB.index(v))
        return torch.stack([col("S"), S // 100, S // 10 % 10, S % 10, col("N"), N // 10, N % 10, col("=")], 1)

    def prompts(self, B: int, generator):
        """Prompts whose targets are reachable in the house style: (idx (B, 8), S, N)."""
        _, N, S = self.sample_answers(B, generator)
        return self.prompt_tokens(S, N), S, N

    def sft_batch(self, B: int, generator):
        """Teacher-forcing sequences (B, seq_len) [prompt, N digits, ".", padding] and their lengths."""
        digits, N, S = self.sample_answers(B, generator)
        answer = torch.cat([digits, torch.full((B, 1), EOS)], 1)
        answer.scatter_(1, N[:, None], EOS)                       # "." right after the N-th digit
        seq = torch.cat([self.prompt_tokens(S, N), answer], 1)
        lengths = PROMPT_LEN + N + 1
        seq = torch.where(torch.arange(self.seq_len) < lengths[:, None], seq, EOS)
        return seq, lengths

    @staticmethod
    def reward(new_tokens, S, N):
        """Reward in [0, 1] and exact-correctness of answers (B, T) for targets S, N (B,).

        Well-formed = digits then ".". Then half a point for the right count and up to half a point for
        the sum, falling linearly to 0 at 10 away from S; 1.0 exactly when count and sum are both right."""
        T = new_tokens.size(1)
        is_end = new_tokens == EOS
        length = torch.where(is_end.any(1), is_end.float().argmax(1), T)
        before = torch.arange(T, device=new_tokens.device) < length[:, None]
        well_formed = is_end.any(1) & ((new_tokens < 10) | ~before).all(1)
        total = torch.where(before, new_tokens, 0).sum(1)
        S, N = S.to(new_tokens.device), N.to(new_tokens.device)
        right_len, right_sum = length == N, total == S
        closeness = (1 - (total - S).abs().float() / 10).clamp(min=0)
        r = well_formed.float() * (0.5 * right_len.float() + 0.5 * closeness)
        return r, well_formed & right_len & right_sum


def answer_mask(lengths, T: int, answer_start: int, device=None):
    """Positions (of T inputs) whose next token is part of the answer: answer_start-1 .. length-2, where
    the answer starts at position answer_start and sequence b has lengths[b] tokens."""
    t = torch.arange(T, device=device)
    return (t >= answer_start - 1) & (t <= lengths[:, None] - 2)


def mtp_chain_targets(seq, lengths, target_logits, draft_logits, answer_start: int):
    """Lay out teacher-forced chains for the MTP losses: one chain per anchor t >= answer_start-1 (the
    answers start at position answer_start; sequence b has lengths[b] tokens).

    draft_logits (B, K, T, ...) may be logits or hidden states. Returns (draft (N, K, ...), target logits
    (N, K, V), labels (N, K), mask (N, K)). Step k of
    anchor t targets the backbone's row at position t+k (its own next-token law, detached) and the data
    token x_{t+k+1}; a step whose target lies past the answer's end is masked (a prefix per chain)."""
    B, K, T = draft_logits.shape[:3]
    t = torch.arange(T, device=seq.device)
    k = torch.arange(1, K + 1, device=seq.device)
    tgt = (t[None, :] + k[:, None]).clamp(max=T - 1)                        # (K, T)
    targets = target_logits[:, tgt]                                         # (B, K, T, V)
    labels = F.pad(seq, (0, 1))[:, (tgt + 1).clamp(max=T)]                  # (B, K, T)
    mask = (t >= answer_start - 1)[None, None, :] & (t[None, None, :] + k[None, :, None] <= lengths[:, None, None] - 2)
    chain = lambda x: x.transpose(1, 2).flatten(0, 1)                       # (B, K, T, ...) -> (B*T, K, ...)
    keep = mask[:, 0].flatten()                                             # anchors with at least one step
    return chain(draft_logits)[keep], chain(targets)[keep], chain(labels)[keep], chain(mask)[keep]

# ---------------------------------------------------------------------------------------------------
# 7. The RL algorithm: the SFT loss, the pre-RL MTP training loss (backbone frozen), and GRPO whose
# rollouts come from exact speculative decoding. grpo_step is one whole step, to read or copy.


def backbone_parameters(model: GPT):
    return [p for n, p in model.named_parameters() if not n.startswith("mtp.")]


def sft_loss(model: GPT, seq, lengths):
    """Next-token cross-entropy on the answer tokens only (digits and the end mark)."""
    logits = model(seq[:, :-1])
    mask = answer_mask(lengths, seq.size(1) - 1, PROMPT_LEN, seq.device)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), seq[:, 1:].flatten(), reduction="none").view(mask.shape)
    return (ce * mask).sum() / mask.sum()


def mtp_training_loss(model: GPT, kind: str, seq, lengths, n_steps: int, backbone=None):
    """MTP loss teacher-forced on sequences; the backbone is frozen (no gradient reaches it). backbone:
    model.backbone_outputs(seq) if already computed (heads trained on one fixed set can share it)."""
    target_logits, x = model.mtp_features(seq, n_steps, backbone)
    draft, target, labels, mask = mtp_chain_targets(seq, lengths, target_logits, x, PROMPT_LEN)
    # The shared head is applied inside the loss (the TV losses fuse it, never holding all the logits);
    # detached, so that the MTP loss reaches only the MTP weights.
    return mtp_loss(kind, draft, target, labels, mask, head_weight=model.lm_head.weight.detach())


def group_advantages(rewards, group_size: int, eps: float = 1e-6):
    """GRPO: (R - mean_G) / (std_G + eps) within each group of G samples of one prompt.
    A group whose samples all scored the same has advantage 0: it teaches nothing, by design."""
    R = rewards.view(-1, group_size)
    return ((R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + eps)).flatten()


def grpo_loss(logp, old_logp, advantages, mask, clip_eps: float = 0.2, kl_coef: float = 0.0, ref_logp=None,
              entropy_coef: float = 0.0, entropy=None):
    """Clipped-ratio surrogate (Eq. 3), averaged per token within a sample, then over samples.

    logp (B, T) from the trainer's forward; old_logp (B, T) straight from the rollout (no extra
    forward); optional k3 estimate of KL(pi || pi_ref) to a frozen reference; optional entropy bonus
    entropy_coef * H(pi) per token (entropy (B, T) with gradient; negative coef pushes entropy down)."""
    # With one update per batch of rollouts and fp32 rollout weights, the ratio starts at 1 up to float
    # rounding (exact sampling: the rollout's log-probs are the policy's), so the gradient is A * grad log p.
    # With bf16 rollout weights (or bf16 autocast in the trainer) the two forwards round differently and
    # the ratio starts near 1, not at it: the clip then also bounds that precision mismatch.
    ratio = torch.exp(logp - old_logp)
    A = advantages[:, None]
    surrogate = torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
    per_token = -surrogate
    if kl_coef > 0:
        log_r = ref_logp - logp
        per_token = per_token + kl_coef * (torch.exp(log_r) - log_r - 1)
    if entropy_coef != 0:
        per_token = per_token - entropy_coef * entropy
    mask = mask.float()
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def policy_logprobs(model: GPT, tokens, prompt_len: int, temperature: float = 1.0):
    """Trainer-side log p and entropy of every generated token at the sampling temperature, the law the
    rollouts were drawn from: (logp (B, T_new), entropy (B, T_new))."""
    logits = model(tokens[:, :-1])[:, prompt_len - 1:].float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, tokens[:, prompt_len:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def autocast(tc: "TrainConfig", device):
    """bf16 autocast around the training forwards (weights, optimizer and loss math stay float32)."""
    if tc.precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rollout(model: GPT, tc: TrainConfig, idx, max_new_tokens: int, generator, chooser=None, graphs=None):
    """The policy's samples for RL: MTP speculative decoding (exact, so on-policy) or plain decoding.
    With gamma "auto" the caller's chooser keeps the costs and acceptance from step to step."""
    model.eval()
    if tc.rollout == "spec":
        return speculative_generate(model, idx, max_new_tokens, gamma=tc.gamma, draft=tc.draft, temperature=tc.temperature,
                                    generator=generator, eos=EOS, graphs=graphs, chooser=chooser)
    return generate(model, idx, max_new_tokens, temperature=tc.temperature, generator=generator, eos=EOS,
                    graphs=graphs)


def update(loss, optimizer, params, grad_clip: float, sync=None):
    """backward, clip, step: one optimizer update, the same in every stage. sync(params), if given, runs
    between backward and clipping (data parallelism averages the gradients over the ranks there)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if sync is not None:
        sync(params)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


def grpo_step(model: GPT, policy: GPT, optimizer, task: DigitSumTask, tc: TrainConfig, prompts, generator, *,
              chooser=None, graphs=None, ref=None, mtp_optimizer=None, sync=None):
    """One GRPO step: rollouts, rewards, group advantages, one clipped policy-gradient update (Eq. 3).

    prompts (idx, S, N) hold each prompt group_size times in a row. policy is what the rollouts run on:
    the model itself, or a bf16 copy of its weights (rollout_weights). ref: a frozen copy for the KL term
    (tc.kl_coef > 0). mtp_optimizer: with tc.mtp_online, the MTP layer is also trained on the rollouts
    (the recipe keeps it frozen). Returns (rollouts, metrics): this process's own numbers; the harness
    reduces them over data-parallel ranks (sync averages the gradients)."""
    idx, S, N = prompts
    t0 = time.perf_counter()
    roll = rollout(policy, tc, idx, task.max_new_tokens, generator, chooser, graphs)
    rollout_s = time.perf_counter() - t0
    rewards, correct = task.reward(roll.new_tokens, S, N)
    advantages = group_advantages(rewards, tc.group_size)

    model.train()
    with autocast(tc, idx.device):
        logp, entropy = policy_logprobs(model, roll.tokens, PROMPT_LEN, tc.temperature)
        ref_logp = policy_logprobs(ref, roll.tokens, PROMPT_LEN, tc.temperature)[0].detach() if ref is not None else None
    # old_logp comes straight from the rollout: exact sampling makes it the policy's own log-prob.
    loss = grpo_loss(logp, roll.logprobs, advantages, roll.mask, tc.clip_eps, tc.kl_coef, ref_logp,
                     tc.entropy_coef, entropy)
    update(loss, optimizer, backbone_parameters(model), tc.grad_clip, sync)
    if mtp_optimizer is not None:
        with autocast(tc, idx.device):
            mtp_l = mtp_training_loss(model, tc.mtp_online, roll.tokens, PROMPT_LEN + roll.mask.sum(1),
                                      model.config.mtp_train_steps)
        update(mtp_l, mtp_optimizer, list(model.mtp.parameters()), tc.grad_clip, sync)

    mask = roll.mask.float()
    hist = roll.stats.get("accept_histogram", [])
    return roll, dict(
        loss=loss.item(), reward=rewards.mean().item(), accuracy=correct.float().mean().item(),
        entropy=((entropy.detach() * mask).sum() / mask.sum()).item(),   # of the policy, per generated token
        rollout_s=rollout_s, tokens_per_s=mask.sum().item() / rollout_s,
        # Kept tokens after the prefill's first, and the row-rounds (target forwards per row) they took.
        kept_tokens=sum((i + 1) * h for i, h in enumerate(hist)), row_rounds=sum(hist),
        drafts_reached=roll.stats.get("drafts_reached", []), drafts_accepted=roll.stats.get("drafts_accepted", []),
        gamma=roll.stats.get("gamma", 0) if tc.rollout == "spec" else 0)


# ===================================================================================================
# The harness. Everything above is the recipe; everything below runs it: speed switched on from outside
# (CUDA graphs, the adaptive draft length), checkpoints, data parallelism, the training stages with their
# progress bars, the experiments, the benchmark and main().
# ===================================================================================================


# ---------------------------------------------------------------------------------------------------
# 8. CUDA graphs. A decoding step launches hundreds of small kernels; at small batch the GPU waits on
# the CPU launching them. Capturing the whole step once and replaying it turns that into one launch.
# Switched on from outside the algorithm: whoever decodes repeatedly (the RL loop, the benchmark) owns a
# CudaGraphs and hands it to generate / speculative_generate, which hand it the same prefill and step
# they run eagerly. It keeps caches and state at fixed addresses per batch shape ("KV caches allocated
# once"), replays the captured step, and reads the done flag one step late so the GPU never waits for
# the host. Sampling stays exact: the random numbers come from a generator registered with the graph.


def cuda_graphs_supported(device) -> bool:
    return torch.device(device).type == "cuda" and hasattr(torch.cuda.CUDAGraph, "register_generator_state")


def warm_up(step, tensors, generator, times: int = 2):
    """Run step() a few times (lazy initialisation such as cuBLAS workspaces must happen before capture),
    then put every tensor and the generator back as they were, so the warm-up leaves no trace."""
    saved, rng = [t.clone() for t in tensors], generator.get_state()
    on_cuda = tensors[0].is_cuda
    side = torch.cuda.Stream() if on_cuda else None
    if on_cuda:
        side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side) if on_cuda else contextlib.nullcontext():
        for _ in range(times):
            step()
    if on_cuda:
        torch.cuda.current_stream().wait_stream(side)
    for t, v in zip(tensors, saved):
        t.copy_(v)
    generator.set_state(rng)


def capture_cuda_graph(step, tensors, generator):
    """Record step() as one CUDA graph and return its replay. step must update `tensors` in place (the
    graph writes to those addresses only), never sync with the host and draw random numbers only from
    `generator`. Recording runs nothing, so capturing changes no tensor."""
    warm_up(step, tensors, generator)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(generator)   # the supported way to use a non-default generator
    with torch.cuda.graph(graph):
        step()
    return graph.replay


class StaticDecoder:
    """The caches, state and generator of one decoding shape, at addresses fixed across calls, and the
    graph captured over them."""

    def __init__(self, model: GPT, B: int, S: int):
        self.caches = Caches(model, B, S)
        self.state = None
        self.generator = torch.Generator(next(model.parameters()).device)
        self.replay = None

    def tensors(self):
        return list(vars(self.state).values()) + self.caches.tensors()

    def enter(self, state, generator):
        """Adopt a freshly prefilled state (copied into the static one after the first call); reseed the
        graph's own generator from the caller's, so the caller's generator still decides the samples."""
        if self.state is None:
            self.state = state
        else:
            for name, value in vars(state).items():
                getattr(self.state, name).copy_(value)
        seed = torch.randint(2**62, (), device=generator.device if generator else "cpu", generator=generator)
        self.generator.manual_seed(int(seed))
        return self.state, self.generator

    def graphed(self, step, strict: bool):
        """The replay of step, captured on first use. A step that rebinds a state field instead of
        updating it in place would be silently wrong in a graph: refuse it here. If the capture itself
        fails and graphs were not insisted on (strict), warn and run this shape eagerly from then on."""
        if self.replay is None:
            fields = dict(vars(self.state))
            try:
                self.replay = capture_cuda_graph(step, self.tensors(), self.generator)
            except RuntimeError as e:
                if strict:
                    raise
                warnings.warn(f"CUDA graph capture failed, decoding this shape eagerly ({e}); "
                              f"--no-cuda-graphs (graphs=None) skips graphs altogether")
                self.replay = step   # the same static state and generator: later calls stay consistent
            rebound = [name for name, t in vars(self.state).items() if t is not fields[name]]
            if rebound:
                raise RuntimeError(f"a graphed step must update its state in place; it rebound {rebound}")
        return self.replay


def repeat_until_done(step, done, max_steps: int, lag: int):
    """Call step() until every row of `done` (B,) is True, at most max_steps times.

    Reading `done` on the host waits for the device. With lag >= 1 the flag is copied to pinned memory
    behind each step and read `lag` steps late, so the GPU always has the next step queued and never waits
    for the host; a batch that has just finished then runs `lag` idle steps, which change nothing (finished
    rows are parked and write nothing)."""
    cuda = done.is_cuda
    if bool(done.all()):
        return
    flags = torch.zeros(lag + 1, dtype=torch.bool, pin_memory=cuda)     # a ring: one slot per step in flight
    events = [torch.cuda.Event() if cuda else None for _ in range(lag + 1)]
    for i in range(max_steps):
        step()
        flags[i % (lag + 1)].copy_(done.all(), non_blocking=cuda)
        if cuda:
            events[i % (lag + 1)].record()
        j = i - lag                                  # the step whose flag is read now
        if j >= 0:
            if cuda:
                events[j % (lag + 1)].synchronize()
            if flags[j % (lag + 1)]:
                return


class CudaGraphs:
    """CUDA graphs for one model's decoding, owned by whoever decodes repeatedly (the RL loop, the
    benchmark) and handed to generate / speculative_generate as `graphs`: no global registry.

    One StaticDecoder per decoding shape, captured on first use and replayed after. All are dropped when
    the model's weights move to new storage (a graph reads the addresses it was captured with), and at most
    max_shapes are kept (each holds a full set of caches): the oldest goes first. If a capture fails, it
    warns and decodes that shape eagerly, or raises with strict=True. lag: steps by which the host reads the
    done flag late (default 1 on CUDA: the GPU always has the next step queued)."""

    def __init__(self, model: GPT, strict: bool = False, max_shapes: int = 8, lag: int = None):
        device = model.lm_head.weight.device
        if not cuda_graphs_supported(device):
            raise ValueError(f"CUDA graphs need a model on a CUDA device and torch >= 2.5 "
                             f"(CUDAGraph.register_generator_state); this model is on {device}, torch {torch.__version__}")
        self.model, self.strict, self.max_shapes = model, strict, max_shapes
        self.lag = (1 if device.type == "cuda" else 0) if lag is None else lag
        self.where, self.decoders = None, {}

    def decoder(self, key, B: int, S: int) -> StaticDecoder:
        """The StaticDecoder of this decoding shape, made on first use."""
        where = tuple(t.data_ptr() for t in itertools.chain(self.model.parameters(), self.model.buffers()))
        if where != self.where:
            self.where, self.decoders = where, {}
        key = key + (S, next(self.model.parameters()).dtype)
        if key not in self.decoders:
            if len(self.decoders) >= self.max_shapes:
                self.decoders.pop(next(iter(self.decoders)))
            self.decoders[key] = StaticDecoder(self.model, B, S)
        return self.decoders[key]

    def decode(self, key, B: int, S: int, prefill, step, generator, max_steps: int):
        """section 5's decoding_loop, with the caches and state of this shape's StaticDecoder and the step replayed."""
        static = self.decoder(key, B, S)
        state, generator = static.enter(prefill(static.caches), generator)
        replay = static.graphed(functools.partial(step, static.caches, state, generator=generator), self.strict)
        repeat_until_done(replay, state.done, max_steps, self.lag)
        return state


# ---------------------------------------------------------------------------------------------------
# 9. Adaptive draft length: speculation that never loses. Whether drafting pays depends on the batch size,
# the device and the acceptance: at a batch where the verify forward is compute bound, checking gamma+1
# tokens costs nearly gamma+1 plain steps. gamma="auto" picks, once per call, the draft length with the most
# expected tokens per second, E(gamma) / C(B, gamma): E from Eq. 12 with running per-depth acceptance and
# the share of it that reaches the batch's slowest row, C the cost of one round at this batch shape (a plain
# step for gamma = 0, which then decodes plainly), profiled once and then learned from the calls' wall times.
# Now and then it runs a close second choice, so that its estimates stay current.
# The choice sees only earlier calls and the costs, never the target's probabilities of the call it decides,
# and every gamma is exact, so sampling stays exact (the tests force a schedule through every gamma).


@torch.no_grad()
def round_costs(model: GPT, B: int, P: int, max_new_tokens: int, max_gamma: int, cuda_graphs: bool,
                repeats: int = 5) -> list:
    """Seconds of one decoding step at batch B, prompt length P: [plain step, round with gamma = 1..max_gamma],
    each eager or replayed as a CUDA graph, measured with the caches of a real call; the rounds' costs as the
    line through them (round_cost_line). Eager steps include the loop's host read of `done`, as in a call."""
    device = model.lm_head.weight.device
    gen = torch.Generator(device).manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (B, P), device=device, generator=gen)
    lengths = torch.full((B,), P, device=device)
    S = P + max_new_tokens + max_gamma
    plain_caches, caches = Caches(model, B, S), Caches(model, B, S)
    plain = plain_prefill(model, plain_caches, idx, lengths, max_new_tokens, 1.0, gen, None)
    spec = speculative_prefill(model, caches, idx, lengths, max_new_tokens, max_gamma, 1.0, gen, None)
    tensors = list(vars(plain).values()) + list(vars(spec).values()) + plain_caches.tensors() + caches.tensors()
    steps = [lambda g: plain_step(model, plain_caches, plain, 1.0, None, max_new_tokens, generator=g)] + [
        functools.partial(lambda g, k: speculative_round(model, caches, spec, k, 1.0, False, None, max_new_tokens,
                                                         generator=g), k=k) for k in range(1, max_gamma + 1)]
    calls = []
    for fn, state in zip(steps, [plain] + [spec] * max_gamma):
        g = torch.Generator(device).manual_seed(1)
        fn = functools.partial(fn, g)
        calls.append(capture_cuda_graph(fn, tensors, g) if cuda_graphs else
                     functools.partial(lambda fn, state: (fn(), bool(state.done.all())), fn, state))
    # Blocks of every step interleaved, the best block of each kept: a burst of other work on a shared
    # machine only adds time, and cannot land on one gamma's measurement alone.
    costs = [math.inf] * len(calls)
    for _ in range(5):
        for i, fn in enumerate(calls):
            costs[i] = min(costs[i], timed(fn, repeats, device, blocks=1))
    return costs[:1] + round_cost_line(costs[1:])


@torch.no_grad()
def prefill_costs(model: GPT, B: int, P: int, max_new_tokens: int, max_gamma: int) -> list:
    """Seconds of a call's parts outside its decoding steps, [plain, speculative]: the caches, the prefill
    (the speculative one also feeds the MTP layer the prompt) and the ending. adaptive_generate subtracts
    them from a call's wall time to learn the cost of its steps."""
    device = model.lm_head.weight.device
    idx = torch.randint(0, model.config.vocab_size, (B, P), device=device, generator=torch.Generator(device))
    lengths = torch.full((B,), P, device=device)
    S = P + max_new_tokens + max_gamma
    def call(speculative):
        caches = Caches(model, B, S)
        s = (speculative_prefill(model, caches, idx, lengths, max_new_tokens, max_gamma, 1.0, None, None)
             if speculative else plain_prefill(model, caches, idx, lengths, max_new_tokens, 1.0, None, None))
        finish(idx, lengths, False, s, max_new_tokens, None, {})
    return [timed(functools.partial(call, speculative), 3, device) for speculative in (False, True)]


def round_cost_line(costs):
    """The least-squares line through the round costs of gamma = 1..K. A round costs a fixed part (the verify
    forward's weights, sampling, bookkeeping) plus a part per drafted token (one draft step, one more token
    to verify), so the line pools every timing: single timings on a shared machine can make gamma 2 look
    dearer than gamma 4, and the choice would follow that noise."""
    if len(costs) < 3:
        return list(costs)
    g = torch.arange(1, len(costs) + 1, dtype=torch.float64)
    c = torch.tensor(costs, dtype=torch.float64)
    slope = ((g - g.mean()) * (c - c.mean())).sum() / ((g - g.mean()) ** 2).sum()
    return (c.mean() + slope * (g - g.mean())).tolist()


class DraftLengthChooser:
    """Chooses gamma for each call from measured round costs and running acceptance.

    alphas: per-depth acceptance estimates (the prior: e.g. the MTP training's teacher-forced acceptance;
    without one, 0.8 at every depth, and depths not yet measured follow the deepest measured one),
    replaced by each call's counted acceptance (an exponential average with weight `smoothing` on the new
    call) for the depths that call reached.

    Costs: each batch shape is profiled once (round_costs: each step alone, at its best, every gamma
    interleaved); then every call measures the cost of the steps it ran, which includes what the profile
    leaves out (the loop around the steps, caches in use, other work on the machine). C(B, gamma) =
    level x profile(gamma) x offset(gamma): `level`, how much slower than the profile the machine runs now
    (a running average over the latest calls at this shape, weight `drift` on the newest), and offset(gamma),
    how that gamma's calls compared with the level set just before them by calls of other gammas (pooled
    from `prior_calls` calls at 1). The offsets are paired comparisons: a slow minute on this shared machine
    slows every gamma alike, so it moves the level, and does not count against whichever gamma ran then.

    A batch finishes when its slowest row does, so what a round buys the batch is the advance of its
    critical path, (longest row's tokens - 1) / rounds, which falls short of the mean E(gamma) of Eq. 12 more
    as the batch grows (the unluckiest of B rows sets the pace) and for short answers (the last round is cut
    at the end mark), and more for longer drafts (measured at batch 128 on the CPU: 0.76 of Eq. 12's drafted
    part reaches the critical path at gamma 1, 0.49 at gamma 5). Per batch shape and gamma, the efficiency is
    the ratio of the two drafted parts, advance - 1 over E(gamma) - 1, pooled over the calls (sums of both,
    starting from `prior_tokens` drafted tokens at the ratio of the shape's other gammas, or 1): one call
    at batch 1 is a handful of rounds of one row, too noisy to decide alone, and an unlucky one would
    otherwise switch drafting off at that shape for good.

    A chooser that keeps picking one gamma learns nothing more about the others, so now and then it runs
    its second choice (pick says when)."""

    def __init__(self, max_gamma: int, alphas=None, smoothing: float = 0.5, prior_tokens: float = 32.0,
                 prior_calls: float = 1.0, drift: float = 0.2, explore_every: int = 8):
        self.max_gamma, self.smoothing, self.prior_tokens = max_gamma, smoothing, prior_tokens
        self.prior_calls, self.drift, self.explore_every = prior_calls, drift, explore_every
        self.follow_deepest = alphas is None
        self.alphas = list(alphas) if alphas is not None else [0.8] * max_gamma
        self.observed = [0] * max_gamma   # measurements folded in, per depth
        self.costs = {}      # (B, P, max_new_tokens, graphs) -> profiled seconds per step, gamma = 0..max_gamma
        self.prefill = {}    # same keys -> profiled seconds outside the steps, [plain call, speculative call]
        self.level = {}      # same keys -> the calls' seconds per step over the profile's, lately
        self.offset = {}     # same keys -> {gamma: [sum over its calls of (their ratio / level), calls]}
        self.last = {}       # same keys -> the gamma of the last call
        self.drafted = {}    # same keys -> {gamma: [drafted tokens the critical path gained, Eq. 12 expected]}
        self.streak = {}     # same keys -> [gamma, calls in a row that picked it]
        self.chosen = {}     # same keys -> {gamma: calls}

    def expected_tokens(self, gamma: int, efficiency: float = 1.0) -> float:
        """Tokens a round advances the batch: Eq. 12, its drafted part scaled by the batch's efficiency."""
        return 1 + efficiency * (tokens_per_forward(self.alphas[:gamma]) - 1)

    def round_cost(self, shape) -> list:
        """C(B, gamma) for gamma = 0..max_gamma at this shape: level x profile x offset."""
        return [self.level.get(shape, 1.0) * c * self.offset_of(shape, g) for g, c in enumerate(self.costs[shape])]

    def offset_of(self, shape, gamma: int) -> float:
        """offset(gamma): its calls' ratio to the level of their time, pooled from `prior_calls` calls at 1."""
        total, calls = self.offset.get(shape, {}).get(gamma, (0.0, 0))
        return (self.prior_calls + total) / (self.prior_calls + calls)

    def efficiency(self, shape) -> list:
        """Per gamma = 0..max_gamma, the share of Eq. 12's drafted part that reaches this shape's critical path:
        that gamma's calls pooled from a prior of `prior_tokens` at the other gammas' pooled share (1 if none)."""
        sums, w = self.drafted.get(shape, {}), self.prior_tokens
        pool = lambda gained, expected, prior: (w * prior + gained) / (w + expected) if w + expected > 0 else prior
        shares = []
        for g in range(self.max_gamma + 1):
            others = [v for k, v in sums.items() if k != g]
            prior = pool(sum(v[0] for v in others), sum(v[1] for v in others), 1.0)
            shares.append(max(0.0, pool(*sums.get(g, (0.0, 0.0)), prior)))
        return shares

    def rates(self, costs, efficiency=1.0) -> list:
        """Expected tokens per second of each gamma, E(gamma) / C(gamma); efficiency: one for all, or per gamma."""
        eff = efficiency if isinstance(efficiency, list) else [efficiency] * len(costs)
        return [self.expected_tokens(g, e) / c for g, (c, e) in enumerate(zip(costs, eff))]

    def choose(self, costs, efficiency=1.0) -> int:
        """argmax_gamma E(gamma) / C(gamma) over gamma = 0..len(costs)-1 (ties: the shorter draft)."""
        rate = self.rates(costs, efficiency)
        return max(range(len(rate)), key=lambda g: (rate[g], -g))

    def pick(self, shape) -> int:
        """choose() for a profiled shape, except that it explores once (the streak then starts again) after
        `explore_every` calls in a row with the same pick, or, while the candidate never ran here, right after
        a call with the same best. The candidate is the runner-up, or plain decoding while it never ran and a
        draft length leads (rounds say nothing about plain's offset). Its cost and acceptance are then
        measured, not only profiled or assumed."""
        rate = self.rates(self.round_cost(shape), self.efficiency(shape))
        best, runner_up = sorted(range(len(rate)), key=lambda g: (-rate[g], g))[:2]
        ran = self.chosen.setdefault(shape, {})   # gamma -> calls at this shape
        candidate = 0 if best > 0 and 0 not in ran else runner_up
        gamma, count = self.streak.get(shape, (None, 0))
        count = count + 1 if best == gamma else 1
        explore = count > self.explore_every or (count > 1 and candidate not in ran)
        self.streak[shape] = [best, 0 if explore else count]
        gamma = candidate if explore else best
        ran[gamma] = ran.get(gamma, 0) + 1
        return gamma

    def observe_cost(self, shape, gamma: int, seconds: float, steps: int):
        """Fold in a call's wall time: `steps` steps with this gamma (0: plain) took `seconds` minus the
        profiled parts outside the steps."""
        if steps > 0:
            outside = self.prefill[shape][gamma > 0] if shape in self.prefill else 0.0
            ratio = max(seconds - outside, 0.0) / steps / self.costs[shape][gamma]   # over the profile
            level = self.level.get(shape)
            # A call with another gamma than the last one is compared with the level the last calls set just
            # before it; a call with the same gamma cannot tell a slower gamma from a slower machine, and only
            # moves the level.
            if level is not None and self.last.get(shape) != gamma:
                total, calls = self.offset.setdefault(shape, {}).get(gamma, (0.0, 0))
                self.offset[shape][gamma] = [total + ratio / level, calls + 1]
            machine = ratio / self.offset_of(shape, gamma)
            self.level[shape] = machine if level is None else level + self.drift * (machine - level)
            self.last[shape] = gamma

    def observe_batch(self, shape, gamma: int, longest: int, rounds: int):
        """Fold in a call's critical-path advance (its longest row kept `longest` tokens in `rounds` rounds)."""
        drafted = tokens_per_forward(self.alphas[:gamma]) - 1
        if rounds > 0 and drafted > 0:
            gained, expected = self.drafted.setdefault(shape, {}).get(gamma, (0.0, 0.0))
            self.drafted[shape][gamma] = [gained + (longest - 1 - rounds), expected + rounds * drafted]

    def state(self) -> dict:
        return dict(alphas=list(self.alphas), observed=list(self.observed), costs=dict(self.costs),
                    prefill=dict(self.prefill), level=dict(self.level), last=dict(self.last),
                    offset={k: dict(v) for k, v in self.offset.items()},
                    drafted={k: dict(v) for k, v in self.drafted.items()},
                    chosen={k: dict(v) for k, v in self.chosen.items()}, streak=dict(self.streak))

    def load(self, state: dict):
        self.alphas, self.observed = list(state["alphas"]), list(state["observed"])
        self.costs = dict(state["costs"])
        # Older checkpoints kept calls and drafted tokens over all shapes or gammas (dropped), and lack the rest:
        self.chosen = {k: dict(v) for k, v in state["chosen"].items() if isinstance(v, dict)}
        self.drafted = {k: dict(v) for k, v in state.get("drafted", {}).items() if isinstance(v, dict)}
        self.streak = dict(state.get("streak", {}))
        self.prefill, self.level = dict(state.get("prefill", {})), dict(state.get("level", {}))
        self.last = dict(state.get("last", {}))
        self.offset = {k: dict(v) for k, v in state.get("offset", {}).items()}

    def observe(self, stats):
        """Fold a call's counted per-depth acceptance into the estimates (depths it did not reach keep theirs,
        or, without a given prior, follow the deepest one measured)."""
        for j, (a, r) in enumerate(zip(stats.get("drafts_accepted", []), stats.get("drafts_reached", []))):
            if r > 0:   # the first measurement of a depth replaces its prior, later ones are averaged in
                weight = self.smoothing if self.observed[j] else 1.0
                self.alphas[j] += weight * (a / r - self.alphas[j])
                self.observed[j] += 1
        measured = [j for j in range(self.max_gamma) if self.observed[j]]
        if self.follow_deepest and measured:
            # Acceptance falls with depth, so this guess errs high: the depth gets drafted and measured.
            for j in range(measured[-1] + 1, self.max_gamma):
                self.alphas[j] = self.alphas[measured[-1]]


def adaptive_generate(model: GPT, prompt, max_new_tokens: int, chooser: DraftLengthChooser, **kwargs):
    """gamma="auto": profile this batch shape once, pick gamma (exploring now and then), decode (plainly for
    gamma = 0), learn the costs and acceptance from the call."""
    B = len(prompt)
    P = prompt.size(1) if isinstance(prompt, torch.Tensor) else max(len(r) for r in prompt)
    graphs = kwargs.get("graphs") is not None
    shape = (B, P, int(max_new_tokens), graphs)
    device = model.lm_head.weight.device
    if shape not in chooser.costs:
        chooser.costs[shape] = round_costs(model, B, P, int(max_new_tokens), chooser.max_gamma, graphs)
        chooser.prefill[shape] = prefill_costs(model, B, P, int(max_new_tokens), chooser.max_gamma)
    gamma = chooser.pick(shape)
    if gamma == 0:
        kwargs.pop("draft")
        wall, out = seconds(lambda: generate(model, prompt, max_new_tokens, **kwargs), device)
        out.stats.update(gamma_rounds={0: out.stats["target_forwards"] - 1})
    else:
        wall, out = seconds(lambda: speculative_generate(model, prompt, max_new_tokens, gamma=gamma, **kwargs), device)
        chooser.observe_batch(shape, gamma, int(out.mask.sum(1).max()), out.stats["rounds"])  # before the alphas move
        chooser.observe(out.stats)
    chooser.observe_cost(shape, gamma, wall, out.stats["target_forwards"] - 1)
    out.stats.update(gamma=gamma, auto=True)
    return out

# ---------------------------------------------------------------------------------------------------
# 10. Data parallelism without branches in the algorithm (nanoGPT's pattern): under torchrun each rank
# draws its own share of the data and rollouts, gradients are averaged, logged numbers are reduced, and
# rank 0 alone prints and writes. Without RANK in the environment the same names take trivial values.


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str):
    """(Dist, device) for this process; starts the process group when launched by torchrun."""
    if int(os.environ.get("RANK", -1)) == -1:
        return Dist(), device
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    return Dist(dist.get_rank(), dist.get_world_size()), device


def all_reduce(values: dict, world: Dist, op: str = "mean") -> dict:
    """Sum or average named numbers (a dict of floats or lists of floats) over the ranks; identity on one."""
    if world.world_size == 1:
        return dict(values)
    sizes = {k: len(v) if isinstance(v, list) else None for k, v in values.items()}
    flat = [x for v in values.values() for x in (v if isinstance(v, list) else [v])]
    t = torch.tensor(flat, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    reduced, out = iter((t / world.world_size if op == "mean" else t).tolist()), {}
    for k, n in sizes.items():
        out[k] = [next(reduced) for _ in range(n)] if n is not None else next(reduced)
    return out


def average_gradients(params, world: Dist):
    """The gradient all-reduce of data parallelism, done by hand so that every stage (including the
    MTP layer, which is trained through model.mtp_logits rather than forward) is covered alike."""
    if world.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world.world_size
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def gather_objects(obj, world: Dist):
    if world.world_size == 1:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out

# ---------------------------------------------------------------------------------------------------
# 11. Checkpoints and resume: a run never loses work, and resumes only what it can continue exactly.


def atomic_save(obj, path: str):
    """Write a checkpoint to a temporary file, then rename: a crash never leaves half a file, and the
    last good checkpoint stays in place until the new one is complete."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class RunError(ValueError):
    """A run that cannot start or go on as asked: bebop says why in one line and exits."""


class CheckpointError(RunError):
    """A checkpoint that cannot be used: unreadable, truncated, hand-edited, or from other settings."""


STAGES = ("sft", "mtp", "grpo")


# The settings each stage's result depends on (a stage depends on the ones before it too). Resuming a stage
# whose checkpoint was made with other values of these would not continue it exactly: refused.
STAGE_SETTINGS = {
    "sft": ("preset", "seed", "task_seed", "sft_steps", "sft_lr", "batch_size", "grad_clip", "precision"),
    "mtp": ("mtp_steps", "mtp_lr", "mtp_loss", "mtp_data", "mtp_ce_warmup"),
    "grpo": ("rl_steps", "rl_lr", "rl_prompts", "group_size", "clip_eps", "kl_coef", "temperature", "gamma",
             "rollout", "draft", "mtp_online", "mtp_online_lr", "entropy_coef"),
}


CHECKPOINT_KEYS = ("stage", "step", "done", "model", "optimizers", "rng", "world_size", "train", "model_config", "extra")


class Run:
    """Output folder, JSON-lines log and per-stage checkpoints of one `python bebop.py` run.

    Work is never lost: a fresh run refuses an --out that holds another run's checkpoints unless told
    `overwrite`, and even then removes nothing until it has a checkpoint of its own to put in their place;
    `resume` continues only checkpoints made with the same settings."""

    def __init__(self, out: str, train: TrainConfig, model_cfg: GPTConfig, resume: bool, world: Dist = Dist(),
                 overwrite: bool = False, first_stage: str = "sft"):
        self.out, self.train, self.model_cfg, self.world, self.resume = out, train, model_cfg, world, resume
        self.stale = []              # another run's checkpoints, removed once this run has saved its own
        self.log_file, self.log_mode = None, "a" if resume else "w"
        if os.path.exists(out) and not os.path.isdir(out):
            raise RunError(f"--out {out} is a file; give a folder (it is created if missing)")
        try:
            if world.master:
                os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create --out {out}: {e.strerror}") from None
        if world.master and not os.access(out, os.W_OK | os.X_OK):
            raise RunError(f"--out {out} is not writable")
        found = [stage for stage in STAGES if os.path.exists(self.path(stage))]
        if resume:
            if not found and world.master and first_stage == "sft":
                print(f"bebop: nothing to resume in {out}: starting from scratch")
            earlier = STAGES[STAGES.index(first_stage):STAGES.index(found[-1])] if found else ()
            missing = [stage for stage in earlier if stage not in found]   # (experiments keep one stage a folder)
            if missing:
                raise CheckpointError(f"{out} holds {found[-1]}.pt but no {missing[0]}.pt: a later stage without an "
                                      f"earlier one cannot be continued; move the folder away or use another --out")
        elif found and not overwrite:
            raise RunError(f"{out} holds checkpoints of another run ({', '.join(s + '.pt' for s in found)}); "
                           f"continue it with --resume, replace it with --overwrite, or use another --out")
        else:
            self.stale = found
        if world.world_size > 1:
            dist.barrier()   # the folder is ready before anyone reads it

    def path(self, stage):
        return os.path.join(self.out, f"{stage}.pt")

    def log(self, stage, step, **metrics):
        if not self.world.master:
            return
        if self.log_file is None:   # opened at the first entry: an overwritten run's log lasts until then
            self.log_file = open(os.path.join(self.out, "log.jsonl"), self.log_mode)
        self.log_file.write(json.dumps(dict(stage=stage, step=step, **metrics)) + "\n")
        self.log_file.flush()

    def save(self, stage, step, done, model, optimizers, generators, extra=None):
        """Every rank takes part (each has its own random streams); rank 0 writes."""
        rng = gather_objects(dict(generators=[g.get_state() for g in generators], torch=torch.get_rng_state()),
                             self.world)
        if self.world.master:
            atomic_save(dict(stage=stage, step=step, done=done, model=model.state_dict(),
                             optimizers=[o.state_dict() for o in optimizers], rng=rng, world_size=self.world.world_size,
                             train=asdict(self.train), model_config=asdict(self.model_cfg), extra=extra or {}),
                        self.path(stage))
            for old in self.stale:   # this run now has a checkpoint: the other run's are superseded
                if old != stage and os.path.exists(self.path(old)):
                    os.remove(self.path(old))
            self.stale = []

    def load(self, stage):
        """The stage's checkpoint when resuming, else None. A checkpoint that is unreadable, lacks a key,
        was made with another model config, other settings of this stage or the ones before it, or another
        number of ranks is refused with a message; the file is left as it is."""
        path = self.path(stage)
        if not self.resume or not os.path.exists(path):
            return None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({type(e).__name__}); "
                                  f"move it away or run without --resume") from None
        if missing:
            raise CheckpointError(f"checkpoint {path} is unreadable or truncated (no {missing[0]!r}); "
                                  f"move it away or run without --resume")
        for key, now in asdict(self.model_cfg).items():
            then = ckpt["model_config"].get(key)
            if then != now:
                raise CheckpointError(f"checkpoint {path} was made with {key}={then}, this run has {key}={now}")
        keys = [k for s in STAGES[:STAGES.index(stage) + 1] for k in STAGE_SETTINGS[s]]
        now = asdict(self.train)
        differ = [f"{k} {ckpt['train'].get(k)!r} -> {now[k]!r}" for k in keys if ckpt["train"].get(k) != now[k]]
        if differ:
            raise CheckpointError(f"checkpoint {path} was made with other settings ({', '.join(differ)}); resume "
                                  f"with the same flags, or start afresh with --overwrite or another --out")
        if ckpt["world_size"] != self.world.world_size:
            raise CheckpointError(f"checkpoint {path} was made with {ckpt['world_size']} ranks, this run has "
                                  f"{self.world.world_size}; resume with the same --nproc_per_node")
        return ckpt

# ---------------------------------------------------------------------------------------------------
# 12. Training stages: SFT of the backbone, pre-RL MTP training (backbone frozen), GRPO; each a loop of
# steps with a progress bar, a JSON log and checkpoints (run_stage).


def lr_at(step: int, total: int, base: float, warmup: int):
    """Linear warmup, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def rollout_weights(model: GPT, precision: str) -> GPT:
    """The model that rollouts run on: `model` itself in fp32; in bf16 a copy with bf16 parameters (the
    rotary tables stay float32), refreshed in place before every rollout, the way an RL system syncs the
    trainer's weights into its inference engine. Not autocast: that re-casts every float32 weight on every
    forward (a CUDA graph cannot keep autocast's cast cache), while bf16 weights read half the bytes."""
    if precision == "fp32":
        return model
    copy = deepcopy(model).eval()
    for p in copy.parameters():
        p.requires_grad_(False)
        p.grad = None
        p.data = p.data.to(torch.bfloat16)
    return copy


@torch.no_grad()
def refresh_rollout_weights(rollout_model: GPT, model: GPT):
    """Copy the trainer's weights into the rollout copy in place (addresses fixed: graphs stay valid)."""
    if rollout_model is not model:
        for dst, src in zip(rollout_model.parameters(), model.parameters()):
            dst.copy_(src)


def run_stage(run: Run, stage: str, steps: int, step_fn, model, optimizers, generators, describe, extra=None):
    """The loop every stage shares: resume, tqdm bar, JSON log, periodic and Ctrl-C checkpoints.

    step_fn(step) does one optimisation step and returns a dict of (already rank-reduced) numbers to
    log; describe(metrics) picks what the progress bar shows."""
    start = 0
    ckpt = run.load(stage)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            if len(ckpt["optimizers"]) != len(optimizers):
                raise ValueError("optimizers")
            for optimizer, state in zip(optimizers, ckpt["optimizers"]):
                optimizer.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {run.path(stage)} is unreadable or truncated (it does not fit this "
                                  f"model: {str(e).splitlines()[0][:120]}); move it away or run without --resume") from None
        rng = ckpt["rng"][run.world.rank]
        for g, state in zip(generators, rng["generators"]):
            g.set_state(state)
        torch.set_rng_state(rng["torch"])
        if extra is not None:
            extra.update(ckpt["extra"])
        start = ckpt["step"]
        if ckpt["done"]:
            return
    # Ctrl-C finishes the step in flight, saves, then stops: a resumed run continues exactly where this
    # one stopped. The ranks agree on when to stop (a flag reduced every step). A second Ctrl-C
    # interrupts at once.
    interrupted = []
    def on_sigint(signum, frame):
        interrupted.append(signum)
        signal.signal(signal.SIGINT, previous)
    previous = signal.signal(signal.SIGINT, on_sigint) if is_main_thread() else None
    try:
        bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, dynamic_ncols=True,
                   mininterval=0.5, disable=not run.world.master)
        for step in bar:
            metrics = step_fn(step)
            if not math.isfinite(metrics["loss"]):   # the weights are already spoiled: save nothing
                bar.close()
                raise RunError(f"{stage} step {step}: the loss is {metrics['loss']}; stopped. The last checkpoint "
                               + (f"({run.path(stage)}) is kept" if os.path.exists(run.path(stage)) else
                                  "of this stage was never written") + "; lower a learning rate or a coefficient")
            run.log(stage, step, **metrics)
            bar.set_postfix_str(describe(metrics), refresh=False)
            if all_reduce(dict(interrupted=float(bool(interrupted))), run.world, op="sum")["interrupted"] > 0:
                run.save(stage, step + 1, False, model, optimizers, generators, extra)
                bar.n = step + 1                           # the bar shows the step that was saved
                bar.refresh()
                bar.close()
                raise KeyboardInterrupt(f"saved {run.path(stage)} at step {step + 1}; continue with --resume")
            if (step + 1) % run.train.ckpt_every == 0 and step + 1 < steps:
                run.save(stage, step + 1, False, model, optimizers, generators, extra)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    run.save(stage, steps, True, model, optimizers, generators, extra)


def is_main_thread():
    return threading.current_thread() is threading.main_thread()


@torch.no_grad()
def evaluate(model: GPT, task: DigitSumTask, prompts, seed: int, gamma: int, graphs=None,
             temperature: float = 1.0):
    """Mean reward and exact accuracy on a fixed prompt set, sampling at the RL temperature. A fixed draft
    length, whatever the rollouts use: with "auto" the random stream would follow measured timings, and
    the same checkpoint would score differently from run to run (the law is the same either way)."""
    gamma = BENCH_GAMMA if gamma == "auto" else gamma
    idx, S, N = prompts
    was_training = model.training
    model.eval()
    gen = torch.Generator(idx.device).manual_seed(seed)
    roll = speculative_generate(model, idx, task.max_new_tokens, gamma=gamma, generator=gen, eos=EOS,
                                temperature=temperature, graphs=graphs)
    model.train(was_training)
    r, acc = task.reward(roll.new_tokens, S, N)
    return r.mean().item(), acc.float().mean().item()


def train_sft(run: Run, model: GPT, task: DigitSumTask, gen_data, device):
    """Supervised fine-tuning of the backbone on the house-style examples (answer tokens only)."""
    tc, world = run.train, run.world
    params = backbone_parameters(model)
    opt = torch.optim.AdamW(params, lr=tc.sft_lr, betas=(0.9, 0.95), weight_decay=0.0)

    def step_fn(step):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc.sft_steps, tc.sft_lr, warmup=min(100, tc.sft_steps // 10 + 1))
        seq, lengths = task.sft_batch(tc.batch_size // world.world_size, gen_data)   # this rank's share
        with autocast(tc, device):
            loss = sft_loss(model, seq.to(device), lengths.to(device))
        update(loss, opt, params, tc.grad_clip, sync=functools.partial(average_gradients, world=world))
        return all_reduce(dict(loss=loss.item()), world)

    model.train()
    run_stage(run, "sft", tc.sft_steps, step_fn, model, [opt], [gen_data], lambda m: f"loss {m['loss']:.3f}")


@torch.no_grad()
def policy_samples(model: GPT, task: DigitSumTask, n: int, generator, batch: int = 1024):
    """n sequences [prompt, answer, padding] written by the policy itself at temperature 1, laid out like
    task.sft_batch: the paper's "RFT data". On its own samples a hard-label CE target is a draw from p,
    so CE estimates the same target as forward KL; on SFT data it would learn the data's law instead."""
    was_training = model.training
    model.eval()
    seqs, lengths = [], []
    for i in range(0, n, batch):
        idx, _, _ = task.prompts(min(batch, n - i), generator)
        gen = torch.Generator(model.lm_head.weight.device).manual_seed(int(torch.randint(2**62, (), generator=generator)))
        out = generate(model, idx.to(model.lm_head.weight.device), task.max_new_tokens, generator=gen, eos=EOS)
        seqs.append(torch.cat([idx, out.new_tokens.cpu()], 1))
        lengths.append(PROMPT_LEN + out.mask.sum(1).cpu())
    model.train(was_training)
    return torch.cat(seqs), torch.cat(lengths)


def train_mtp(run: Run, model: GPT, task: DigitSumTask, gen_data, device, data=None, until=None):
    """Pre-RL MTP training: the backbone is frozen, the MTP layer learns to match its own law.

    Data (mtp_data): "policy" (default, the paper's) is one epoch over mtp_steps x batch_size sequences
    the frozen policy wrote itself (`data`, a function returning (seq, lengths) or (seq, lengths, backbone
    hidden, backbone logits), may hand in one set that several heads share); "sft" draws fresh SFT examples, whose law is not the policy's. `until` stops after that
    many steps (the schedule still spans mtp_steps), so heads can share their CE warm-up. As in the paper, the chosen objective is a
    pass over a head that was first trained with CE (the way real MTP heads come out of pretraining):
    TV's gradient q (S - 1 + 1[q > p]) vanishes on tokens the head gives no mass, so a cold-started TV
    head never learns a rare but certain token (here the end mark). The first mtp_ce_warmup of the steps
    are CE; set it to 0 for a cold start."""
    tc, world, K = run.train, run.world, model.config.mtp_train_steps
    params = list(model.mtp.parameters())
    opt = torch.optim.AdamW(params, lr=tc.mtp_lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup_steps = int(tc.mtp_ce_warmup * tc.mtp_steps)
    B = tc.batch_size // world.world_size
    pool = {}

    def batch(step):
        if tc.mtp_data == "sft":
            return task.sft_batch(B, gen_data)
        if "data" not in pool:   # made on first use (a resumed run regenerates the same set), then shuffled
            g = torch.Generator().manual_seed(tc.seed + 2 + 1000 * world.rank)
            columns = data() if data is not None else policy_samples(model, task, tc.mtp_steps * B, g)
            if columns[0].size(0) < tc.mtp_steps * B:
                raise ValueError(f"MTP data has {columns[0].size(0)} sequences; {tc.mtp_steps} steps x {B} need more")
            order = torch.randperm(columns[0].size(0), generator=g)[:tc.mtp_steps * B]
            pool["data"] = [c[order.to(c.device)] for c in columns]
        return [c[step * B:(step + 1) * B] for c in pool["data"]]

    def step_fn(step):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc.mtp_steps, tc.mtp_lr, warmup=min(50, tc.mtp_steps // 10 + 1))
        kind = "ce" if step < warmup_steps else tc.mtp_loss
        seq, lengths, *backbone = batch(step)
        with autocast(tc, device):
            loss = mtp_training_loss(model, kind, seq.to(device), lengths.to(device), K, backbone or None)
        update(loss, opt, params, tc.grad_clip, sync=functools.partial(average_gradients, world=world))
        return dict(**all_reduce(dict(loss=loss.item()), world), objective=kind)

    model.train()
    run_stage(run, "mtp", until or tc.mtp_steps, step_fn, model, [opt], [gen_data],
              lambda m: f"{m['objective']} {m['loss']:.3f}")


def rl_optimizer(model: GPT, tc: TrainConfig):
    """GRPO's optimizer: AdamW over the backbone (an online MTP layer gets its own, see train_grpo)."""
    return torch.optim.AdamW(backbone_parameters(model), lr=tc.rl_lr, betas=(0.9, 0.95), weight_decay=0.0)


def rollout_graphs(policy: GPT, tc: TrainConfig, device):
    """The rollout weights' own CudaGraphs where the run asks for graphs and the device has them, else None."""
    return CudaGraphs(policy) if tc.cuda_graphs and cuda_graphs_supported(device) else None


def train_grpo(run: Run, model: GPT, task: DigitSumTask, gen_data, gen_roll, device, extra, probe=None):
    """The GRPO stage: grpo_step repeated, with a frozen MTP layer by default (the recipe), around it what
    a run needs: this rank's prompts, the rollout weights and their CUDA graphs, the draft-length chooser
    (checkpointed, so a resumed run decides as the interrupted one would have), metrics reduced over ranks.
    probe(step, state, roll), if given, returns extra numbers to log for each step, measured on the weights
    that wrote the step's rollouts (`state`, the model's state dict before the update): the experiments
    measure several heads that way."""
    tc, world, G = run.train, run.world, run.train.group_size
    opt = rl_optimizer(model, tc)
    mtp_opt = [] if tc.mtp_online == "none" else [   # paper 5.3: own optimizer, learning rate and clipping
        torch.optim.AdamW(model.mtp.parameters(), lr=tc.mtp_online_lr, betas=(0.9, 0.95), weight_decay=0.0)]
    policy = rollout_weights(model, tc.precision)   # what rollouts run on (model itself in fp32)
    graphs = rollout_graphs(policy, tc, device)
    K = model.config.mtp_train_steps
    chooser = DraftLengthChooser(K) if tc.gamma == "auto" else None   # owned by this loop: costs profiled once
    depth = K if tc.gamma == "auto" else tc.gamma                       # draft depths logged per step
    ref = None
    if tc.kl_coef > 0:
        ref = GPT(model.config).to(device)
        ref.load_state_dict(model.state_dict())
        ref.requires_grad_(False).eval()
    sync = functools.partial(average_gradients, world=world)

    first_step = []   # the step this process starts at (run_stage restores `extra` before it)

    def step_fn(step):
        # This rank's prompts; every group of G samples of one prompt stays on one rank, so advantages
        # need no communication.
        first_step[:] = first_step or [step]
        t_step = time.perf_counter()
        idx, S, N = task.prompts(tc.rl_prompts // world.world_size, gen_data)
        prompts = tuple(x.repeat_interleave(G, 0).to(device) for x in (idx, S, N))
        refresh_rollout_weights(policy, model)
        if chooser is not None and step == first_step[0] and "chooser" in extra:
            chooser.load(extra["chooser"])   # a resumed run decides as the interrupted one would have
        before = {k: v.clone() for k, v in model.state_dict().items()} if probe is not None else None
        roll, m = grpo_step(model, policy, opt, task, tc, prompts, gen_roll, chooser=chooser, graphs=graphs, ref=ref,
                            mtp_optimizer=mtp_opt[0] if mtp_opt else None, sync=sync)
        step_s = time.perf_counter() - t_step
        if chooser is not None:
            extra["chooser"] = chooser.state()
        probed = probe(step, before, roll) if probe is not None else {}

        # Log what a user watches, reduced over ranks: means of per-rank means (equal batch sizes), sums
        # for throughput and draft counts, acceptance recomputed from the pooled counts.
        means = all_reduce(dict(**{k: m[k] for k in ("loss", "reward", "accuracy", "entropy", "rollout_s")},
                                step_s=step_s), world)
        # Draft counts padded to `depth`: ranks (and steps, with gamma "auto") may draft different lengths.
        pad = lambda counts: (counts + [0] * K)[:depth]
        sums = all_reduce(dict(tokens_per_s=m["tokens_per_s"], kept_tokens=m["kept_tokens"], row_rounds=m["row_rounds"],
                               drafts_reached=pad(m["drafts_reached"]), drafts_accepted=pad(m["drafts_accepted"])),
                          world, op="sum")
        chosen = extra.get("gamma_chosen", {})
        extra["gamma_chosen"] = {**chosen, str(m["gamma"]): chosen.get(str(m["gamma"]), 0) + 1}
        metrics = dict(**means, **sums, gamma=m["gamma"],
                       accept_length=sums["kept_tokens"] / sums["row_rounds"] if sums["row_rounds"] else 1.0,
                       acceptance=[a / r if r else None for a, r in zip(sums["drafts_accepted"], sums["drafts_reached"])]
                       if tc.rollout == "spec" else None)
        extra["recent"] = (extra.get("recent", []) + [metrics])[-10:]
        return {**metrics, **probed}

    def describe(m):
        alphas = [a for a in m["acceptance"] or [] if a is not None]
        acc = (f" gamma {m['gamma']}" + (" alpha " + "/".join(f"{a:.2f}" for a in alphas) if alphas else "")
               if tc.rollout == "spec" else "")
        return (f"reward {m['reward']:.3f} acc {m['accuracy']:.2f} H {m['entropy']:.2f}{acc} "
                f"len {m['accept_length']:.2f} {m['tokens_per_s']:.0f} tok/s")

    # The MTP optimizer's state is checkpointed too: a resumed online run continues exactly.
    run_stage(run, "grpo", tc.rl_steps, step_fn, model, [opt] + mtp_opt, [gen_data, gen_roll], describe, extra)


def recent_acceptance(recent):
    """Per-step acceptance alpha_j pooled over the last RL steps (accepted over reached, kept tokens only)."""
    recent = [m for m in recent if m["acceptance"] is not None]
    if not recent:
        return None
    reached = torch.tensor([m["drafts_reached"] for m in recent]).sum(0).tolist()
    accepted = torch.tensor([m["drafts_accepted"] for m in recent]).sum(0).tolist()
    return [a / r if r else None for a, r in zip(accepted, reached)]   # None: a depth never drafted

# ---------------------------------------------------------------------------------------------------
# 13. Experiments: the paper's findings at toy scale. `python bebop.py --experiment NAME` (or `all`).
# All start from one SFT checkpoint (out/sft.pt, trained once and reused); MTP heads and RL runs are
# cached in out/exp_*/ so an interrupted sweep resumes. Results go to out/experiments.json.


EXPERIMENTS = ("losses", "temperature", "rl", "entropy", "decomposition", "boundary")


TEMPERATURES = (0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5)


def fit_line(x, y):
    """Least-squares line y = a + b x: dict(slope b, 95% interval of b, intercept a, points). The interval
    uses the slope's standard error and a t quantile (approximated as 1.96 + 2.4/dof)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    xc = x - x.mean()
    sxx = (xc * xc).sum().clamp(min=1e-12)
    b = float((xc * (y - y.mean())).sum() / sxx)
    a = float(y.mean() - b * x.mean())
    dof = max(len(x) - 2, 1)
    se = float((((y - a - b * x) ** 2).sum() / dof / sxx).sqrt())
    half = (1.96 + 2.4 / dof) * se
    return dict(slope=b, ci=(b - half, b + half), intercept=a, points=len(x))


def fit_slope(x, y):
    """Least-squares slope of y on x."""
    return fit_line(x, y)["slope"]


@torch.no_grad()
def teacher_forced_acceptance(model: GPT, tokens, mask, depth: int, temperature: float = 1.0, backbone=None):
    """Expected acceptance of every drafted position of some sequences, teacher-forced, no sampling noise.

    For each anchor of the answers (prompt length PROMPT_LEN, `mask` marks the kept new tokens) and draft
    depth k = 1..depth: target law p and draft law q at the temperature, H(p), the RS acceptance
    sum_v min(p, q) = 1 - d_TV (Eq. 2) and the TO acceptance p(argmax q) (Eq. 1), each (N, depth), and
    `valid` (N, depth) for steps whose target is a kept token. Depth 1 equals what decoding sees (the
    draft-consistency test proves it); deeper, q conditions on the sequence's own next tokens, as Eq. 12
    and the e2e TV loss assume."""
    lengths = PROMPT_LEN + mask.sum(1)
    target_logits, draft_logits = model.mtp_logits(tokens, depth, backbone)
    draft, target, _, valid = mtp_chain_targets(tokens, lengths, target_logits, draft_logits, PROMPT_LEN)
    p, q = probs_from_logits(target, temperature), probs_from_logits(draft, temperature)
    entropy = -(p * p.clamp(min=1e-30).log()).sum(-1)
    rs = torch.minimum(p, q).sum(-1)
    to = p.gather(-1, q.argmax(-1, keepdim=True)).squeeze(-1)
    return dict(p=p, q=q, entropy=entropy, rs=rs, to=to, valid=valid)


def per_depth(values, valid):
    """Mean over the valid steps of each depth: (N, depth) -> list of depth floats."""
    return ((values * valid).sum(0) / valid.sum(0).clamp(min=1)).tolist()


def tokens_per_forward(alphas):
    """Eq. 12: 1 + sum_j prod_{i<=j} alpha_i, the expected tokens per target forward (bonus included)."""
    return 1 + sum(itertools.accumulate(alphas, lambda a, b: a * b))


def mean_std(values):
    """(mean, sample standard deviation) of a list of numbers; std 0 for one value."""
    v = torch.tensor(values, dtype=torch.float64)
    return v.mean().item(), (v.std().item() if len(values) > 1 else 0.0)


def rank_with_ties(stats):
    """Order names by mean, best first; '>' only where the gap exceeds the two spreads added, else '~'.
    stats: {name: (mean, std)}."""
    names = sorted(stats, key=lambda k: -stats[k][0])
    text = names[0]
    for a, b in zip(names, names[1:]):
        gap, spread = stats[a][0] - stats[b][0], stats[a][1] + stats[b][1]
        text += (" > " if gap > spread else " ~ ") + b
    return text


SEEDS = (0, 1, 2)   # MTP-training seeds (head initialisation and data order) of the experiments' heads


def make_lab(args) -> SimpleNamespace:
    """What the experiments share: the task, the SFT policy, one set of the policy's own samples to train
    MTP heads on (made when a head first needs training), held-out contexts to measure them on, and a
    cache of the heads trained with each loss and seed and of their rollouts."""
    tc, task, cfg, device, _ = configure(args)
    if tc.gamma == "auto":   # the findings are measured at a fixed draft length, the paper's 3
        tc.gamma = BENCH_GAMMA
    torch.manual_seed(tc.seed)
    model = GPT(cfg).to(device)
    train_sft(Run(args.out, tc, cfg, resume=True), model, task, torch.Generator().manual_seed(tc.seed), device)
    # After SFT (shared with `python bebop.py`), the experiments train 18 MTP heads and 6 GRPO runs. To fit
    # `--experiment all` in 30 minutes on a 2-core CPU, heads train on half the batch (same steps, schedule
    # and CE warm-up: half the data) and GRPO steps roll out half the prompts (same group size).
    tc.batch_size, tc.rl_prompts = max(1, tc.batch_size // 2), max(1, tc.rl_prompts // 2)
    held_out = held_out_prompts(task, tc, device)
    # Fixed held-out contexts: the SFT policy's own answers to the held-out prompts, at temperature 1.
    gen = torch.Generator(device).manual_seed(tc.seed + 7)
    ctx = generate(model.eval(), held_out[0], task.max_new_tokens, generator=gen, eos=EOS)
    return SimpleNamespace(tc=tc, task=task, cfg=cfg, device=device, out=args.out, held_out=held_out,
                           sft_state={k: v.clone() for k, v in model.state_dict().items()},
                           contexts=(ctx.tokens, ctx.mask), data=None, heads={})


def lab_mtp_data(lab):
    """The heads' training set, with the frozen backbone's outputs on it computed once for all heads."""
    if lab.data is None:
        model = GPT(lab.cfg).to(lab.device)
        model.load_state_dict(lab.sft_state)
        g = torch.Generator().manual_seed(lab.tc.seed + 2)
        seq, lengths = policy_samples(model, lab.task, lab.tc.mtp_steps * lab.tc.batch_size, g)
        outs = [model.backbone_outputs(chunk.to(lab.device)) for chunk in seq.split(1024)]
        lab.data = (seq, lengths) + tuple(torch.cat(parts) for parts in zip(*outs))
    return lab.data


def train_head(lab, loss: str, seed: int, data: str = "policy"):
    """Train the head of (loss, seed) in out/exp_mtp_{loss}_s{seed}/. All losses of one seed share the
    CE warm-up (the first mtp_ce_warmup of the steps, identical for every loss), trained once. data="sft"
    trains on fresh SFT examples instead of the policy's samples (warm-up included, not shared)."""
    tc = TrainConfig(**{**asdict(lab.tc), "mtp_loss": loss, "seed": lab.tc.seed + seed, "mtp_data": data})
    folder = os.path.join(lab.out, f"exp_mtp_{loss}_s{seed}" + ("_sft_data" if data == "sft" else ""))
    warm = int(tc.mtp_ce_warmup * tc.mtp_steps) if data == "policy" else 0
    model = GPT(lab.cfg).to(lab.device)
    model.load_state_dict(lab.sft_state)
    torch.manual_seed(1000 + seed)
    model.mtp.load_state_dict(GPT(lab.cfg).mtp.state_dict())       # this seed's fresh MTP layer
    shared = functools.partial(lab_mtp_data, lab)
    if warm and not os.path.exists(os.path.join(folder, "mtp.pt")):
        warm_tc = TrainConfig(**{**asdict(tc), "mtp_loss": "ce"})   # the warm-up is CE whatever the loss
        warm_run = Run(os.path.join(lab.out, f"exp_mtp_warmup_s{seed}"), warm_tc, lab.cfg, resume=True,
                       first_stage="mtp")
        train_mtp(warm_run, model, lab.task, torch.Generator().manual_seed(tc.seed), lab.device, data=shared,
                  until=warm)
        ckpt = torch.load(warm_run.path("mtp"), map_location="cpu", weights_only=False)
        os.makedirs(folder, exist_ok=True)   # continue from here, as this loss's run
        atomic_save({**ckpt, "done": False, "train": asdict(tc)}, os.path.join(folder, "mtp.pt"))
    run = Run(folder, tc, lab.cfg, resume=True, first_stage="mtp")
    train_mtp(run, model, lab.task, torch.Generator().manual_seed(tc.seed), lab.device, data=shared)
    return {k: v.clone() for k, v in model.state_dict().items()}


def policy_with_head(lab, loss: str, seed: int = 0, data: str = "policy") -> GPT:
    """The SFT policy with an MTP layer trained by `loss` (same budget, data and seed for every loss)."""
    if (loss, seed, data) not in lab.heads:
        lab.heads[loss, seed, data] = train_head(lab, loss, seed, data)
    model = GPT(lab.cfg).to(lab.device)
    model.load_state_dict(lab.heads[loss, seed, data])
    return model.eval()


def held_out_rollouts(lab, loss: str, temperature=1.0, draft="sample", seed=0, data="policy"):
    """Speculative rollouts on the held-out prompts with the head of (loss, seed); kept for reuse."""
    key = ("rollouts", loss, seed, temperature, draft, data)
    if key not in lab.heads:
        gen = torch.Generator(lab.device).manual_seed(0)
        lab.heads[key] = speculative_generate(policy_with_head(lab, loss, seed, data), lab.held_out[0],
                                              lab.task.max_new_tokens, gamma=lab.tc.gamma,
                                              temperature=temperature, draft=draft, generator=gen, eos=EOS)
    return lab.heads[key]


def expected_on_contexts(lab, model: GPT):
    """Teacher-forced expected acceptance per depth (RS and TO) on the fixed held-out contexts."""
    tok = teacher_forced_acceptance(model, *lab.contexts, lab.tc.gamma)
    return per_depth(tok["rs"], tok["valid"]), per_depth(tok["to"], tok["valid"])


def experiment_losses(lab):
    """Table 2: RS and TO acceptance of MTP heads trained with each loss, over len(SEEDS) seeds of MTP
    training: teacher-forced expected acceptance per depth on fixed held-out contexts (no sampling noise),
    the tokens per forward it implies (Eq. 12), and counted accept length of held-out rollouts, T = 1."""
    result = {}
    variants = [(loss, "policy") for loss in MTP_LOSSES] + [("ce", "sft")]   # + CE on the SFT data: its bias
    for loss, data in variants:
        per_seed = []
        for seed in SEEDS:
            model = policy_with_head(lab, loss, seed, data)
            rs_tf, to_tf = expected_on_contexts(lab, model)
            rs = held_out_rollouts(lab, loss, seed=seed, data=data).stats
            to = held_out_rollouts(lab, loss, draft="greedy", seed=seed, data=data).stats
            per_seed.append(dict(seed=seed, rs_expected_acceptance=rs_tf, to_expected_acceptance=to_tf,
                                 rs_expected_length=tokens_per_forward(rs_tf),
                                 to_expected_length=tokens_per_forward(to_tf),
                                 rs_accept_length=rs["accept_length"], to_accept_length=to["accept_length"],
                                 rs_acceptance=rs["acceptance"], to_acceptance=to["acceptance"]))
        summary = {key: mean_std([r[key] for r in per_seed]) for key in
                   ("rs_expected_length", "to_expected_length", "rs_accept_length", "to_accept_length")}
        for key in ("rs_expected_acceptance", "to_expected_acceptance"):
            summary[key] = [mean_std(col) for col in zip(*[r[key] for r in per_seed])]
        result[loss if data == "policy" else f"{loss}_sft_data"] = dict(seeds=per_seed, data=data, **summary)
    ranking = {key: rank_with_ties({k: result[k][key] for k in MTP_LOSSES})
               for key in ("rs_expected_length", "rs_accept_length", "to_expected_length")}
    print(f"\nlosses (paper Table 2; paper: RS e2e_tv > tv > rkl >= kl = ce, TO nearly equal), mean +- std over "
          f"{len(SEEDS)} seeds of MTP training on the policy's own samples (ce_sft_data: CE on the SFT data); "
          f"expected = teacher-forced on fixed contexts (Eq. 2 per depth, Eq. 12), counted = held-out rollouts")
    print(f"  {'loss':11} {'RS expected alpha_1..3':24} {'RS expected':>13} {'RS counted':>13} {'TO expected':>13} "
          f"{'TO counted':>13}")
    pm = lambda ms: f"{ms[0]:.3f}+-{ms[1]:.3f}"
    for loss, r in result.items():
        alphas = "/".join(f"{m:.3f}" for m, _ in r["rs_expected_acceptance"])
        print(f"  {loss:11} {alphas:24} {pm(r['rs_expected_length']):>13} {pm(r['rs_accept_length']):>13} "
              f"{pm(r['to_expected_length']):>13} {pm(r['to_accept_length']):>13}")
    for key, text in ranking.items():
        print(f"  {key:20} {text}   ('>' only where the gap exceeds both spreads added)")
    result["ranking"] = ranking
    return result


def experiment_temperature(lab):
    """Fig. 12a: RS and TO acceptance across sampling temperatures, CE and e2e-TV heads (counted, rollouts)."""
    result = {}
    for loss in ("ce", "e2e_tv"):
        rows = []
        for T in TEMPERATURES:
            rs, to = held_out_rollouts(lab, loss, T, "sample").stats, held_out_rollouts(lab, loss, T, "greedy").stats
            rows.append(dict(temperature=T, rs_alpha1=rs["acceptance"][0], to_alpha1=to["acceptance"][0],
                             rs_accept_length=rs["accept_length"], to_accept_length=to["accept_length"]))
        result[loss] = rows
    print("\ntemperature (paper Fig. 12a; expect RS flat, TO falling as T rises): accept length RS / TO")
    print("  T      " + "".join(f"{T:>12}" for T in TEMPERATURES))
    for loss, rows in result.items():
        print(f"  {loss:7}" + "".join(f"{r['rs_accept_length']:6.2f}/{r['to_accept_length']:<5.2f}" for r in rows))
    return result


ENTROPY_COEF = 0.2   # GRPO entropy bonus of the rl experiment's entropy_up / entropy_down runs (+ and -)


RL_RUNS = {   # name: (entropy coefficient, learning-rate scale, step-count scale, online MTP loss)
    "entropy_up": (ENTROPY_COEF, 1, 0.6, "none"),   # 0.6 x rl_steps each: 60 steps on the cpu preset
    "recipe": (0.0, 1, 0.6, "none"),
    "entropy_down": (-ENTROPY_COEF, 1, 0.6, "none"),
    "small_lr": (0.0, 0.25, 1.2, "none"),           # the paper's regime: smaller steps (4x), twice as many
    "online_ce": (0.0, 1, 0.6, "ce"),               # the e2e-TV head updated online with CE ...
    "online_e2e_tv": (0.0, 1, 0.6, "e2e_tv"),       # ... or with its own loss
}


PROBE_HEADS = ("ce", "kl", "e2e_tv")   # frozen heads measured on every run's rollouts (teacher-forced)


DRIFT_EVERY = 20                        # RL steps between measurements on the fixed held-out contexts


def token_kl(logp, logq, valid):
    """Mean over valid positions of KL(p || q) from log-probs (..., V)."""
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return ((kl * valid).sum() / valid.sum()).item()


def rl_probe(lab, online: bool, last: int):
    """What the rl experiment logs each GRPO step besides GRPO's own numbers. Exact verification makes the
    rollouts independent of the drafter, so every frozen head is measured on the same run's rollouts,
    teacher-forced (expected acceptance, no sampling noise): per depth RS (1 - d_TV) and TO (p(argmax q))
    and Eq. 12's tokens per forward, plus the head's own draft entropy H(q_1). Every DRIFT_EVERY steps and at
    the `last` step, on the fixed held-out contexts (whose tokens never change, so entropy cannot move
    anything there): each head's RS acceptance against the current policy, and KL(pi_t || pi_0)."""
    heads = {name: {k[4:]: v for k, v in policy_with_head(lab, name).state_dict().items() if k.startswith("mtp.")}
             for name in PROBE_HEADS}
    scratch = GPT(lab.cfg).to(lab.device).eval()
    tokens, mask = lab.contexts
    with torch.no_grad():
        sft = GPT(lab.cfg).to(lab.device)
        sft.load_state_dict(lab.sft_state)
        start_logp = F.log_softmax(sft(tokens[:, :-1]).float(), -1)
    answer = answer_mask(PROMPT_LEN + mask.sum(1), tokens.size(1) - 1, PROMPT_LEN, tokens.device)
    gamma = lab.tc.gamma

    @torch.no_grad()
    def measure(step, state, roll):   # state: the weights that wrote the rollouts, before this step's update
        scratch.load_state_dict(state)
        out = dict(teacher_forced={})
        rows = slice(0, None, 2)   # every other rollout (one per pair of a group): half the cost, same law
        seqs, kept = roll.tokens[rows], roll.mask[rows]
        backbone = scratch.backbone_outputs(seqs)          # shared by every head
        drift = step % DRIFT_EVERY == 0 or step == last
        if drift:
            fixed_backbone = scratch.backbone_outputs(tokens)
            logp = F.log_softmax(fixed_backbone[1][:, :-1].float(), -1)
            out.update(kl_to_start=token_kl(logp, start_logp, answer), fixed_context_acceptance={})
        own = {k[4:]: v for k, v in state.items() if k.startswith("mtp.")}   # the online head, if updated
        for name, head in list(heads.items()) + ([("online", own)] if online else []):
            scratch.mtp.load_state_dict(head)
            tok = teacher_forced_acceptance(scratch, seqs, kept, gamma, backbone=backbone)
            rs, to = per_depth(tok["rs"], tok["valid"]), per_depth(tok["to"], tok["valid"])
            q1 = tok["q"][:, 0]
            out["teacher_forced"][name] = dict(
                rs=rs, to=to, rs_length=tokens_per_forward(rs), to_length=tokens_per_forward(to),
                draft_entropy=(-(q1 * q1.clamp(min=1e-30).log()).sum(-1)).mean().item())
            if drift:
                fixed = teacher_forced_acceptance(scratch, tokens, mask, gamma, backbone=fixed_backbone)
                out["fixed_context_acceptance"][name] = per_depth(fixed["rs"], fixed["valid"])
        return out
    return measure


def experiment_rl(lab):
    """Fig. 1a / 3 / 6 / 9a: GRPO runs whose entropy moves (an entropy bonus of either sign), the recipe,
    a smaller learning rate, and online MTP updates; all roll out with RS drafts of the e2e-TV head, and
    all log the frozen heads' teacher-forced acceptance per step (rl_probe)."""
    result = {}
    for name, (coef, lr_scale, steps_scale, online) in RL_RUNS.items():
        model = policy_with_head(lab, "e2e_tv")
        tc = TrainConfig(**{**asdict(lab.tc), "mtp_loss": "e2e_tv", "draft": "sample", "mtp_online": online,
                            "entropy_coef": coef, "rl_lr": lab.tc.rl_lr * lr_scale,
                            "rl_steps": max(2, int(lab.tc.rl_steps * steps_scale))})
        run = Run(os.path.join(lab.out, f"exp_rl_{name}"), tc, lab.cfg, resume=True, first_stage="grpo")
        train_grpo(run, model, lab.task, torch.Generator().manual_seed(tc.seed),
                   torch.Generator(lab.device).manual_seed(tc.seed + 1), lab.device, {},
                   probe=rl_probe(lab, online != "none", tc.rl_steps - 1))
        log = [json.loads(line) for line in open(os.path.join(run.out, "log.jsonl"))]
        log = [m for m in log if m["stage"] == "grpo"][-tc.rl_steps:]
        heads = list(log[0]["teacher_forced"])
        drift = [m for m in log if "kl_to_start" in m]
        result[name] = dict(
            entropy_coef=coef, lr=tc.rl_lr, head="e2e_tv", draft="sample", online=online, steps=len(log),
            entropy=[m["entropy"] for m in log], reward=[m["reward"] for m in log],
            accept_length=[m["accept_length"] for m in log], acceptance=[m["acceptance"] for m in log],
            teacher_forced_acceptance={h: {k: [m["teacher_forced"][h][k] for m in log] for k in
                                           ("rs", "to", "rs_length", "to_length", "draft_entropy")} for h in heads},
            drift_steps=[m["step"] - log[0]["step"] for m in drift], kl_to_start=[m["kl_to_start"] for m in drift],
            fixed_context_acceptance={h: [m["fixed_context_acceptance"][h] for m in drift] for h in heads})
    print("\nrl: GRPO runs, RS drafts of the e2e-TV head; first 10 -> last 10 steps (teacher-forced = expected "
          "tokens per forward, Eq. 12)")
    print(f"  {'run':14} {'entropy':>15} {'reward':>13} {'counted len':>13} {'TF RS-e2eTV':>13} {'TF RS-CE':>13} "
          f"{'TF TO-CE':>13} {'fixed-ctx a1':>13} {'KL to start':>11}")
    mean = lambda x: sum(x) / len(x)
    ends = lambda x: f"{mean(x[:10]):.2f} -> {mean(x[-10:]):.2f}"
    for name, r in result.items():
        tf = r["teacher_forced_acceptance"]
        fixed = r["fixed_context_acceptance"]["e2e_tv"]
        print(f"  {name:14} {ends(r['entropy']):>15} {ends(r['reward']):>13} {ends(r['accept_length']):>13} "
              f"{ends(tf['e2e_tv']['rs_length']):>13} {ends(tf['ce']['rs_length']):>13} {ends(tf['ce']['to_length']):>13} "
              f"{fixed[0][0]:.3f} -> {fixed[-1][0]:.3f} {r['kl_to_start'][-1]:11.4f}")
    return result


FIG1A_RULES = {   # rule: (frozen head, teacher-forced series) as the paper's Fig. 1a lines
    "to": ("ce", "to_length"), "rs_ce": ("ce", "rs_length"), "rs_e2e_tv": ("e2e_tv", "rs_length")}


ENTROPY_RUNS = ("entropy_up", "recipe", "entropy_down")


def experiment_entropy(lab, rl_result):
    """Fig. 1a in the paper's units: accept length (tokens per target forward, gamma = 3, bonus included;
    teacher-forced on each step's rollouts) against the policy's mean entropy, one point per RL step,
    pooled over the runs whose entropy moves, with a 95% interval. And the per-token view: depth-1
    acceptance alpha_1 against H(p) over drafted tokens of rollouts at temperatures 0.7, 1.0 and 1.3."""
    runs = [rl_result[name] for name in ENTROPY_RUNS]
    H = [h for r in runs for h in r["entropy"]]
    slope = {}
    for rule, (head, series) in FIG1A_RULES.items():
        slope[rule] = fit_line(H, [y for r in runs for y in r["teacher_forced_acceptance"][head][series]])
    slope["rs_e2e_tv_counted"] = fit_line(H, [y for r in runs for y in r["accept_length"]])
    per_run = {name: {rule: fit_line(rl_result[name]["entropy"],
                                     rl_result[name]["teacher_forced_acceptance"][head][series])["slope"]
                      for rule, (head, series) in FIG1A_RULES.items()} for name in ENTROPY_RUNS}
    spans = {name: (min(rl_result[name]["entropy"]), max(rl_result[name]["entropy"])) for name in rl_result}
    # Teacher-forced against counted accept length of the drafting head: beyond depth 1, expected acceptance
    # conditions on the rollout's own next tokens where decoding conditions on accepted drafts; measured.
    tf_gap = [c - t for r in rl_result.values() if r["online"] == "none"
              for c, t in zip(r["accept_length"], r["teacher_forced_acceptance"]["e2e_tv"]["rs_length"])]
    rs_ce, rs_tv = policy_with_head(lab, "ce"), policy_with_head(lab, "e2e_tv")
    Ht, acc = [], {"to": [], "rs_ce": [], "rs_e2e_tv": []}
    for T in (0.7, 1.0, 1.3):
        roll = held_out_rollouts(lab, "e2e_tv", T)
        ce = teacher_forced_acceptance(rs_ce, roll.tokens, roll.mask, 1, T)
        tv = teacher_forced_acceptance(rs_tv, roll.tokens, roll.mask, 1, T)
        Ht.append(tv["entropy"][:, 0])
        acc["to"].append(ce["to"][:, 0])
        acc["rs_ce"].append(ce["rs"][:, 0])
        acc["rs_e2e_tv"].append(tv["rs"][:, 0])
    Ht = torch.cat(Ht)
    acc = {k: torch.cat(v) for k, v in acc.items()}
    edges = torch.quantile(Ht.double(), torch.linspace(0, 1, 9, dtype=torch.float64))
    bucket = torch.bucketize(Ht.double(), edges[1:-1])
    buckets = [dict(entropy=Ht[bucket == b].mean().item(), tokens=int((bucket == b).sum()),
                    **{k: v[bucket == b].mean().item() for k, v in acc.items()}) for b in range(8)]
    result = dict(slope=slope, slope_per_run=per_run, entropy_span=spans,
                  teacher_forced_minus_counted=mean_std(tf_gap),
                  token_alpha1_slope={k: fit_line(Ht, v) for k, v in acc.items()}, token_buckets=buckets,
                  token_entropy_span=(Ht.min().item(), Ht.max().item()))
    print("\nentropy (paper Fig. 1a: accept length per nat, one point per RL step: TO -1.68, RS-CE -1.68, RS-TV -0.06)")
    print(f"  per RL step, pooled over {', '.join(ENTROPY_RUNS)} ({len(H)} steps, entropy "
          f"{min(H):.2f}-{max(H):.2f} nats): " + ", ".join(
              f"{k} {v['slope']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]" for k, v in slope.items()))
    print(f"  teacher-forced vs counted tokens per forward (drafting head, frozen runs): counted - expected = "
          f"{result['teacher_forced_minus_counted'][0]:+.3f} +- {result['teacher_forced_minus_counted'][1]:.3f} per step")
    print("  per token, alpha_1 (depth-1 acceptance) per nat: " + ", ".join(
        f"{k} {v['slope']:+.3f}" for k, v in result["token_alpha1_slope"].items()))
    return result


def decompose(entropy, alpha, early: float = 1 / 3, base: int = 5):
    """Eq. 16 for one run: delta alpha_t = alpha_t - alpha_0 = b (H_t - H_0) + residual, with b the slope of
    alpha on H fitted on the run's first `early` fraction of steps; alpha_0, H_0 the means of the first
    `base` steps (one step is noisy). Returns b with its interval and the per-step terms."""
    n = max(len(entropy) * early, base + 2)
    fit = fit_line(entropy[:int(n)], alpha[:int(n)])
    H0, a0 = sum(entropy[:base]) / base, sum(alpha[:base]) / base
    delta = [a - a0 for a in alpha]
    term = [fit["slope"] * (h - H0) for h in entropy]
    return dict(b=fit["slope"], b_ci=fit["ci"], delta=delta, entropy_term=term,
                residual=[d - e for d, e in zip(delta, term)])


def experiment_decomposition(lab, rl_result):
    """Eq. 16 / Fig. 3 for every rl run and rule (TO-CE, RS-CE, RS-KL, RS-e2eTV; per depth and for the
    accept length), and the drift measured directly: each frozen head's RS acceptance on fixed held-out
    contexts, where entropy cannot change, beside KL(pi_t || pi_0); per unit of reward gained."""
    rules = {"to_ce": ("ce", "to"), "rs_ce": ("ce", "rs"), "rs_kl": ("kl", "rs"), "rs_e2e_tv": ("e2e_tv", "rs")}
    result = {}
    mean = lambda x: sum(x) / len(x)
    for name, r in rl_result.items():
        tf, H = r["teacher_forced_acceptance"], r["entropy"]
        entry = {}
        for rule, (head, kind) in rules.items():
            series = {f"depth{j + 1}": [a[j] for a in tf[head][kind]] for j in range(lab.tc.gamma)}
            series["accept_length"] = tf[head][f"{kind}_length"]
            entry[rule] = {k: decompose(H, v) for k, v in series.items()}
        gain = mean(r["reward"][-10:]) - mean(r["reward"][:10])
        fixed = r["fixed_context_acceptance"]
        mismatch = {h: fixed[h][-1][0] - fixed[h][0][0] for h in fixed}
        result[name] = dict(rules=entry, reward_gain=gain, entropy_change=mean(H[-10:]) - mean(H[:10]),
                            fixed_context_change=mismatch, kl_to_start=r["kl_to_start"][-1],
                            mismatch_per_reward={h: m / gain if gain > 0 else None for h, m in mismatch.items()},
                            draft_entropy_change={h: mean(tf[h]["draft_entropy"][-10:]) - mean(tf[h]["draft_entropy"][:10])
                                                  for h in tf})
    print("\ndecomposition (paper Eq. 16 / Fig. 3: TO both terms, RS-CE mostly entropy, RS-TV near zero in both);"
          " last 10 steps, accept length")
    print(f"  {'run':14} {'rule':10} {'b [95%]':>22} {'delta':>7} {'entropy':>8} {'residual':>9}")
    for name, r in result.items():
        for rule, per in r["rules"].items():
            d = per["accept_length"]
            print(f"  {name:14} {rule:10} {d['b']:+7.2f} [{d['b_ci'][0]:+6.2f}, {d['b_ci'][1]:+6.2f}] "
                  f"{mean(d['delta'][-10:]):+7.3f} {mean(d['entropy_term'][-10:]):+8.3f} {mean(d['residual'][-10:]):+9.3f}")
    print("  drift on fixed contexts (RS alpha_1 of the frozen head, first -> last checkpoint), KL(pi_t || pi_0), "
          "reward gain:")
    for name, r in result.items():
        print(f"  {name:14} " + " ".join(f"{h} {v:+.4f}" for h, v in r["fixed_context_change"].items())
              + f"  KL {r['kl_to_start']:.4f}  reward {r['reward_gain']:+.3f}  H {r['entropy_change']:+.3f}")
    return result


ENTROPY_BINS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, math.inf)


def experiment_boundary(lab):
    """App. E / Fig. 13: which rule wins. Per head and temperature (the paper's model-task pairs), the
    predicted winner, RS if the mean of 1 - d_TV(p, q) over drafted tokens beats the mean of p(argmax q)
    (teacher-forced on the RS rollouts, which are distributed as p at that temperature), against the
    winner measured by counted depth-1 acceptance of RS and TO rollouts; and per token (Eq. 48: RS wins iff
    d_TV < 1 - p(argmax q)), the share of tokens on which RS wins, by entropy bin."""
    result = {}
    for loss in ("ce", "kl", "e2e_tv"):
        model = policy_with_head(lab, loss)
        pairs, H, rs_wins = [], [], []
        for T in TEMPERATURES:
            rs_roll, to_roll = held_out_rollouts(lab, loss, T, "sample"), held_out_rollouts(lab, loss, T, "greedy")
            tok = teacher_forced_acceptance(model, rs_roll.tokens, rs_roll.mask, 1, T)
            rs_pred, to_pred = tok["rs"][:, 0].mean().item(), tok["to"][:, 0].mean().item()
            rs_meas, to_meas = rs_roll.stats["acceptance"][0], to_roll.stats["acceptance"][0]
            pairs.append(dict(temperature=T, rs_expected=rs_pred, to_expected=to_pred, rs_counted=rs_meas,
                              to_counted=to_meas, rs_accept_length=rs_roll.stats["accept_length"],
                              to_accept_length=to_roll.stats["accept_length"],
                              agree=(rs_pred > to_pred) == (rs_meas > to_meas)))
            H.append(tok["entropy"][:, 0])
            rs_wins.append(tok["rs"][:, 0] > tok["to"][:, 0])
        H, rs_wins = torch.cat(H), torch.cat(rs_wins)
        bins = []
        for lo, hi in zip(ENTROPY_BINS, ENTROPY_BINS[1:]):
            inside = (H >= lo) & (H < hi)
            if inside.any():
                bins.append(dict(entropy=(lo, hi), tokens=int(inside.sum()), rs_wins=rs_wins[inside].float().mean().item()))
        result[loss] = dict(pairs=pairs, pairs_favouring_rs=sum(p["rs_counted"] > p["to_counted"] for p in pairs),
                            predictions_right=sum(p["agree"] for p in pairs), by_entropy=bins,
                            tokens=int(H.numel()), rs_wins_tokens=rs_wins.float().mean().item())
    print("\nboundary (paper App. E / Fig. 13: 23 of 24 model-task pairs favour RS; per token RS wins iff "
          "d_TV(p, q) < 1 - p(argmax q))")
    for loss, r in result.items():
        print(f"  {loss:7} RS wins {r['pairs_favouring_rs']} of {len(TEMPERATURES)} temperatures (counted alpha_1); "
              f"mean-acceptance prediction right on {r['predictions_right']}; RS wins on {r['rs_wins_tokens']:.1%} of "
              f"{r['tokens']} tokens; by entropy: " + ", ".join(
                  f"H {b['entropy'][0]:g}-{b['entropy'][1]:g}: {b['rs_wins']:.0%}" for b in r["by_entropy"]))
    return result


EXPERIMENT_FNS = dict(losses=experiment_losses, temperature=experiment_temperature, rl=experiment_rl,
                     entropy=experiment_entropy, decomposition=experiment_decomposition, boundary=experiment_boundary)


def run_experiments(args):
    t0 = time.time()
    lab = make_lab(args)
    names = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
    path = os.path.join(args.out, "experiments.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    took = {"setup": time.time() - t0}   # wall seconds; an experiment reuses heads and runs made before it
    for name in names:
        t = time.time()
        if name in ("entropy", "decomposition"):   # both read the rl runs
            if "rl" not in results:
                results["rl"] = experiment_rl(lab)
            results[name] = EXPERIMENT_FNS[name](lab, results["rl"])
        else:
            results[name] = EXPERIMENT_FNS[name](lab)
        took[name] = time.time() - t
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\nexperiments {', '.join(names)} done in {time.time() - t0:.0f} s (" +
          ", ".join(f"{k} {v:.0f} s" for k, v in took.items()) + f"); results in {path}")
    return results

# ---------------------------------------------------------------------------------------------------
# 14. Benchmark: `python bebop.py --bench`. Speculative against plain decoding on one trained model,
# measured side by side, with the cost of each piece of a speculative step; a GRPO step with each kind of
# rollout; and the memory-lean TV loss against plain autograd at a 32k vocabulary.


def seconds(fn, device):
    """(wall seconds of one fn() call, with the device synchronised around it, and what it returned)."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def timed(fn, repeats: int, device, blocks: int = 5):
    """Seconds per fn() call after one warm-up call: the best of `blocks` means over `repeats` calls
    (interference from other work on a shared machine only ever adds time)."""
    fn()
    return min(seconds(lambda: [fn() for _ in range(repeats)], device)[0] / repeats for _ in range(blocks))


def paired_interval(work, secs, top, others, draws: int = 2000, seed: int = 0):
    """90% bootstrap interval of rate(top) / max(rate(o) for o in others), rate = sum(work) / sum(seconds),
    resampling call indices (every mode shared each call's inputs, so they are resampled together).
    work, secs: {mode: per-call lists}."""
    n = len(secs[top])
    calls = torch.randint(n, (draws, n), generator=torch.Generator().manual_seed(seed))
    rate = lambda m: (torch.tensor(work[m], dtype=torch.float64)[calls].sum(1) /
                      torch.tensor(secs[m], dtype=torch.float64)[calls].sum(1))
    ratios = rate(top) / torch.stack([rate(o) for o in others]).max(0).values
    return torch.quantile(ratios, 0.05).item(), torch.quantile(ratios, 0.95).item()


def held_out_best(work, secs, modes):
    """The best of `modes` measured without picking it on the same calls: the mode picked on the even calls is
    timed on the odd ones and vice versa, pooled. The plain maximum over several noisy modes overstates the
    best one (it picks whichever the noise favoured), which would make auto look worse than it is."""
    n = len(secs[modes[0]])
    halves = [list(range(0, n, 2)), list(range(1, n, 2))]
    rate = lambda m, calls: sum(work[m][i] for i in calls) / sum(secs[m][i] for i in calls)
    done, spent = 0.0, 0.0
    for pick_on, time_on in (halves, halves[::-1]):
        best = max(modes, key=lambda m: rate(m, pick_on))
        done += sum(work[best][i] for i in time_on)
        spent += sum(secs[best][i] for i in time_on)
    return done / spent


def most_chosen(chosen: dict) -> int:
    """The gamma auto picked on most calls, from {gamma: calls}."""
    return max(chosen, key=chosen.get)


@torch.no_grad()
def time_rollouts(model: GPT, prompts, B: int, max_new_tokens: int, gammas, eos=None, seconds_each: float = 2.0,
                  min_calls: int = 6, graphs=None, chooser=None):
    """Tokens/s of decoding batches of B prompts with each draft length in `gammas` (0 = plain decoding, 1..K,
    or "auto"), side by side: call r decodes prompts r*B.. (cycling through `prompts`) with seed r in every
    mode, the modes alternating call by call until each has decoded for `seconds_each` seconds (at least
    `min_calls` calls), so machine noise hits all alike and every mode sees the same prompts. One untimed
    call of each first (kernel selection, graph captures, auto's cost profile). Returns {gamma: dict(
    tokens_per_s, accept_length (pooled kept tokens per row-round), chosen ({gamma: calls} for "auto"),
    calls)} and, under key "per_call", each mode's per-call tokens and seconds (for paired_interval)."""
    model.eval()
    chooser = chooser or DraftLengthChooser(model.config.mtp_train_steps)
    def run(g, r):
        idx = prompts[(r * B + torch.arange(B, device=prompts.device)) % prompts.size(0)]
        gen = torch.Generator(prompts.device).manual_seed(r)   # the same prompts and seed in every mode
        if g == 0:
            return generate(model, idx, max_new_tokens, generator=gen, eos=eos, graphs=graphs)
        return speculative_generate(model, idx, max_new_tokens, gamma=g, generator=gen, eos=eos, graphs=graphs,
                                    chooser=chooser)
    for g in gammas:
        run(g, 0)
    tokens, secs, kept, row_rounds = ({g: [] for g in gammas} for _ in range(4))
    chosen = {}
    r = 0
    while r < min_calls or min(sum(secs[g]) for g in gammas) < seconds_each:
        r += 1
        for g in gammas:
            dt, out = seconds(functools.partial(run, g, r), prompts.device)
            hist = out.stats.get("accept_histogram")
            n_new = out.mask.sum().item()
            tokens[g].append(n_new)
            secs[g].append(dt)
            # Kept tokens after each row's first, per row-round; plain decoding: one token per forward.
            kept[g].append(sum((i + 1) * h for i, h in enumerate(hist)) if hist else n_new - B)
            row_rounds[g].append(sum(hist) if hist else n_new - B)
            if g == "auto":
                chosen[out.stats["gamma"]] = chosen.get(out.stats["gamma"], 0) + 1
    result = {g: dict(tokens_per_s=sum(tokens[g]) / sum(secs[g]), calls=r,
                      accept_length=sum(kept[g]) / max(1, sum(row_rounds[g])), chosen=chosen if g == "auto" else g)
              for g in gammas}
    result["per_call"] = dict(tokens=tokens, seconds=secs)
    return result


@torch.no_grad()
def step_costs(model: GPT, B: int, gamma: int, device, cuda_graphs: bool, repeats: int = 20):
    """Seconds of one plain decode step (forward, sampling, bookkeeping), one verify forward of gamma+1
    tokens alone, one MTP draft step (MTP block, head, sampling) and one whole speculative round (drafts,
    verify, rejection sampling, MTP update, bookkeeping), each called eagerly or replayed as a CUDA graph;
    and what one eager plain step and one eager round launch (count_launches). A step costs the same
    whether its rows are still running or parked, so rows may finish while it is timed."""
    cfg, P = model.config, PROMPT_LEN
    gen = torch.Generator(device).manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (B, P), device=device, generator=gen)
    lengths, max_new = torch.full((B,), P, device=device), cfg.block_size - P - gamma
    plain_caches, caches = Caches(model, B, cfg.block_size), Caches(model, B, cfg.block_size)
    plain = plain_prefill(model, plain_caches, idx, lengths, max_new, 1.0, gen, None)
    spec = speculative_prefill(model, caches, idx, lengths, max_new, gamma, 1.0, gen, None)
    tok = torch.randint(0, cfg.vocab_size, (B, gamma + 1), device=device, generator=gen)
    pos = spec.L[:, None] + torch.arange(gamma + 1, device=device)
    pieces = dict(
        t_plain=lambda g: plain_step(model, plain_caches, plain, 1.0, None, max_new, generator=g),
        t_verify=lambda g: backbone_step(model, caches, tok, pos),
        t_draft=lambda g: sample(probs_from_logits(model.mtp_head(
            mtp_step(model, caches, spec.g1[:, None], tok[:, :1], pos[:, :1])[:, 0]), 1.0), g),
        t_spec_step=lambda g: speculative_round(model, caches, spec, gamma, 1.0, False, None, max_new, generator=g))
    tensors = list(vars(plain).values()) + list(vars(spec).values()) + plain_caches.tensors() + caches.tensors()
    result = {}
    for i, (name, piece) in enumerate(pieces.items()):
        g = torch.Generator(device).manual_seed(i)
        fn = functools.partial(piece, g)
        result[name] = timed(capture_cuda_graph(fn, tensors, g) if cuda_graphs else fn, repeats, device)
        if name in ("t_plain", "t_spec_step") and not cuda_graphs:
            result["launches_" + name[2:]] = count_launches(fn, device)
    return result


def count_launches(fn, device) -> int:
    """What one call of fn issues: CUDA kernels and copies on a GPU (from the profiler), aten ops on a CPU
    (counted at dispatch). Each costs a launch (~5 us on a GPU) or a dispatch (~5-10 us on a CPU), however
    little work it does: this is the overhead CUDA graphs remove."""
    if torch.device(device).type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))
    with Count():
        fn()
    return Count.n


def process_memory(field: str) -> int:
    """Bytes of a memory field of this process from /proc/self/status: VmRSS (now), VmHWM (peak)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def tv_memory_probe(variant: str, device: str, rows: int, vocab: int, hidden: int, K: int = 3):
    """Peak memory of forward + backward of the shared head's matmul and a TV loss, above a baseline taken
    once the inputs exist (hidden states x (rows, hidden), head weight (vocab, hidden), target p (rows,
    vocab)). variant: "{plain,lean}_{tv,e2e}": plain autograd of the formula, or the memory-lean TVDistance
    fused with the head; "tv" is the per-step loss, "e2e" Eq. 13 on rows/K chains of K steps. On CPU the
    peak resident set size (run each variant in a fresh process: the peak never goes down), on CUDA
    max_memory_allocated. Returns MB; floor_mb > 0 means the peak could not be reset at the baseline.
    CPU needs Linux (/proc)."""
    import gc
    kind, loss = variant.split("_")
    cuda = device.startswith("cuda")
    if rows > 8 * K:   # the same computation at a small size first: code and workspaces paged in, not counted
        tv_memory_probe(variant, device, 8 * K, 64, 16, K)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(rows, hidden, device=device, generator=g).requires_grad_(True)
    weight = torch.randn(vocab, hidden, device=device, generator=g) / hidden ** 0.5
    p = torch.rand(rows, vocab, device=device, generator=g)
    p /= p.sum(-1, keepdim=True)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with contextlib.suppress(OSError):   # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        base, before = process_memory("VmRSS"), process_memory("VmHWM")
    if kind == "plain":
        alpha = torch.minimum(p, F.softmax(x @ weight.T, -1)).sum(-1)
    else:
        alpha = 1 - tv_distance(x, p, head_weight=weight)
    if loss == "tv":
        out = (1 - alpha).mean()
    else:
        chains = alpha.view(-1, K)
        out = (1 - torch.cumprod(chains, 1).mean(1)).mean()
    out.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        floor = 0
    else:
        peak = process_memory("VmHWM") - base
        floor = max(0, before - base)   # a peak below this would be hidden by what came before the baseline
    return dict(variant=variant, peak_mb=peak / 2**20, floor_mb=floor / 2**20, rows=rows, vocab=vocab, hidden=hidden)


def tv_memory_benchmark(device, rows: int = 768, vocab: int = 32768, hidden: int = 512):
    """tv_memory_probe for the four variants, each in its own process, plus the time of each in this one."""
    import subprocess
    import sys
    result = {}
    here = os.path.dirname(os.path.abspath(__file__))
    for variant in ("plain_tv", "lean_tv", "plain_e2e", "lean_e2e"):
        code = (f"import json, bebop; print(json.dumps(bebop.tv_memory_probe({variant!r}, {str(device)!r}, "
                f"{rows}, {vocab}, {hidden})))")
        done = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, check=True)
        result[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(rows, hidden, device=device, generator=g)
    weight = torch.randn(vocab, hidden, device=device, generator=g) / hidden ** 0.5
    p = F.softmax(torch.randn(rows, vocab, device=device, generator=g), -1)
    def step(kind):
        y = x.clone().requires_grad_(True)
        tv = (1 - torch.minimum(p, F.softmax(y @ weight.T, -1)).sum(-1)) if kind == "plain" else \
            tv_distance(y, p, head_weight=weight)
        tv.sum().backward()
    for kind in ("plain", "lean"):
        result[f"{kind}_tv"]["seconds"] = timed(lambda: step(kind), 2, device, blocks=3)
    return result


BENCH_GAMMA = 3   # the paper's draft length: the per-piece costs and the "spec" GRPO rollouts use it


def run_benchmark(args):
    """Train (or reuse from --out) the preset's SFT policy and MTP layer, then time everything."""
    tc, task, cfg, device, _ = configure(args)
    torch.manual_seed(tc.seed)
    model = GPT(cfg).to(device)
    run = Run(args.out, tc, cfg, resume=True)
    gen = torch.Generator().manual_seed(tc.seed)
    train_sft(run, model, task, gen, device)
    train_mtp(run, model, task, gen, device)
    model.eval()
    policy = rollout_weights(model, tc.precision)
    held_out = held_out_prompts(task, tc, device)
    cuda = device.startswith("cuda")
    batches = (1, 16, 64, 256) if cuda else (1, 4, 16, tc.rl_prompts * tc.group_size)
    graph_settings = ([False, True] if tc.cuda_graphs else [False]) if cuda_graphs_supported(device) else [False]
    owned = CudaGraphs(policy) if True in graph_settings else None   # the bench's own captured steps
    K, gamma = cfg.mtp_train_steps, BENCH_GAMMA
    gammas = [0] + list(range(1, K + 1)) + ["auto"]
    rows = []
    print(f"\nbench on {device_name(device)}, preset {tc.preset} ({cfg.n_layer} layers + 1 MTP layer, d={cfg.n_embd}), "
          f"{tc.precision}, temperature 1, exact sampling (RS); tokens/s of plain decoding, each fixed gamma, and auto")
    print(f"{'batch':>5} {'graphs':>6} " + " ".join(f"{'plain' if g == 0 else 'g=' + str(g):>7}" for g in gammas[:-1])
          + f" {'auto':>7} {'chose':>5} {'auto/best [90%]':>20} {'/held-out':>11} {'calls':>5}")
    choosers = {graphs: DraftLengthChooser(K) for graphs in graph_settings}   # auto learns across batch sizes
    # Seconds of decoding per mode and batch, and calls at least (tiny: a smoke test). auto learns each batch
    # shape from scratch inside these calls (its first calls explore), as a run does in its first steps.
    each, calls = (0.1, 6) if tc.preset == "tiny" else (4.0, 10)
    for B in batches:
        for graphs in graph_settings:
            speed = time_rollouts(policy, held_out[0], B, task.max_new_tokens, gammas, EOS, each, calls,
                                  graphs=owned if graphs else None, chooser=choosers[graphs])
            c = step_costs(policy, B, gamma, device, graphs)
            best = max(speed[g]["tokens_per_s"] for g in gammas[:-1])
            per_call = speed["per_call"]
            interval = paired_interval(per_call["tokens"], per_call["seconds"], "auto", gammas[:-1])
            unbiased = speed["auto"]["tokens_per_s"] / held_out_best(per_call["tokens"], per_call["seconds"], gammas[:-1])
            for g in gammas:
                rows.append(dict(mode="plain" if g == 0 else "spec", batch=B, cuda_graphs=graphs,
                                 **({} if g == 0 else dict(gamma=g)), tokens_per_s=speed[g]["tokens_per_s"],
                                 accept_length=speed[g]["accept_length"], calls=speed[g]["calls"],
                                 **({"chosen": speed[g]["chosen"], "auto_over_best": speed[g]["tokens_per_s"] / best,
                                     "auto_over_best_90": interval, "auto_over_held_out_best": unbiased}
                                    if g == "auto" else {})))
            # The cost of each piece of a gamma = BENCH_GAMMA round, and what that round's acceptance allows.
            drafting_and_verify = c["t_verify"] + gamma * c["t_draft"]
            accept_len, plain_tps = speed[gamma]["accept_length"], speed[0]["tokens_per_s"]
            piece = dict(mode="pieces", batch=B, cuda_graphs=graphs, gamma=gamma, accept_length=accept_len, **c,
                         speedup=speed[gamma]["tokens_per_s"] / plain_tps,
                         ideal_speedup=accept_len * c["t_plain"] / drafting_and_verify,
                         ceiling=(gamma + 1) * c["t_plain"] / c["t_spec_step"],
                         other_share=1 - drafting_and_verify / c["t_spec_step"])  # sampling + bookkeeping
            piece["achieved_over_ideal"] = piece["speedup"] / piece["ideal_speedup"]
            rows.append(piece)
            print(f"{B:5d} {'on' if graphs else 'off':>6} " + " ".join(f"{speed[g]['tokens_per_s']:7.0f}" for g in gammas)
                  + f" {most_chosen(speed['auto']['chosen']):5d} {speed['auto']['tokens_per_s'] / best:8.2f}x "
                  f"[{interval[0]:.2f}, {interval[1]:.2f}] {unbiased:10.2f}x {speed[0]['calls']:5d}")
    print("  tokens/s over the same held-out prompts and seeds in every mode, modes alternated call by call; 'chose':\n"
          "  the gamma auto picked most often; auto/best: auto over the best of plain and every fixed gamma, with a\n"
          "  90% paired bootstrap interval over calls; auto/held-out best: that best picked on half the calls and timed\n"
          "  on the other half (the maximum of noisy columns overstates the best)")
    for graphs, chooser in choosers.items():
        print(f"\nwhy auto chose what it did (CUDA graphs {'on' if graphs else 'off'}), at the end: per gamma its cost "
              f"of one round C(B, gamma) in ms\n(gamma 0: a plain step; measured in its calls, the one-off profile in "
              f"brackets), the tokens a round advances the batch E(gamma)\n(Eq. 12 with its acceptance estimates "
              f"{'/'.join(f'{a:.2f}' for a in chooser.alphas)} and the batch's efficiency at that gamma), and E / C")
        for shape in (shape for shape in chooser.costs if shape[3] == graphs):
            costs, eff = chooser.round_cost(shape), chooser.efficiency(shape)
            rates, pick = chooser.rates(costs, eff), chooser.choose(costs, eff)
            print(f"  batch {shape[0]:3d}: " + "  ".join(
                f"g{g} {c * 1e3:.2f} ({p * 1e3:.2f})ms {chooser.expected_tokens(g, eff[g]):.2f} {r:.0f}/s"
                + ("*" if g == pick else "") for g, (c, p, r) in enumerate(zip(costs, chooser.costs[shape], rates))))
    print(f"\npieces of a gamma = {gamma} round")
    print(f"{'batch':>5} {'graphs':>6} {'speedup':>7} {'len':>5} {'t_plain':>8} {'t_verify':>8} {'t_draft':>8} {'t_step':>8} "
          f"{'other':>5} {'ideal':>6} {'ach/ideal':>9} {'ceiling':>7}")
    for r in (r for r in rows if r["mode"] == "pieces"):
        ms = {name: f"{r[name] * 1e3:7.3f}ms" for name in ("t_plain", "t_verify", "t_draft", "t_spec_step")}
        print(f"{r['batch']:5d} {'on' if r['cuda_graphs'] else 'off':>6} {r['speedup']:6.2f}x "
              f"{r['accept_length']:5.2f} "
              f"{ms['t_plain']} {ms['t_verify']} {ms['t_draft']} {ms['t_spec_step']} {r['other_share']:5.0%} "
              f"{r['ideal_speedup']:5.2f}x {r['achieved_over_ideal']:8.0%} {r['ceiling']:6.2f}x")
    print("  t_plain: one plain step; t_verify: the verify forward alone; t_draft: one MTP draft step; t_step: one\n"
          "  whole speculative round; other: the round's share spent outside drafting and verifying (sampling,\n"
          "  bookkeeping); ideal = len x t_plain / (t_verify + gamma t_draft); ceiling = (gamma+1) t_plain / t_step")
    for B in batches:
        eager = next(r for r in rows if r["batch"] == B and r["mode"] == "pieces" and not r["cuda_graphs"])
        graphed = next((r for r in rows if r["batch"] == B and r["mode"] == "pieces" and r["cuda_graphs"]), None)
        print(f"  batch {B:3d}: one eager plain step launches {eager['launches_plain']} "
              f"{'kernels' if cuda else 'ops'}, one eager round {eager['launches_spec_step']}"
              + (f"; CUDA graphs make the round {eager['t_spec_step'] / graphed['t_spec_step']:.1f}x faster "
                 f"and the plain step {eager['t_plain'] / graphed['t_plain']:.1f}x" if graphed else ""))

    grpo = time_grpo_steps(model, task, tc, device, {"plain": ("ar", gamma), "spec": ("spec", gamma),
                                                     "auto": ("spec", "auto")}, steps=calls,
                           chooser=choosers[graph_settings[-1]])   # the graphs setting GRPO's rollouts use
    for kind, r in grpo.items():
        rows.append(dict(mode="grpo_step", rollout=kind, batch=tc.rl_prompts * tc.group_size, cuda_graphs=tc.cuda_graphs
                         and cuda, seconds=r["step_s"], rollout_seconds=r["rollout_s"], steps=r["steps"],
                         **({"plain_over_this_90": r["plain_over_this_90"], "gamma": r["gamma"]} if kind != "plain" else {})))
    tv = tv_memory_benchmark(device)
    n = grpo["plain"]["steps"]
    speedup = lambda k: (f"{grpo['plain']['step_s'] / grpo[k]['step_s']:.2f}x [{grpo[k]['plain_over_this_90'][0]:.2f}, "
                         f"{grpo[k]['plain_over_this_90'][1]:.2f}]")
    print(f"\nGRPO step ({tc.rl_prompts} prompts x {tc.group_size}; mean of {n} steps after one warm-up step, the kinds "
          f"alternated step by step on the same prompts): plain rollouts {grpo['plain']['step_s']:.3f} s "
          f"({grpo['plain']['rollout_s']:.3f} s rollout); gamma {gamma} {grpo['spec']['step_s']:.3f} s "
          f"({grpo['spec']['rollout_s']:.3f} s), {speedup('spec')} plain's speed; auto {grpo['auto']['step_s']:.3f} s "
          f"({grpo['auto']['rollout_s']:.3f} s), {speedup('auto')}, chose gamma {grpo['auto']['gamma']} (its chooser goes "
          f"on from the batch-{tc.rl_prompts * tc.group_size} rows above, as a run's does after its first steps); "
          f"[90% paired bootstrap interval over steps]")
    print(f"TV loss + head matmul, forward + backward, {tv['lean_tv']['rows']} rows x vocab {tv['lean_tv']['vocab']}, "
          f"hidden {tv['lean_tv']['hidden']}: peak memory above the inputs, each in its own process "
          f"({'max_memory_allocated' if cuda else 'peak RSS'}): per-step TV plain autograd "
          f"{tv['plain_tv']['peak_mb']:.0f} MB, memory-lean {tv['lean_tv']['peak_mb']:.0f} MB "
          f"({tv['lean_tv']['peak_mb'] / tv['plain_tv']['peak_mb']:.0%}); e2e TV (K=3) {tv['plain_e2e']['peak_mb']:.0f} MB vs "
          f"{tv['lean_e2e']['peak_mb']:.0f} MB ({tv['lean_e2e']['peak_mb'] / tv['plain_e2e']['peak_mb']:.0%}); time "
          f"{tv['plain_tv']['seconds'] * 1e3:.0f} ms plain vs {tv['lean_tv']['seconds'] * 1e3:.0f} ms lean (it recomputes "
          f"the logits in the backward)")
    result = dict(device=device_name(device), preset=tc.preset, precision=tc.precision, gamma=gamma, rows=rows,
                  grpo_step=grpo, tv_loss=tv)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "bench_details.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def time_grpo_steps(model: GPT, task: DigitSumTask, tc: TrainConfig, device, kinds: dict, steps: int = 6,
                    chooser=None):
    """Seconds of one GRPO step (grpo_step: rollouts + one update) with each kind of rollout, side by side:
    kinds {name: (rollout, gamma)}, each with its own copy of the model, optimizer and graphs, the kinds
    alternated step by step on the same prompts and rollout seed; one untimed step of each first (kernel
    selection, graph captures, auto's cost profile). gamma "auto" continues with `chooser` (what it learned
    of this batch shape elsewhere, as a run's chooser has after its first steps), else a fresh one. Returns
    {name: dict(step_s, rollout_s, steps, gamma (per timed step), plain_over_this_90 (90% paired interval of
    plain's step time over this one))}."""
    runs = {}
    for name, (roll_kind, g) in kinds.items():
        m = GPT(model.config).to(device)
        m.load_state_dict(model.state_dict())
        tck = TrainConfig(**{**asdict(tc), "rollout": roll_kind, "gamma": g})
        policy = rollout_weights(m, tck.precision)
        runs[name] = dict(model=m, policy=policy, tc=tck,
                          opt=rl_optimizer(m, tck),
                          chooser=(chooser or DraftLengthChooser(m.config.mtp_train_steps)) if g == "auto" else None,
                          graphs=rollout_graphs(policy, tck, device),
                          secs=[], rollout=[], gamma=[])
    gen_data = torch.Generator().manual_seed(0)
    for step in range(steps + 1):
        idx, S, N = task.prompts(tc.rl_prompts, gen_data)
        prompts = tuple(x.repeat_interleave(tc.group_size, 0).to(device) for x in (idx, S, N))
        for r in runs.values():
            refresh_rollout_weights(r["policy"], r["model"])
            gen = torch.Generator(device).manual_seed(1000 + step)
            dt, (_, m) = seconds(lambda: grpo_step(r["model"], r["policy"], r["opt"], task, r["tc"], prompts, gen,
                                                   chooser=r["chooser"], graphs=r["graphs"]), device)
            if step > 0:   # the first step also captures graphs, picks kernels, profiles: not timed
                r["secs"].append(dt)
                r["rollout"].append(m["rollout_s"])
                r["gamma"].append(m["gamma"])
    plain = runs[next(iter(kinds))]["secs"]   # the first kind is the reference
    out = {}
    for name, r in runs.items():
        ones = {k: [1.0] * steps for k in ("ref", "this")}   # one step's work each: rate = steps / seconds
        lo_hi = paired_interval(ones, {"ref": plain, "this": r["secs"]}, "this", ["ref"])
        out[name] = dict(step_s=sum(r["secs"]) / steps, rollout_s=sum(r["rollout"]) / steps, steps=steps,
                         gamma=r["gamma"], plain_over_this_90=lo_hi)
    return out


def device_name(device) -> str:
    """The card's name on CUDA (timings mean little without it), else the CPU's core count."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"

# ---------------------------------------------------------------------------------------------------
# 15. main(): flags derived from TrainConfig; SFT -> pre-RL MTP training -> GRPO -> side-by-side timing.


MAX_ROWS = 2**16      # largest batch of sequences a run may ask for (SFT/MTP batch, RL rollouts, eval prompts)
MAX_STEPS = 10**7


def number(text: str, kind):
    """text as an int or a finite float, or an argparse error that says what was expected."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def integer_in(low: int, high: int):
    def integer(text):
        value = number(text, int)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {text}")
        return value
    return integer


def real_in(low: float, high: float, low_open: bool = False):
    def real(text):
        value = number(text, float)
        if value < low or value > high or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {text}")
        return value
    return real


def draft_length(text: str):
    """--gamma: "auto" or a draft length the MTP layer was trained to."""
    K = GPTConfig.mtp_train_steps
    if text == "auto":
        return text
    try:
        return integer_in(1, K)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto or an integer in 1..{K}, got {text!r}") from None


# The command line of every TrainConfig field: what it accepts (a type, or a tuple of choices) and its help.
# Defaults are not repeated here: they come from TrainConfig, or from the preset for the fields it sets.
FLAGS = dict(
    preset=(tuple(sorted(PRESETS)), "model and budget. " + "; ".join(
        f"{name}: {p['model']['n_layer']} layers x d={p['model']['n_embd']}, {PRESET_TIMES[name]}"
        for name, p in PRESETS.items())),
    seed=(integer_in(0, 2**63 - 1), "seed of the initial weights, data order and rollouts"),
    task_seed=(integer_in(0, 2**63 - 1), "seed of the toy task's house style and of the held-out prompts"),
    sft_steps=(integer_in(1, MAX_STEPS), "SFT steps"),
    sft_lr=(real_in(0, 10, low_open=True), "SFT learning rate"),
    batch_size=(integer_in(1, MAX_ROWS), "sequences per SFT/MTP step"),
    mtp_steps=(integer_in(1, MAX_STEPS), "MTP training steps"),
    mtp_lr=(real_in(0, 10, low_open=True), "MTP training learning rate"),
    mtp_loss=(MTP_LOSSES, "pre-RL MTP objective: ce, forward KL, reverse KL, per-step TV, end-to-end TV (Eq. 13)"),
    mtp_data=(("policy", "sft"), "pre-RL MTP training data: the policy's own samples (the paper's RFT data) or the "
                                 "SFT data"),
    mtp_ce_warmup=(real_in(0, 1), "fraction of the MTP steps trained with CE first (0 = cold start with --mtp-loss)"),
    rl_steps=(integer_in(1, MAX_STEPS), "GRPO steps"),
    rl_lr=(real_in(0, 10, low_open=True), "GRPO learning rate"),
    rl_prompts=(integer_in(1, MAX_ROWS), "prompts per GRPO step"),
    group_size=(integer_in(2, MAX_ROWS), "samples per prompt"),
    clip_eps=(real_in(0, 10, low_open=True), "ratio clip of the GRPO surrogate"),
    kl_coef=(real_in(0, 1e6), "weight of the k3 estimate of KL(policy || SFT policy) in the GRPO loss"),
    entropy_coef=(real_in(-1e3, 1e3), "GRPO entropy bonus (positive raises the policy's entropy, negative lowers it; "
                                      "0 = recipe)"),
    temperature=(real_in(0, 100, low_open=True), "sampling temperature of the RL rollouts (> 0); the trainer's "
                                                 "log-probs use the same"),
    gamma=(draft_length, f"drafted tokens per round in the RL rollouts: 1..{GPTConfig.mtp_train_steps} (the depth the "
                         f"MTP layer is trained to), or auto (chosen per rollout from measured costs and running "
                         f"acceptance; the paper uses 3)"),
    rollout=(("spec", "ar"), "speculative or plain (ar) rollouts"),
    draft=(DRAFT_RULES, "sample: rejection sampling (RS); greedy: target-only verification (TO)"),
    mtp_online=(("none",) + MTP_LOSSES, "update the MTP layer during RL with this loss (none: frozen, the recipe)"),
    mtp_online_lr=(real_in(0, 10, low_open=True), "learning rate of the online MTP updates"),
    grad_clip=(real_in(0, 1e6, low_open=True), "gradient-norm clip of every stage"),
    eval_prompts=(integer_in(1, MAX_ROWS), "held-out prompts"),
    ckpt_every=(integer_in(1, MAX_STEPS), "steps between checkpoints"),
    precision=(("bf16", "fp32"), "bf16: autocast in training and bf16 rollout weights; fp32"),
    cuda_graphs=(bool, "replay decoding steps as CUDA graphs on CUDA (--no-cuda-graphs: eager)"),
)


def parse_args(argv=None):
    """The run's own flags (--out, --resume, ...), then one flag per TrainConfig field. A flag left out is
    None: configure() then takes the preset's value, or TrainConfig's."""
    ap = argparse.ArgumentParser(
        description="The Bebop recipe at toy scale: SFT, pre-RL MTP training, GRPO with MTP speculative rollouts. "
                    "RS = rejection sampling (drafts sampled from the MTP layer, exact); TO = target-only "
                    "verification (greedy drafts, accepted with the policy's probability, also exact).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    ap.add_argument("--out", default="out", help="output folder: checkpoints, log.jsonl, summary.json (default: out)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out (same flags)")
    ap.add_argument("--overwrite", action="store_true",
                    help="start afresh in an --out that holds another run's checkpoints (replaced as this run saves)")
    for f in fields(TrainConfig):
        kind, text = FLAGS[f.name]
        default = ("gpu on CUDA, else cpu" if f.name == "preset" else   # per preset where a preset sets it
                   ", ".join(f"{name} {p.get(f.name, f.default)}" for name, p in PRESETS.items())
                   if any(f.name in p for p in PRESETS.values()) else f.default)
        flag, text = "--" + f.name.replace("_", "-"), f"{text} (default: {default})"
        if kind is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif isinstance(kind, tuple):
            ap.add_argument(flag, choices=kind, help=text)
        else:
            ap.add_argument(flag, type=kind, help=text)
    ap.add_argument("--bench", action="store_true", help="benchmark speculative vs plain decoding (writes bench.json)")
    ap.add_argument("--experiment", choices=EXPERIMENTS + ("all",),
                    help="reproduce one of the paper's findings at toy scale instead of the default run")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine (use --device cpu)")
    if args.resume and args.overwrite:
        ap.error("--resume continues the run in --out, --overwrite replaces it: choose one")
    return args


def configure(args):
    """Everything a run is made of: (train config, task, model config, device, ranks). The train config is a
    merge: TrainConfig's defaults, then the preset's values, then the flags given."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    world, device = setup_distributed(device)
    if device.startswith("cuda"):   # TF32 tensor cores for every float32 matmul (fp32 runs, the experiments' fp32 models)
        torch.set_float32_matmul_precision("high")
    preset = args.preset or ("gpu" if device.startswith("cuda") else "cpu")
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    preset_values = {k: v for k, v in PRESETS[preset].items() if k != "model"}
    tc = TrainConfig(**{**asdict(TrainConfig()), **preset_values, **given, "preset": preset})
    if tc.rl_prompts * tc.group_size > MAX_ROWS:
        raise RunError(f"--rl-prompts {tc.rl_prompts} x --group-size {tc.group_size} = "
                       f"{tc.rl_prompts * tc.group_size} rollouts per GRPO step; at most {MAX_ROWS}")
    for key in ("batch_size", "rl_prompts"):
        if getattr(tc, key) % world.world_size:
            raise RunError(f"--{key.replace('_', '-')} {getattr(tc, key)} must be divisible by the number "
                           f"of ranks ({world.world_size})")
    task = DigitSumTask(seed=tc.task_seed)
    return tc, task, build_config(tc, task), device, world


def held_out_prompts(task: DigitSumTask, tc: TrainConfig, device):
    """The fixed evaluation prompts (never trained on: drawn from their own seed)."""
    return tuple(x.to(device) for x in task.prompts(tc.eval_prompts, torch.Generator().manual_seed(tc.task_seed + 1)))


def train(args):
    """SFT -> pre-RL MTP training -> GRPO -> side-by-side rollout timing. Returns (model, summary)."""
    t_start = time.time()
    tc, task, cfg, device, world = configure(args)
    torch.manual_seed(tc.seed)                       # the same initial weights on every rank
    model = GPT(cfg).to(device)
    run = Run(args.out, tc, cfg, args.resume, world, overwrite=args.overwrite)
    if world.master:
        print(f"bebop: preset {tc.preset} on {device} x {world.world_size}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters ({cfg.n_layer} layers + "
              f"1 MTP layer, d={cfg.n_embd}); task: write N digits that sum to S")
    gen_data = torch.Generator().manual_seed(tc.seed + 1000 * world.rank)          # each rank its own data
    gen_roll = torch.Generator(device).manual_seed(tc.seed + 1 + 1000 * world.rank)
    held_out = held_out_prompts(task, tc, device)

    train_sft(run, model, task, gen_data, device)
    train_mtp(run, model, task, gen_data, device)
    extra = {}
    ckpt = run.load("grpo")
    if ckpt is not None:
        extra.update(ckpt["extra"])
    if world.master and "reward_before" not in extra:
        extra["reward_before"], extra["accuracy_before"] = evaluate(rollout_weights(model, tc.precision), task,
                                                                    held_out, tc.seed, tc.gamma,
                                                                    temperature=tc.temperature)
    train_grpo(run, model, task, gen_data, gen_roll, device, extra)
    summary = None
    if world.master:
        summary = summarize(model, task, tc, held_out, extra, t_start, args.out, device)
    if world.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return model, summary


def summarize(model, task, tc: TrainConfig, held_out, extra, t_start, out, device):
    """Evaluate after RL, time speculative against plain decoding side by side, print and save."""
    policy = rollout_weights(model, tc.precision)
    reward_after, accuracy_after = evaluate(policy, task, held_out, tc.seed, tc.gamma, temperature=tc.temperature)
    graphs = rollout_graphs(policy, tc, device)
    B = tc.rl_prompts * tc.group_size
    gamma = tc.gamma if tc.gamma != "auto" else BENCH_GAMMA
    modes = [0, gamma] + (["auto"] if tc.gamma == "auto" else [])
    each = 0.1 if tc.preset == "tiny" else 2.0   # seconds of decoding per mode (tiny: a smoke test)
    at_rl = time_rollouts(policy, held_out[0], B, task.max_new_tokens, modes, EOS, each, graphs=graphs)
    at_1 = time_rollouts(policy, held_out[0], 1, task.max_new_tokens, modes, EOS, each, graphs=graphs)
    spec = tc.gamma   # what the RL rollouts used: a fixed gamma, or auto
    ar_tps, spec_tps, ar_tps1, spec_tps1 = (at_rl[0]["tokens_per_s"], at_rl[spec]["tokens_per_s"],
                                            at_1[0]["tokens_per_s"], at_1[spec]["tokens_per_s"])
    recent = extra.get("recent", [])
    summary = dict(
        preset=tc.preset, device=str(device), mtp_loss=tc.mtp_loss, rollout=tc.rollout, draft=tc.draft,
        gamma=tc.gamma, reward_before=extra["reward_before"], reward_after=reward_after,
        accuracy_before=extra["accuracy_before"], accuracy_after=accuracy_after,
        acceptance=recent_acceptance(recent),
        accept_length=(sum(m["kept_tokens"] for m in recent) / sum(m["row_rounds"] for m in recent)
                       if sum(m["row_rounds"] for m in recent) else 1.0),   # 1.0: plain decoding throughout
        entropy=sum(m["entropy"] for m in recent) / max(1, len(recent)),
        rollout_speedup=spec_tps / ar_tps, rollout_batch=B,
        tokens_per_s=dict(plain=ar_tps, speculative=spec_tps),
        rollout_speedup_batch1=spec_tps1 / ar_tps1, recent_steps=len(recent), smoke_test=tc.preset == "tiny",
        speed={str(g): dict(batch=at_rl[g], batch1=at_1[g]) for g in modes},
        gamma_chosen_in_rl=extra.get("gamma_chosen", {}),
        wall_seconds=time.time() - t_start,
    )
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    cfg = model.config
    n_recent = len(recent)
    drafted = summary["acceptance"] and any(a is not None for a in summary["acceptance"])
    alphas = (", ".join("n/a" if a is None else f"{a:.3f}" for a in summary["acceptance"]) + " (n/a: never drafted)"
              if drafted else "n/a (plain decoding: no drafts)")
    smoke = ("\n  (preset tiny is a smoke test of the code path: the model is too small and the run too short to "
             "learn the task; its reward can fall)" if tc.preset == "tiny" else "")
    chosen = ", ".join(f"gamma {g}: {n} steps" for g, n in sorted(summary["gamma_chosen_in_rl"].items()))
    line = lambda label, r: (f"  rollout speed, {label:<22}" + ", ".join(
        f"{'plain' if g == 0 else 'gamma ' + str(g)} {r[g]['tokens_per_s']:.0f}" for g in modes)
        + f" tok/s -> {r[spec]['tokens_per_s'] / r[0]['tokens_per_s']:.2f}x plain"
        + (f" (auto chose gamma {most_chosen(r['auto']['chosen'])})" if spec == "auto" else ""))
    fixed_slower = at_rl[gamma]["tokens_per_s"] < at_rl[0]["tokens_per_s"]
    why = (f"\n  At batch {B} a fixed gamma = {gamma} is slower than plain decoding here: the verify forward "
           f"of {gamma + 1} tokens per row is\n  compute bound at that batch on this device, so it costs nearly "
           f"{gamma + 1} plain steps; drafting pays where a forward is latency\n  bound (small batches), which "
           f"is what gamma auto measures. `python bebop.py --bench` shows the crossover." if fixed_slower else "")
    print(f"""
What happened{smoke}
  SFT taught a {cfg.n_layer}-layer GPT the task from examples; its MTP layer then learned, with the
  policy frozen, to draft the policy's own samples ({tc.mtp_loss} loss); GRPO improved the policy with
  rollouts drafted by that MTP layer and verified by exact rejection sampling, so they are on-policy.
  reward in [0, 1] on {len(held_out[0])} held-out prompts {summary['reward_before']:.3f} -> {reward_after:.3f} """
          f"""(exactly right: {summary['accuracy_before']:.1%} -> {accuracy_after:.1%})
  the last {n_recent} RL steps (of {tc.rl_steps}), counting only the tokens rows keep:
    acceptance per draft step            {alphas}
    tokens per policy forward            {summary['accept_length']:.2f}
    policy entropy per token             {summary['entropy']:.3f} nats
  draft length used by the RL rollouts   {chosen or 'n/a (plain rollouts)'}
{line(f"batch {B}", at_rl)}
{line("batch 1", at_1)}{why}
  wall time                            {summary['wall_seconds']:.0f} s; summary in {os.path.join(out, 'summary.json')}""")
    return summary


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.bench:
            return run_benchmark(args)
        return run_experiments(args) if args.experiment else train(args)[1]
    except KeyboardInterrupt as e:
        raise SystemExit(f"\ninterrupted: {e}" if str(e) else "\ninterrupted")
    except RunError as e:   # one clear line, no traceback
        raise SystemExit(f"bebop: error: {e}")


if __name__ == "__main__":
    main()
