"""Tests for bebop.py, in the file's section order. Run: python -m pytest -q

Statistical tests use fixed seeds and a chi-square test whose p-value must stay above P_MIN for the real sampler;
each family also shows that the same test rejects deliberately broken samplers (p-value below P_BROKEN)."""
import copy
import itertools
import json
import math
import os
import re
import shutil
import signal
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bebop

P_MIN, P_BROKEN = 1e-4, 1e-8   # a correct sampler passes every chi-square test at P_MIN; a broken one fails at P_BROKEN
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = pytest.mark.filterwarnings("error:CUDA graph capture failed")   # a graphed test never decodes eagerly
# Where decoding runs: eagerly; through CudaGraphs with a stand-in for the capture (any machine); real graphs (GPU).
WHERE = ["eager", "stand_in", pytest.param("cuda", marks=needs_cuda)]
RAGGED = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([5, 6, 7, 0, 2]), torch.tensor([3, 3])]
# A fixed draft length: with auto the random stream follows measured timings (exact, but not bit for bit).
TINY_RUN = ["--preset", "tiny", "--sft-steps", "20", "--mtp-steps", "8", "--rl-steps", "6", "--rl-prompts", "4",
            "--group-size", "4", "--gamma", "3", "--eval-prompts", "32"]


def chi2_pvalue(counts, probs, min_expected=5.0):
    """Pearson chi-square goodness of fit; cells with small expected counts are pooled into one."""
    counts, probs = counts.double(), probs.double()
    expected = counts.sum() * probs
    big = expected >= min_expected
    obs, exp = torch.cat([counts[big], counts[~big].sum()[None]]), torch.cat([expected[big], expected[~big].sum()[None]])
    if (obs[exp == 0] > 0).any():   # mass where the law has none: impossible under the null
        return 0.0
    obs, exp = obs[exp > 0], exp[exp > 0]
    dof = max(len(obs) - 1, 1)
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), ((obs - exp) ** 2 / exp).sum() / 2))


def tiny_model(seed=0, vocab=5, n_layer=1, n_embd=16, block_size=16, sharpen=4.0):
    """A random model whose next-token laws are peaked and depend on the context."""
    torch.manual_seed(seed)
    model = bebop.GPT(bebop.GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=n_embd))
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen / (0.02 * math.sqrt(n_embd)))
    return model.eval()


def exact_sequence_law(model, prompt, n_new, temperature=1.0):
    """P(x_1..x_n | prompt) of every continuation, by enumeration with full forwards."""
    V = model.config.vocab_size
    conts = torch.tensor(list(itertools.product(range(V), repeat=n_new)))
    with torch.no_grad():
        logp = F.log_softmax(model(torch.cat([prompt.expand(len(conts), -1), conts], 1)[:, :-1]).float() / temperature, -1)
    return logp[:, prompt.numel() - 1:].gather(-1, conts[..., None]).squeeze(-1).sum(1).exp()


def sequence_counts(new_tokens, V):
    code = (new_tokens * V ** torch.arange(new_tokens.size(1) - 1, -1, -1)).sum(1)
    return torch.bincount(code, minlength=V ** new_tokens.size(1))


def broken_rejection_sample(bug):
    """Copies of the sampler with one planted bug each, to prove the tests can fail."""
    def sampler(target_probs, draft_probs, draft_tokens, generator=None):
        B, gamma = draft_tokens.shape
        p, q = target_probs.float(), draft_probs.float()
        p_d = p[:, :gamma].gather(-1, draft_tokens[..., None]).squeeze(-1)
        q_d = q.gather(-1, draft_tokens[..., None]).squeeze(-1)
        u = torch.rand(B, gamma, device=p.device, generator=generator)
        n = (u * p_d < q_d if bug == "accept_q_over_p" else u * q_d < p_d).long().cumprod(1).sum(1)
        rows = torch.arange(B, device=p.device)
        p_n, q_n = p[rows, n], F.pad(q, (0, 0, 0, 1))[rows, n]
        if bug == "bonus_wrong_row":
            p_n = torch.where((n == gamma)[:, None], p[rows, gamma - 1], p_n)
        residual = p_n if bug == "resample_from_p" else (p_n - q_n).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
        return n, F.pad(draft_tokens, (0, 1)).scatter_(1, n[:, None], bebop.sample(residual, generator)[:, None])
    return sampler


BUGS = ("accept_q_over_p", "resample_from_p", "bonus_wrong_row")


def stand_in_graphs(monkeypatch, replay_of=lambda step: step):
    """CUDA graphs without a GPU: a CudaGraphs for a CPU model, whose 'capture' returns replay_of(step), run eagerly.
    Everything else of the graph path runs: static caches and state reused across calls, the reseeded generator, the
    lagged done flag. Returns the list of captured steps."""
    captures = []
    monkeypatch.setattr(bebop, "cuda_graphs_supported", lambda device: True)
    monkeypatch.setattr(bebop, "capture_cuda_graph", lambda step, tensors, generator: captures.append(step) or replay_of(step))
    return captures


def decoding_on(where, model, monkeypatch):
    """(model, graphs) for decoding eagerly, through the stand-in, or with real CUDA graphs (a capture failure fails
    the test: see pytestmark)."""
    if where == "stand_in":
        stand_in_graphs(monkeypatch)
        return model, bebop.CudaGraphs(model)
    if where == "cuda":
        model = copy.deepcopy(model).cuda()
        return model, bebop.CudaGraphs(model)
    return model, None


def recorded_rounds(monkeypatch, schedule=None):
    """Every speculative round's internals, appended as rounds run; with a schedule, each round's gamma is forced
    (cycled), up to what the state was sized for: the way to switch gamma round by round."""
    rounds, real = [], bebop.speculative_round

    def wrapped(model, caches, s, gamma, *args, **kwargs):
        rounds.append(real(model, caches, s, schedule[len(rounds) % len(schedule)] if schedule else gamma, *args, **kwargs))
        return rounds[-1]
    monkeypatch.setattr(bebop, "speculative_round", wrapped)
    return rounds


def train_mtp_briefly(model, steps, n_new=20, prompt_len=3, K=4, seed=0):
    """Fit the MTP layer to the model's own samples with the KL loss, so that drafts get accepted."""
    V = model.config.vocab_size
    opt, g = torch.optim.AdamW(model.mtp.parameters(), lr=3e-3), torch.Generator().manual_seed(seed)
    for _ in range(steps):
        seq = bebop.generate(model, torch.randint(0, V, (32, prompt_len), generator=g), n_new, generator=g).tokens
        target, draft = model.mtp_logits(seq, K)
        T = seq.size(1)
        mask = (torch.arange(T)[None, :] + torch.arange(1, K + 1)[:, None] <= T - 1).expand(len(seq), -1, -1)
        tgt = torch.stack([F.pad(target[:, k:], (0, 0, 0, k)) for k in range(1, K + 1)], 1)
        chains = lambda x: x.transpose(1, 2).flatten(0, 1)
        loss = bebop.mtp_loss("kl", chains(draft), chains(tgt), None, chains(mask))
        opt.zero_grad(), loss.backward(), opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def exact_model():
    """Peaked random backbone, MTP layer half-trained: rejections, corrections and bonus tokens all occur."""
    return train_mtp_briefly(tiny_model(sharpen=2.5), 5, n_new=6)


@pytest.fixture(scope="module")
def drafted_model():
    """A small random backbone whose MTP layer was trained briefly, so that drafts get accepted."""
    return train_mtp_briefly(tiny_model(seed=1, vocab=8, n_layer=2, n_embd=32, block_size=40, sharpen=3.0), 60)


@pytest.fixture(scope="module")
def task():
    return bebop.DigitSumTask()


def naive_greedy(model, prompt, n_new, eos=None):
    seq = prompt.clone()
    for _ in range(n_new):
        with torch.no_grad():
            seq = torch.cat([seq, model(seq[None])[0, -1].argmax()[None]])
    new = seq[prompt.numel():]
    if eos is not None and (hit := (new == eos).nonzero()).numel():
        new[hit[0, 0] + 1:] = eos
    return new


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

# ------------------------------------------------------------------------------------------- 2. model, 3. losses


def test_mtp_chain_mask_matches_design():
    m = bebop.mtp_chain_mask(4, 3)
    assert m.shape == (4, 12)
    assert m[2, :4].tolist() == [True, True, True, False]       # depth-1 entries of anchors <= t
    assert m[2, 4:8].tolist() == [False, False, True, False]    # its own chain at depth 2
    assert m[2, 8:].tolist() == [False, False, True, False]     # and at depth 3


def plain_tv(z, p):
    return 1 - torch.minimum(p, F.softmax(z, -1)).sum(-1)


def lean_tv_against_autograd(chunk=5):
    """Largest difference of the memory-lean TV (value; gradients wrt logits, hidden states and the head's weight on
    the fused path) from plain autograd of the formula, in float64."""
    g = torch.Generator().manual_seed(0)
    z, x, W = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((37, 11), (37, 6), (11, 6)))
    p = F.softmax(torch.randn(37, 11, generator=g, dtype=torch.float64) * 2, -1)
    w = torch.randn(37, generator=g, dtype=torch.float64)
    worst = 0.0
    for inputs, lean, ref in (((z,), bebop.tv_distance(z, p, chunk=chunk), plain_tv(z, p)),
                              ((x, W), bebop.tv_distance(x, p, head_weight=W, chunk=chunk), plain_tv(x @ W.T, p))):
        worst = max(worst, (lean - ref).abs().max().item())
        for a, b in zip(torch.autograd.grad((lean * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
            worst = max(worst, (a - b).abs().max().item())
    return worst


def test_memory_lean_tv_matches_autograd_in_float64():
    assert lean_tv_against_autograd(chunk=5) < 1e-10 and lean_tv_against_autograd(chunk=1000) < 1e-10
    g = torch.Generator().manual_seed(1)
    z, x, W = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((9, 13), (9, 4), (13, 4)))
    p = F.softmax(torch.randn(9, 13, generator=g, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(lambda a: bebop.tv_distance(a, p, chunk=4), (z,))
    assert torch.autograd.gradcheck(lambda a, b: bebop.tv_distance(a, p, head_weight=b, chunk=4), (x, W))
    (grad,) = torch.autograd.grad(bebop.tv_distance(z, p).sum(), z)
    assert (grad.abs() <= F.softmax(z, -1) + 1e-12).all()   # Prop. 3: |dL/dz_j| <= q_j


def test_memory_lean_tv_gradient_check_can_fail(monkeypatch):
    """A planted error in bebop's own backward (1[q > p] flipped) fails the same comparison with autograd."""
    unpack = bebop.unpack_bits
    monkeypatch.setattr(bebop, "unpack_bits", lambda bits, V: ~unpack(bits, V))
    assert lean_tv_against_autograd() > 1e-3
    mask = torch.rand(7, 21, generator=torch.Generator().manual_seed(0)) > 0.5
    assert bebop.pack_bits(mask).shape == (7, 3) and torch.equal(unpack(bebop.pack_bits(mask), 21), mask)


def test_e2e_tv_on_hand_made_chains():
    # Chain 1: step 1 p=(1,0), q=(.5,.5): d=.5; step 2 p=q: d=0. L = 1 - (.5 + .5*1)/2 = .5
    # Chain 2: the same, only step 1 exists (a masked prefix): L = 1 - .5/1 = .5. Chain 3: p = q: L = 0.
    p = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]] * 2 + [[[0.3, 0.7], [0.9, 0.1]]])
    q = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]] * 2 + [[[0.3, 0.7], [0.9, 0.1]]])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    torch.testing.assert_close(bebop.e2e_tv_loss(q.log(), p, mask), torch.tensor(1 / 3))
    g = torch.Generator().manual_seed(1)
    z, pr = torch.randn(4, 5, 7, generator=g), F.softmax(torch.randn(4, 5, 7, generator=g), -1)
    torch.testing.assert_close(bebop.e2e_tv_loss(z, pr), (1 - torch.cumprod(1 - plain_tv(z, pr), 1).mean(1)).mean())


@pytest.mark.parametrize("kind", bebop.MTP_LOSSES)
def test_each_mtp_loss_decreases_and_never_reaches_the_backbone(task, kind):
    torch.manual_seed(0)
    model = bebop.GPT(bebop.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=task.seq_len + 5))
    seq, lengths = task.sft_batch(16, torch.Generator().manual_seed(0))
    opt, losses = torch.optim.AdamW(model.mtp.parameters(), lr=1e-2), []
    for _ in range(25):
        loss = bebop.mtp_training_loss(model, kind, seq, lengths, 3)
        opt.zero_grad()
        loss.backward()
        if not losses:   # the first backward: nothing outside the MTP layer got a gradient
            assert [n for n, p in model.named_parameters() if not n.startswith("mtp.") and p.grad is not None] == []
            assert all(p.grad is not None for p in model.mtp.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    with pytest.raises(ValueError, match="unknown MTP loss 'mse'"):
        bebop.mtp_loss("mse", torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), None, torch.ones(1, 1))

# ------------------------------------------------------------------------------------------- 4. sampling


def make_case(kind, gamma, V=6, seed=0):
    """Target rows p (gamma+1, V) and draft rows q (gamma, V) of one kind."""
    g = torch.Generator().manual_seed(seed)
    dirichlet = lambda n: (lambda x: x / x.sum(-1, keepdim=True))(torch._standard_gamma(torch.ones(n, V), generator=g))
    p, q = dirichlet(gamma + 1), dirichlet(gamma)
    if kind == "sparse":      # p and q each on part of the vocabulary, overlapping partly
        p = p * (torch.arange(V) < V - 2) / (p * (torch.arange(V) < V - 2)).sum(-1, keepdim=True)
        q = q * (torch.arange(V) >= 2) / (q * (torch.arange(V) >= 2)).sum(-1, keepdim=True)
    elif kind == "one_hot":   # the TO rule: a one-hot draft at argmax of some draft law
        q = F.one_hot(q.argmax(-1), V).float()
    elif kind == "identical":
        q = p[:gamma].clone()
    return p, q


def emitted_pvalues(sampler, p, q, N=200_000, seed=1):
    """For each position i, the chi-square p-value of the tokens emitted there against p_i: the drafts are drawn
    independently from their q rows, so given that position i is emitted its token must follow p_i exactly."""
    gamma, V = q.shape
    g = torch.Generator().manual_seed(seed)
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g) for j in range(gamma)], 1)
    n, tokens = sampler(p.expand(N, -1, -1), q.expand(N, -1, -1), drafts, generator=g)
    assert ((tokens[:, :gamma] == drafts) | (torch.arange(gamma) >= n[:, None])).all()
    return [chi2_pvalue(torch.bincount(tokens[n >= i, i], minlength=V), p[i]) for i in range(gamma + 1)], n


@pytest.mark.parametrize("kind", ["random", "sparse", "one_hot", "identical"])
@pytest.mark.parametrize("gamma", [1, 2, 3, 4])
def test_rejection_sample_is_exact(kind, gamma):
    p, q = make_case(kind, gamma, seed=gamma)
    pvals, n = emitted_pvalues(bebop.rejection_sample, p, q)
    assert min(pvals) > P_MIN, pvals
    alpha = torch.minimum(p[0], q[0]).sum().item()   # Eq. 2, within 5 binomial standard errors
    assert abs((n >= 1).double().mean().item() - alpha) <= 5 * math.sqrt(max(alpha * (1 - alpha), 1e-12) / len(n)) + 1e-9


@pytest.mark.parametrize("bug", BUGS)
def test_exactness_test_rejects_broken_samplers(bug):
    p, q = make_case("random", 3, seed=3)
    assert min(emitted_pvalues(broken_rejection_sample(bug), p, q)[0]) < P_BROKEN, bug
    assert min(emitted_pvalues(broken_rejection_sample(None), p, q)[0]) > P_MIN   # the unbroken copy passes


def first_step_acceptance_z(sampler, greedy, N=200_000, seed=5):
    """z-scores of the counted first-step acceptance against Eq. 2 (RS: sum min(p, q)) or Eq. 1 (TO: p(argmax q))."""
    g, zs = torch.Generator().manual_seed(seed), []
    for _ in range(4):
        p, q = F.softmax(torch.randn(2, 7, generator=g) * 1.5, -1), F.softmax(torch.randn(1, 7, generator=g) * 1.5, -1)
        if greedy:
            d = q.argmax(-1).expand(N, 1)
            q_used, alpha = bebop.one_hot(d, 7), p[0, q.argmax()].item()
        else:
            d = bebop.sample(q.expand(N, -1), g)[:, None]
            q_used, alpha = q.expand(N, -1, -1), torch.minimum(p[0], q[0]).sum().item()
        n, _ = sampler(p.expand(N, -1, -1), q_used, d, g)
        zs.append(((n >= 1).double().mean().item() - alpha) / math.sqrt(alpha * (1 - alpha) / N))
    return zs


@pytest.mark.parametrize("greedy", [False, True])
def test_acceptance_rate_is_eq2_for_rs_and_eq1_for_to(greedy):
    """The identities behind App. E; the same test rejects a sampler that accepts with q/p instead of p/q."""
    assert max(abs(z) for z in first_step_acceptance_z(bebop.rejection_sample, greedy)) < 4.5
    assert max(abs(z) for z in first_step_acceptance_z(broken_rejection_sample("accept_q_over_p"), greedy)) > 10


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_rejection_sample_shapes_and_no_python_loop_over_rows():
    """Shapes and ranges, and the same ops for 7 rows as for 700, which the same count tells apart from a loop."""
    p, q = make_case("random", 3)
    per_row = lambda p, q, d, generator=None: [bebop.rejection_sample(p[i:i + 1], q[i:i + 1], d[i:i + 1]) for i in range(len(d))]
    ops = {}
    for name, sampler in (("batched", bebop.rejection_sample), ("looped", per_row)):
        for B in (7, 700):
            d = torch.multinomial(q, B, replacement=True, generator=torch.Generator().manual_seed(B)).T
            with OpCounter() as count:
                out = sampler(p.expand(B, -1, -1), q.expand(B, -1, -1), d)
            ops[name, B] = count.ops
            if name == "batched":
                assert out[0].shape == (B,) and out[1].shape == (B, 4) and ((0 <= out[0]) & (out[0] <= 3)).all()
    assert ops["batched", 7] == ops["batched", 700] and len(ops["looped", 700]) > len(ops["looped", 7])


@pytest.mark.parametrize("shapes,dtype,match", [
    (((2, 4, 6), (2, 3, 6), (2, 2)), torch.long, r"expected float target_probs \(B, gamma\+1, V\) = \(2, 3, V\)"),
    (((2, 4, 6), (2, 3, 5), (2, 3)), torch.long, "with one V"),
    (((2, 4, 6), (2, 3, 6), (2, 3, 1)), torch.long, r"draft_tokens must be \(B, gamma\) integer ids"),
    (((2, 4, 6), (2, 3, 6), (2, 3)), torch.float, r"draft_tokens must be \(B, gamma\) integer ids")])
def test_rejection_sample_refuses_shapes_that_do_not_fit(shapes, dtype, match):
    with pytest.raises(ValueError, match=match):
        bebop.rejection_sample(torch.rand(shapes[0]), torch.rand(shapes[1]), torch.zeros(shapes[2], dtype=dtype))
    with pytest.raises(ValueError, match="expected float target_probs"):
        bebop.rejection_sample(torch.ones(2, 4, 6, dtype=torch.long), torch.rand(2, 3, 6), torch.zeros(2, 3).long())

# ------------------------------------------------------------------------------------------- 5. generation


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("gamma,draft,temperature", [(2, "sample", 1.0), (3, "greedy", 0.7)])
def test_speculative_sequence_law_is_exact(exact_model, gamma, draft, temperature, where, monkeypatch):
    """The joint law of 4 new tokens (625 outcomes) against exact enumeration, 60,000 rows in one batch, eagerly and
    through CUDA graphs (real on a GPU, a stand-in elsewhere)."""
    V, prompt = exact_model.config.vocab_size, torch.tensor([[1, 3, 0]])
    law = exact_sequence_law(exact_model, prompt, 4, temperature)
    model, graphs = decoding_on(where, exact_model, monkeypatch)
    out = bebop.speculative_generate(model, prompt.expand(60_000, -1), 4, gamma=gamma, draft=draft, temperature=temperature,
                                     generator=torch.Generator(model.lm_head.weight.device).manual_seed(7), graphs=graphs)
    assert out.stats["acceptance"][0] < 0.95, "no rejections: corrections would go untested"
    assert out.stats["drafts_accepted"][-1] > 100, "no bonus tokens were drawn"
    assert chi2_pvalue(sequence_counts(out.new_tokens.cpu(), V), law) > P_MIN


@pytest.mark.parametrize("schedule,draft,temperature", [([0, 3, 1], "sample", 1.0), ([2, 0, 1], "greedy", 0.7)])
def test_sequence_law_is_exact_when_gamma_switches_every_round(exact_model, schedule, draft, temperature, monkeypatch):
    """gamma forced round by round through speculative_round, 0 (a plain step that keeps the MTP cache current)
    included: the law of 4 new tokens stays exact; the same test rejects a broken sampler on the same schedule."""
    V, prompt = exact_model.config.vocab_size, torch.tensor([[1, 3, 0]])
    law = exact_sequence_law(exact_model, prompt, 4, temperature)
    run = lambda: bebop.speculative_generate(exact_model, prompt.expand(60_000, -1), 4, gamma=3, draft=draft,
                                             temperature=temperature, generator=torch.Generator().manual_seed(7))
    rounds = recorded_rounds(monkeypatch, schedule)
    out = run()
    assert {r["drafts"].size(1) for r in rounds} == set(schedule) and out.stats["acceptance"][0] < 0.95
    assert chi2_pvalue(sequence_counts(out.new_tokens, V), law) > P_MIN
    monkeypatch.setattr(bebop, "rejection_sample", broken_rejection_sample("resample_from_p"))
    assert chi2_pvalue(sequence_counts(run().new_tokens, V), law) < P_BROKEN


@pytest.mark.parametrize("where", WHERE)
def test_sequence_law_test_rejects_a_broken_sampler(exact_model, where, monkeypatch):
    prompt = torch.tensor([[1, 3, 0]])
    law = exact_sequence_law(exact_model, prompt, 4)
    model, graphs = decoding_on(where, exact_model, monkeypatch)   # fresh static decoders: they capture the bug
    monkeypatch.setattr(bebop, "rejection_sample", broken_rejection_sample("resample_from_p"))
    out = bebop.speculative_generate(model, prompt.expand(60_000, -1), 4, gamma=2, graphs=graphs,
                                     generator=torch.Generator(model.lm_head.weight.device).manual_seed(7))
    assert chi2_pvalue(sequence_counts(out.new_tokens.cpu(), 5), law) < P_BROKEN


@pytest.mark.parametrize("where", WHERE)
def test_generate_sequence_law_is_exact(where, monkeypatch):
    prompt = torch.tensor([[2, 2]])
    law = exact_sequence_law(tiny_model(), prompt, 4)
    model, graphs = decoding_on(where, tiny_model(), monkeypatch)
    out = bebop.generate(model, prompt.expand(60_000, -1), 4, graphs=graphs,
                         generator=torch.Generator(model.lm_head.weight.device).manual_seed(3))
    assert chi2_pvalue(sequence_counts(out.new_tokens.cpu(), 5), law) > P_MIN


@pytest.mark.parametrize("gamma", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("draft", ["sample", "greedy"])
def test_greedy_speculative_matches_naive_argmax(drafted_model, gamma, draft):
    out = bebop.speculative_generate(drafted_model, RAGGED, 20, gamma=gamma, temperature=0, draft=draft)
    for b, prompt in enumerate(RAGGED):
        assert torch.equal(out.new_tokens[b], naive_greedy(drafted_model, prompt, 20))
        assert torch.equal(out.tokens[b], torch.cat([prompt, out.new_tokens[b]]))
    assert out.stats["accept_length"] > 1.5 or gamma == 0, "drafts were hardly accepted: the test would be weak"
    assert torch.equal(bebop.generate(drafted_model, RAGGED, 20, temperature=0).new_tokens, out.new_tokens)


def test_greedy_with_a_switching_draft_length_matches_naive_argmax(drafted_model, monkeypatch):
    rounds = recorded_rounds(monkeypatch, [0, 1, 4, 2, 0, 3, 5])
    for draft in ("sample", "greedy"):
        out = bebop.speculative_generate(drafted_model, RAGGED, 20, gamma=5, temperature=0, draft=draft, eos=6)
        for b, prompt in enumerate(RAGGED):
            assert torch.equal(out.new_tokens[b], naive_greedy(drafted_model, prompt, 20, eos=6))
    assert {r["drafts"].size(1) for r in rounds} == {0, 1, 2, 3, 4, 5}


def test_a_gamma_zero_round_is_a_plain_step_that_keeps_drafting_resumable(drafted_model, monkeypatch):
    """Gamma-0 rounds emit the plain sample (generate's, at temperature 0) and leave g^1 as a draft round would: the
    q used when drafting resumes equals the training path's."""
    prompt = torch.tensor([[1, 2, 3]] * 2)
    zero = bebop.speculative_generate(drafted_model, prompt, 10, gamma=0, temperature=0)
    assert torch.equal(zero.new_tokens, bebop.generate(drafted_model, prompt, 10, temperature=0).new_tokens)
    assert zero.stats["accept_length"] == 1.0 and zero.stats["accept_histogram"] == [18]
    rounds = recorded_rounds(monkeypatch, [0, 0, 3])
    out = bebop.speculative_generate(drafted_model, prompt, 16, gamma=3, generator=torch.Generator().manual_seed(0))
    _, draft_logits = drafted_model.mtp_logits(out.tokens, 3)
    checked = [torch.testing.assert_close(r["draft_logits"][b, 0], draft_logits[b, 0, int(r["L"][b]) - 1], atol=1e-5, rtol=0)
               for r in rounds if r["drafts"].size(1) for b in range(2) if r["running"][b]]
    assert len(checked) >= 4


def test_greedy_eos_inside_an_accepted_run(drafted_model, monkeypatch):
    """An EOS that some row emits as an accepted draft with more accepted drafts after it."""
    rounds = recorded_rounds(monkeypatch)
    out = bebop.speculative_generate(drafted_model, RAGGED, 20, gamma=3, temperature=0)
    choice = next((b, int(r["tokens"][b, 0])) for r in rounds for b in range(len(RAGGED)) if r["running"][b]
                  and r["n"][b] >= 2 and (start := int(r["L"][b]) + 1 - len(RAGGED[b])) < 20
                  and int(r["tokens"][b, 0]) not in out.new_tokens[b, :start].tolist())
    b, eos = choice
    out = bebop.speculative_generate(drafted_model, RAGGED, 20, gamma=3, temperature=0, eos=eos)
    for r, prompt in enumerate(RAGGED):
        assert torch.equal(out.new_tokens[r], naive_greedy(drafted_model, prompt, 20, eos))
    first = (out.new_tokens[b] == eos).nonzero()[0, 0]
    assert out.mask[b, :first + 1].all() and not out.mask[b, first + 1:].any() and (out.logprobs[b, first + 1:] == 0).all()


def test_decoding_stops_rows_at_their_end_mark(drafted_model, monkeypatch):
    """A row that emitted EOS takes no further part; the batch stops when its last row ends."""
    prompt, eos = torch.tensor([[1, 2, 3]]).expand(16, -1), 6
    out = bebop.generate(drafted_model, prompt, 30, eos=eos, generator=torch.Generator().manual_seed(0))
    assert (out.mask.sum(1) < 30).all(), "some row never emitted EOS: pick another seed"
    assert out.stats["target_forwards"] == out.mask.sum(1).max() and torch.equal(out.rounds, out.mask.sum(1) - 1)
    rounds = recorded_rounds(monkeypatch)
    out = bebop.speculative_generate(drafted_model, prompt, 30, eos=eos, generator=torch.Generator().manual_seed(0))
    ended_early = 0
    for now, later in zip(rounds, rounds[1:]):
        ended = now["running"] & ((now["tokens"] == eos) & (torch.arange(4) <= now["n"][:, None])).any(1)
        assert not (ended & later["running"]).any(), "a row went on after its EOS"
        ended_early += int(ended.sum())
    assert ended_early > 0 and rounds[-1]["running"].any() and len(rounds) == out.stats["target_forwards"] - 1


def hand_count_stats(rounds, max_new_tokens, eos, gamma):
    """Acceptance statistics counted by hand from the rounds, one row-round at a time in plain Python."""
    hist, reached, accepted, count = [0] * (gamma + 1), [0] * gamma, [0] * gamma, {}
    for rd in rounds:
        for b in range(len(rd["n"])):
            if not rd["running"][b]:
                continue
            c, n, kept = count.get(b, 1), int(rd["n"][b]), 0
            for slot in range(n + 1):
                if c + slot >= max_new_tokens:
                    break
                kept += 1
                if slot < gamma:
                    reached[slot] += 1
                    accepted[slot] += slot < n
                if eos is not None and int(rd["tokens"][b, slot]) == eos:
                    break
            hist[kept - 1] += 1
            count[b] = c + n + 1
    return hist, reached, accepted


@pytest.mark.parametrize("draft", ["sample", "greedy"])
@pytest.mark.parametrize("eos,max_new", [(None, 13), (2, 30), (5, 11)])
def test_acceptance_statistics_count_only_kept_tokens(drafted_model, draft, eos, max_new, monkeypatch):
    """The histogram, alpha_j and accept_length equal a hand count (end marks inside accepted runs, the cap cutting a
    round short); kept tokens = emitted tokens after each row's first; per-row rounds add up to the row-rounds; the
    experiments' per-row count (counted) agrees."""
    rounds = recorded_rounds(monkeypatch)
    prompt = torch.randint(0, 8, (24, 3), generator=torch.Generator().manual_seed(1))
    out = bebop.speculative_generate(drafted_model, prompt, max_new, gamma=3, draft=draft, eos=eos,
                                     generator=torch.Generator().manual_seed(2))
    st = out.stats
    hist, reached, accepted = hand_count_stats(rounds, max_new, eos, 3)
    assert (st["accept_histogram"], st["drafts_reached"], st["drafts_accepted"]) == (hist, reached, accepted)
    assert bebop.kept_tokens(hist) == int(out.mask.sum()) - 24 and sum(hist) == int(out.rounds.sum())
    assert st["accept_length"] == pytest.approx(bebop.kept_tokens(hist) / sum(hist)) == bebop.counted(out)
    assert bebop.counted(out, [0]) == pytest.approx((int(out.mask[0].sum()) - 1) / max(1, int(out.rounds[0])))
    assert st["acceptance"] == pytest.approx([a / r for a, r in zip(accepted, reached)])
    assert sum(reached) < sum(int(r["running"].sum()) for r in rounds) * 3, "no draft was discarded: the case tests nothing"
    if eos is not None:
        assert any(r["running"][b] and (r["tokens"][b, :int(r["n"][b])] == eos).any() for r in rounds for b in range(24))


def test_cache_logits_logprobs_and_drafts_match_the_training_path(drafted_model, monkeypatch):
    """After rejections and rollbacks, the verify logits equal full-forward logits, the returned log-probs equal the
    full-forward log-softmax, and every draft row q_k used online equals the training path's q_k at the same anchor
    and depth (fp32, 1e-5): the acceptance the decoder realises is the one the MTP losses optimise."""
    rounds = recorded_rounds(monkeypatch)
    out = bebop.speculative_generate(drafted_model, RAGGED, 24, gamma=3, generator=torch.Generator().manual_seed(0))
    assert any((r["n"] < 3).any() for r in rounds), "no rejection happened"
    checked = 0
    for b, prompt in enumerate(RAGGED):
        seq, P = out.tokens[b][None], prompt.numel()
        with torch.no_grad():
            full_logits, draft_logits = drafted_model.mtp_logits(seq, 3)
        logp = F.log_softmax(full_logits[0, P - 1:-1], -1).gather(-1, seq[0, P:, None]).squeeze(-1)
        torch.testing.assert_close(out.logprobs[b], logp, atol=1e-5, rtol=0)
        for r in (r for r in rounds if r["running"][b]):
            L, n = int(r["L"][b]), int(r["n"][b])
            for k in range(1, min(n + 1, 3) + 1):   # draft k is reached when drafts 1..k-1 were accepted
                if L + k - 1 < seq.size(1):
                    torch.testing.assert_close(r["target_logits"][b, k - 1], full_logits[0, L + k - 1], atol=1e-5, rtol=0)
                    torch.testing.assert_close(r["draft_logits"][b, k - 1], draft_logits[0, k - 1, L - 1], atol=1e-5, rtol=0)
                    checked += 1
    assert checked > 50


def test_draft_consistency_test_can_fail(drafted_model, monkeypatch):
    """The training path with a shifted anchor does not match the online drafts: the check above has teeth."""
    rounds = recorded_rounds(monkeypatch)
    out = bebop.speculative_generate(drafted_model, RAGGED[:1], 12, gamma=3, generator=torch.Generator().manual_seed(0))
    _, draft_logits = drafted_model.mtp_logits(out.tokens[0][None], 3)
    L = int(rounds[1]["L"][0])
    torch.testing.assert_close(rounds[1]["draft_logits"][0, 0], draft_logits[0, 0, L - 1], atol=1e-5, rtol=0)
    assert not torch.allclose(rounds[1]["draft_logits"][0, 0], draft_logits[0, 0, L - 2], atol=1e-5)


def test_logprobs_and_drafts_are_at_the_sampling_temperature(drafted_model, monkeypatch):
    """q must be the MTP law at the same temperature as p, else acceptance drops (exactness would not catch it)."""
    for fn in (bebop.generate, bebop.speculative_generate):
        seq = fn(drafted_model, RAGGED[:1], 10, temperature=0.7, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = drafted_model(seq.tokens[0][None, :-1])[0, 2:]
        expected = F.log_softmax(logits / 0.7, -1).gather(-1, seq.tokens[0][3:, None]).squeeze(-1)
        torch.testing.assert_close(seq.logprobs[0], expected, atol=1e-5, rtol=0)
    rounds = recorded_rounds(monkeypatch)
    out = bebop.speculative_generate(drafted_model, RAGGED[:1], 12, temperature=0.5, generator=torch.Generator().manual_seed(0))
    _, draft_logits = drafted_model.mtp_logits(out.tokens[0][None], 1)
    for r in (r for r in rounds if r["running"][0]):
        expected = F.softmax(draft_logits[0, 0, int(r["L"][0]) - 1] / 0.5, -1)
        torch.testing.assert_close(r["draft_probs"][0, 0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gamma=-1), "gamma must be an integer in 0..5"), (dict(gamma=True), "gamma must be an integer in 0..5"),
    (dict(gamma=6), "depth the MTP layer was trained to"), (dict(gamma=2.0), "gamma must be an integer"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(draft="beam"), "unknown draft rule"), (dict(eos=99), "eos must be None or an integer token id"),
    (dict(eos=1.5), "eos must be None or an integer token id"), (dict(eos=True), "eos must be None or an integer"),
    (dict(generator="seed"), "generator must be None or a torch.Generator"),
    (dict(graphs=True), "graphs must be None or a CudaGraphs made for this model")])
def test_bad_generation_arguments_get_one_clear_error(kwargs, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        bebop.speculative_generate(model, torch.tensor([[1, 2]]), 3, **kwargs)
    if "gamma" not in kwargs and "draft" not in kwargs:   # plain decoding checks alike
        with pytest.raises(ValueError, match=match):
            bebop.generate(model, torch.tensor([[1, 2]]), 3, **kwargs)


@pytest.mark.parametrize("prompt,n_new,match", [
    (torch.tensor([[1.0, 2.0]]), 3, "prompt token ids must be integers, got torch.float32"),
    (torch.tensor([[True, False]]), 3, "prompt token ids must be integers"), ([[1.5, 2.0]], 3, "must be integers"),
    (torch.tensor([[1, 2]]), 3.0, "max_new_tokens must be an integer >= 1"), (torch.tensor([[1, 2]]), 0, "max_new_tokens"),
    (torch.zeros(1, 17, dtype=torch.long), 1, "exceeds block_size"), ([torch.tensor([], dtype=torch.long)], 3, "empty"),
    (torch.tensor([[1, 9]]), 3, "token ids must lie in"), (torch.tensor([[1, -1]]), 3, "token ids must lie in"),
    ("12", 3, "prompt must be a"), ([[[1, 2]]], 3, "prompt must be a")])
def test_bad_prompts_get_one_clear_error(prompt, n_new, match):
    for fn in (bebop.generate, bebop.speculative_generate):
        with pytest.raises(ValueError, match=match):
            fn(tiny_model(), prompt, n_new)
    with pytest.raises(ValueError, match="lookahead"):   # 10 + 5 fits plain decoding, not 3 drafts more
        bebop.speculative_generate(tiny_model(), torch.zeros(1, 10, dtype=torch.long), 5)


def test_numpy_integers_one_new_token_and_a_generator_reproduce():
    import numpy as np
    model = tiny_model()
    out = bebop.speculative_generate(model, np.array([[1, 2]]).tolist(), np.int64(3), gamma=np.int64(2), eos=np.int64(4),
                                     generator=torch.Generator().manual_seed(0))
    assert out.new_tokens.shape == (1, 3)
    one = bebop.speculative_generate(model, torch.tensor([[1, 2]] * 3), 1, generator=torch.Generator().manual_seed(0))
    assert one.stats["accept_length"] == 1.0 and one.stats["target_forwards"] == 1
    prompt = torch.tensor([[1, 3, 0]]).expand(8, -1)
    a, b = (bebop.speculative_generate(model, prompt, 6, generator=torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)

# ------------------------------------------------------------------------------------------- 6-7. toy task, RL


def test_reward_on_hand_written_answers(task):
    answers = ["12345.", "9990.", "12346.", "1234.", "12S", "123456.", "..", "5.", "0000000.", "1234567890"]
    S, N = torch.tensor([15, 27, 15, 10, 15, 15, 0, 5, 0, 45]), torch.tensor([5, 4, 5, 5, 5, 5, 0, 1, 3, 10])
    tokens = torch.stack([F.pad(bebop.encode(a), (0, 10 - len(a)), value=bebop.EOS) for a in answers])
    r, correct = task.reward(tokens, S, N)   # the last has the right digits but never ends: not well formed
    assert correct.tolist() == [True, True, False, False, False, False, True, True, False, False]
    assert r.tolist() == pytest.approx([1, 1, 0.5 + 0.5 * 0.9, 0.5, 0, 0.5 * 0.4, 1, 1, 0.5, 0])


def test_mtp_chain_targets_lay_out_chains_by_hand():
    """Two sequences of 8 tokens, 7 and 5 of them real, the answer from position 3, K = 2: a chain per anchor t >= 2
    whose first step lies inside the answer; step k of anchor t holds draft row (k, t), the backbone's row t + k, the
    token x_{t+k+1}, and is masked once x_{t+k+1} lies past the end."""
    seq, lengths = torch.arange(10, 18).repeat(2, 1), torch.tensor([7, 5])
    target = torch.arange(8.0)[None, :, None].repeat(2, 1, 3)            # row j holds j
    draft = (100 * torch.arange(1, 3)[:, None] + torch.arange(8)).float()[None, :, :, None].repeat(2, 1, 1, 1)
    d, t, labels, mask = bebop.mtp_chain_targets(seq, lengths, target, draft, 3)
    anchors = [2, 3, 4, 2]   # row 0: t + 1 <= 7 - 2; row 1: t + 1 <= 5 - 2
    assert d[..., 0].tolist() == [[100 + a, 200 + a] for a in anchors]
    assert t[..., 0].tolist() == [[a + 1, a + 2] for a in anchors]
    assert labels.tolist() == [[10 + a + 2, 10 + a + 3] for a in anchors]
    assert mask.tolist() == [[True, True], [True, True], [True, False], [True, False]]


def test_task_prompts_and_style(task):
    seq, lengths = task.sft_batch(64, torch.Generator().manual_seed(0))
    text = bebop.decode(seq[0])
    S, N = int(text[1:4]), int(text[5:7])
    assert text[0] + text[4] + text[7] == "SN=" and sum(map(int, text[8:8 + N])) == S and text[8 + N] == "."
    targets = [(int(bebop.decode(s)[1:4]), int(bebop.decode(s)[5:7])) for s in seq]
    assert task.reward(seq[:, bebop.PROMPT_LEN:], *map(torch.tensor, zip(*targets)))[1].all()   # SFT data is right
    H = -(task.style * task.style.clamp(min=1e-12).log()).sum(-1)   # a peaked and uneven style
    assert H.min() < 0.8 and H.max() > 1.6 and H.mean() < math.log(10) - 0.5


@pytest.fixture(scope="module")
def sft_policy(task, tmp_path_factory):
    """A tiny policy after a short SFT and MTP training, through the stages main() runs."""
    tc = bebop.TrainConfig(preset="tiny", sft_steps=300, mtp_steps=20, batch_size=32, ckpt_every=10**9)
    cfg = bebop.build_config(tc, task)
    torch.manual_seed(0)
    model, g = bebop.GPT(cfg), torch.Generator().manual_seed(0)
    with bebop.Run(str(tmp_path_factory.mktemp("sft")), tc, cfg) as run:
        bebop.train_sft(run, model, task, g, "cpu")
        bebop.train_mtp(run, model, task, g, "cpu")
    return model.eval()


def rollout_batch(model, task, seed, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    idx, S, N = (x.repeat_interleave(8, 0) for x in task.prompts(8, g))
    roll = bebop.speculative_generate(model, idx, task.max_new_tokens, generator=g, eos=bebop.EOS, temperature=temperature)
    return roll, task.reward(roll.new_tokens, S, N)[0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_equal_the_trainers(sft_policy, task, temperature):
    roll, _ = rollout_batch(sft_policy, task, 0, temperature)
    logp, _ = bebop.policy_logprobs(sft_policy, roll.tokens, bebop.PROMPT_LEN, temperature)
    torch.testing.assert_close(logp * roll.mask, roll.logprobs, atol=1e-5, rtol=0)
    if temperature != 1.0:   # the check can fail: untempered log-probs do not match
        assert not torch.allclose(bebop.policy_logprobs(sft_policy, roll.tokens, bebop.PROMPT_LEN)[0] * roll.mask,
                                  roll.logprobs, atol=1e-3)


def test_group_advantages_and_grpo_loss_by_hand():
    """The formulas a reader lifts, against values worked out here in plain Python: advantages normalised within each
    group of consecutive samples (sample std), a constant group 0; the clipped surrogate (Eq. 3) per token, averaged
    within a sample over its kept tokens, then over samples; the k3 KL term and the entropy bonus."""
    rewards, A = [1, 0, 1, 0, 5, 5, 5, 5, 0, 1, 2, 3], []
    for i in range(0, 12, 4):
        group = rewards[i:i + 4]
        mean, std = sum(group) / 4, math.sqrt(sum((r - sum(group) / 4) ** 2 for r in group) / 3)
        A += [(r - mean) / (std + 1e-6) for r in group]
    torch.testing.assert_close(bebop.group_advantages(torch.tensor(rewards, dtype=torch.float64), 4),
                               torch.tensor(A, dtype=torch.float64))
    ratios, adv, mask = [[0.5, 1.0, 1.5], [0.5, 1.5, 9.0]], [1.0, -2.0], [[1, 1, 1], [1, 1, 0]]
    H = [[0.3, 0.2, 0.1], [1.0, 2.0, 3.0]]
    for kl_coef, entropy_coef in ((0.0, 0.0), (0.1, 0.0), (0.0, 0.5), (0.1, -0.5)):
        per_sample = []
        for r, a, m, h in zip(ratios, adv, mask, H):   # ref_logp = old_logp = 0, logp = log r
            terms = [-min(x * a, min(max(x, 0.8), 1.2) * a) + kl_coef * (1 / x + math.log(x) - 1) - entropy_coef * e
                     for x, e in zip(r, h)]
            per_sample.append(sum(t * k for t, k in zip(terms, m)) / sum(m))
        logp = torch.tensor(ratios, dtype=torch.float64).log()
        loss = bebop.grpo_loss(logp, torch.zeros_like(logp), torch.tensor(adv, dtype=torch.float64),
                               torch.tensor(mask, dtype=torch.bool), 0.2, kl_coef, torch.zeros_like(logp), entropy_coef,
                               torch.tensor(H, dtype=torch.float64))
        assert loss.item() == pytest.approx(sum(per_sample) / 2, abs=1e-12), (kl_coef, entropy_coef)


def logprob_change_against_advantage(model, task, loss_fn):
    """The correlation, over samples, between the advantage and how much one small gradient step of loss_fn moved the
    sample's log-probability."""
    model = copy.deepcopy(model)
    roll, rewards = rollout_batch(model, task, 1)
    A = bebop.group_advantages(rewards, 8)
    logp, _ = bebop.policy_logprobs(model, roll.tokens, bebop.PROMPT_LEN)
    params = bebop.backbone_parameters(model)
    grads = torch.autograd.grad(loss_fn(logp, roll.logprobs, A, roll.mask), params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= 1e-2 * (g if g is not None else 0)
        moved = ((bebop.policy_logprobs(model, roll.tokens, bebop.PROMPT_LEN)[0] - logp) * roll.mask).sum(1)
    return torch.nan_to_num(torch.corrcoef(torch.stack([moved, A]))[0, 1]).item()


def test_grpo_update_moves_logprobs_with_the_advantage(sft_policy, task):
    """One small step raises the log-probability of above-average samples and lowers the others'; the same check
    fails with a planted sign flip in the loss and with a loss detached from the policy."""
    assert logprob_change_against_advantage(sft_policy, task, bebop.grpo_loss) > 0.3
    flipped = lambda logp, old, A, mask: -bebop.grpo_loss(logp, old, A, mask)
    assert logprob_change_against_advantage(sft_policy, task, flipped) < -0.3
    detached = lambda logp, old, A, mask: bebop.grpo_loss(logp.detach(), old, A, mask) + 0 * logp.sum()
    assert abs(logprob_change_against_advantage(sft_policy, task, detached)) < 0.1


def grpo_reward_gain(model, task, tmp_path, steps=40):
    """Held-out reward after minus before `steps` GRPO steps of the tiny policy (fixed prompts and seed)."""
    model = copy.deepcopy(model)
    tc = bebop.TrainConfig(preset="tiny", rl_steps=steps, rl_lr=3e-4, rl_prompts=8, group_size=8, ckpt_every=10**9, gamma=3)
    held = task.prompts(256, torch.Generator().manual_seed(5))
    before = bebop.evaluate(model, model, task, held)["reward"]
    with bebop.Run(str(tmp_path), tc, model.config) as run:
        rl = bebop.train_grpo(run, model, task, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1), "cpu", held)
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(log) == steps and all(0 <= m["reward"] <= 1 and len(m["drafts_reached"]) == 5 for m in log)
    assert [m["reward"] for m in rl["recent"]] == [m["reward"] for m in log[-10:]]   # what the summary averages
    return bebop.evaluate(rl["policy"], model, task, held)["reward"] - before


def test_grpo_raises_held_out_reward_and_a_flipped_sign_does_not(sft_policy, task, tmp_path, monkeypatch):
    assert grpo_reward_gain(sft_policy, task, tmp_path / "a") > 0.02
    advantages = bebop.group_advantages
    monkeypatch.setattr(bebop, "group_advantages", lambda rewards, G: -advantages(rewards, G))
    assert grpo_reward_gain(sft_policy, task, tmp_path / "b") < 0.0


# Each piece a reader may copy into another project, with the only bebop helpers it needs (module constants are
# copied as values). The test runs them in a namespace that holds nothing but torch, F and math.
LIFTABLE = {
    "rejection_sample": ["sample", "rejection_sample"],
    "tv_distance": ["pack_bits", "unpack_bits", "logits_of", "TVDistance", "tv_distance"],
    "e2e_tv_loss": ["pack_bits", "unpack_bits", "logits_of", "TVDistance", "tv_distance", "e2e_tv_loss"],
    "mtp_loss": ["pack_bits", "unpack_bits", "logits_of", "TVDistance", "tv_distance", "e2e_tv_loss", "MTP_LOSSES",
                 "mtp_loss"],
    "group_advantages": ["group_advantages"], "grpo_loss": ["grpo_loss"], "mtp_chain_targets": ["mtp_chain_targets"],
    "tokens_per_forward": ["tokens_per_forward"]}


def test_each_piece_lifts_out_with_only_its_helpers():
    """The source of each liftable piece and its helpers, nothing else of bebop, in a fresh namespace: it runs and
    returns what bebop's own returns, gradients included."""
    import inspect
    g = torch.Generator().manual_seed(0)
    N, K, V, C = 6, 3, 11, 4
    probs = lambda *shape: F.softmax(torch.randn(*shape, generator=g), -1)
    x, W = torch.randn(N, K, C, generator=g, dtype=torch.float64), torch.randn(V, C, generator=g, dtype=torch.float64)
    p, mask = probs(N, K, V).double(), torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]] * 2, dtype=torch.bool)
    logits, labels = torch.randn(N, K, V, generator=g), torch.randint(0, V, (N, K), generator=g)
    seq, lengths = torch.randint(0, V, (3, 9), generator=g), torch.tensor([9, 7, 5])
    calls = {
        "rejection_sample": lambda ns: ns["rejection_sample"](probs(5, 4, V), probs(5, 3, V), torch.randint(
            0, V, (5, 3), generator=g), torch.Generator().manual_seed(1)),
        "tv_distance": lambda ns: torch.autograd.grad(ns["tv_distance"](x.requires_grad_(), p, W, chunk=4).sum(), x),
        "e2e_tv_loss": lambda ns: torch.autograd.grad(ns["e2e_tv_loss"](x.requires_grad_(), p, mask, W), x),
        "mtp_loss": lambda ns: [ns["mtp_loss"](kind, logits, logits.roll(1, -1), labels, mask) for kind in bebop.MTP_LOSSES],
        "group_advantages": lambda ns: ns["group_advantages"](torch.rand(12, generator=g), 4),
        "grpo_loss": lambda ns: ns["grpo_loss"](torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g),
                                                torch.randn(4, generator=g), torch.ones(4, 5, dtype=torch.bool),
                                                entropy_coef=0.1, entropy=torch.rand(4, 5, generator=g)),
        "mtp_chain_targets": lambda ns: ns["mtp_chain_targets"](seq, lengths, torch.randn(3, 9, V, generator=g),
                                                                torch.randn(3, K, 9, V, generator=g), 3),
        "tokens_per_forward": lambda ns: torch.tensor(ns["tokens_per_forward"]([0.9, 0.8, 0.7]))}
    for piece, helpers in LIFTABLE.items():
        source = "\n\n".join(f"{h} = {getattr(bebop, h)!r}" if not callable(getattr(bebop, h))
                             else inspect.getsource(getattr(bebop, h)) for h in helpers)
        namespace = {"torch": torch, "F": F, "math": math, "itertools": itertools}
        exec(compile(source, f"<lifted {piece}>", "exec"), namespace)
        state = g.get_state()
        lifted = calls[piece](namespace)
        g.set_state(state)
        for a, b in zip(torch.utils._pytree.tree_leaves(lifted), torch.utils._pytree.tree_leaves(calls[piece](vars(bebop)))):
            assert torch.equal(a, b), piece

# ------------------------------------------------------------------------------------------- 8. CUDA graphs


@pytest.mark.parametrize("where", ["stand_in", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_decoding_equals_eager(drafted_model, where, precision, monkeypatch):
    """Greedy decoding gives the same tokens, log-probs and stats with and without graphs: plain and speculative (RS
    and TO), ragged prompts, with and without EOS, over calls that replay the first call's capture, and after the
    weights change in place (an optimizer step); nothing returned aliases the static buffers a later call reuses."""
    model, graphs = decoding_on(where, bebop.rollout_weights(copy.deepcopy(drafted_model), precision), monkeypatch)
    calls, kept = [(bebop.generate, {}), (bebop.speculative_generate, dict(gamma=3)),
                   (bebop.speculative_generate, dict(gamma=2, draft="greedy"))], []
    for perturb in (False, True):
        with torch.no_grad():
            for p in model.parameters() if perturb else ():
                p.mul_(1.05)
        for fn, kw in calls:
            for eos in (None, 3):
                eager = fn(model, RAGGED, 20, temperature=0, eos=eos, **kw)
                for _ in range(2):
                    graphed = fn(model, RAGGED, 20, temperature=0, eos=eos, graphs=graphs, **kw)
                    assert torch.equal(graphed.new_tokens, eager.new_tokens), (fn.__name__, kw, eos, perturb)
                    torch.testing.assert_close(graphed.logprobs, eager.logprobs, rtol=0, atol=1e-5)
                    assert graphed.stats == eager.stats and torch.equal(graphed.rounds, eager.rounds)
                    kept.append((graphed, eager))
    assert any(e.stats["accept_length"] > 1.5 for _, e in kept), "drafts were hardly accepted"
    assert all(torch.equal(graphed.new_tokens, eager.new_tokens) for graphed, eager in kept)


@pytest.mark.parametrize("where", ["stand_in", pytest.param("cuda", marks=needs_cuda)])
def test_graphed_sampling_follows_the_callers_generator(drafted_model, where, monkeypatch):
    model, graphs = decoding_on(where, drafted_model, monkeypatch)
    run = lambda fn, seed: fn(model, RAGGED, 20, graphs=graphs, generator=torch.Generator(model.lm_head.weight.device).manual_seed(seed))
    for fn in (bebop.generate, bebop.speculative_generate):
        a, b, c = run(fn, 1), run(fn, 1), run(fn, 2)
        assert torch.equal(a.new_tokens, b.new_tokens) and torch.equal(a.logprobs, b.logprobs)
        assert not torch.equal(a.new_tokens, c.new_tokens)


@pytest.mark.parametrize("lag", [1, 2])
def test_idle_steps_after_the_batch_ended_change_nothing(drafted_model, lag, monkeypatch):
    """The host learns that every row is done `lag` steps late, so a finished batch runs idle steps: the same tokens,
    log-probs and stats as reading the flag at once (lag 0, the same static decoder path and random stream)."""
    prompt, eos = torch.tensor([[1, 2, 3]]).expand(16, -1), 6
    calls = [(bebop.generate, {}), (bebop.speculative_generate, dict(draft="sample")),
             (bebop.speculative_generate, dict(draft="greedy"))]
    stand_in_graphs(monkeypatch)
    decode = lambda fn, kw, lag: fn(drafted_model, prompt, 30, eos=eos, generator=torch.Generator().manual_seed(0),
                                    graphs=bebop.CudaGraphs(drafted_model, lag=lag), **kw)
    at_once, idle, real = [decode(fn, kw, 0) for fn, kw in calls], [], bebop.repeat_until_done

    def watched(step, done, max_steps, lag_):
        real(lambda: (idle.append(bool(done.all())), step()), done, max_steps, lag_)
    monkeypatch.setattr(bebop, "repeat_until_done", watched)
    for (fn, kw), ref in zip(calls, at_once):
        idle.clear()
        out = decode(fn, kw, lag)
        assert idle.count(True) == lag, "the lagged loop ran no idle step: the test proves nothing"
        assert torch.equal(out.new_tokens, ref.new_tokens) and torch.equal(out.mask, ref.mask)
        assert torch.equal(out.logprobs, ref.logprobs) and out.stats == ref.stats


class GraphHazards(TorchDispatchMode):
    """Records each op that would break a CUDA graph or make it silently wrong: a read back to the host (.item(),
    int(t), `if t:`, a data-dependent shape such as nonzero or a boolean-mask index), an op tagged unsafe for graphs,
    and a random draw not from the generator handed to the step. Blind to .tolist() and .cpu() of a CPU tensor."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs, tags = kwargs or {}, set(func.tags)
        integer_index = func is torch.ops.aten.index.Tensor and all(i is None or i.dtype != torch.bool for i in args[1])
        if (torch.Tag.data_dependent_output in tags or torch.Tag.cudagraph_unsafe in tags
                or (torch.Tag.dynamic_output_shape in tags and not integer_index)):
            self.found.append(str(func))
        schema = func._schema.arguments
        named = {a.name: a.default_value for a in schema if a.has_default_value()} | {a.name: v for a, v in zip(schema, args)} | kwargs
        if torch.Tag.nondeterministic_seeded in tags and named.get("dropout_p", 1) > 0 and named.get("generator") is None:
            self.found.append(f"{func} without the step's generator")
        return func(*args, **kwargs)


def hazards_of_graphed_steps(monkeypatch, decode):
    """decode(graphs) through the stand-in, with every replayed step watched by GraphHazards."""
    found, replays = [], []

    def watched(step):
        def replay():
            with GraphHazards() as watch:
                step()
            found.extend(watch.found)
            replays.append(1)
        return replay
    stand_in_graphs(monkeypatch, watched)
    decode()
    assert replays, "no step was replayed"
    return found


@pytest.mark.parametrize("fn,kw", [
    (bebop.generate, dict(temperature=1.0)), (bebop.generate, dict(temperature=0.0, eos=3)),
    (bebop.speculative_generate, dict(temperature=1.0, draft="sample", eos=3)),
    (bebop.speculative_generate, dict(temperature=0.7, draft="greedy")),
    (bebop.speculative_generate, dict(temperature=0.0, gamma=2)), (bebop.speculative_generate, dict(gamma=0, eos=3))])
def test_a_decoding_step_never_waits_on_the_host(drafted_model, monkeypatch, fn, kw):
    """What makes a step capturable, op by op on a CPU: no read back to the host, no data-dependent shape or branch,
    every random number from the step's own generator. Also each gamma's round, and the rounds round_costs times."""
    decode = lambda: fn(drafted_model, RAGGED, 20, graphs=bebop.CudaGraphs(drafted_model),
                        generator=torch.Generator().manual_seed(0), **kw)
    assert hazards_of_graphed_steps(monkeypatch, decode) == []
    assert hazards_of_graphed_steps(monkeypatch, lambda: bebop.round_costs(drafted_model, 3, 3, 12, 5, True)) == []


@pytest.mark.parametrize("plant,expected", [
    (lambda s: s.done.all().item(), "_local_scalar_dense"), (lambda s: 1 if s.done.any() else 0, "_local_scalar_dense"),
    (lambda s: s.x[s.done], "aten.index.Tensor"), (lambda s: (s.tokens == 3).nonzero(), "aten.nonzero"),
    (lambda s: torch.rand(1), "without the step's generator"), (lambda s: F.one_hot(s.x, 8), "_local_scalar_dense")])
def test_the_host_wait_check_can_fail(drafted_model, monkeypatch, plant, expected):
    real = bebop.plain_step
    monkeypatch.setattr(bebop, "plain_step", lambda model, caches, s, *a, **k: (real(model, caches, s, *a, **k), plant(s)))
    found = hazards_of_graphed_steps(monkeypatch, lambda: bebop.generate(drafted_model, RAGGED, 20,
                                                                          graphs=bebop.CudaGraphs(drafted_model)))
    assert any(expected in f for f in found), found


def test_cuda_graphs_capture_once_per_shape_follow_the_weights_and_fall_back(drafted_model, monkeypatch):
    captures = stand_in_graphs(monkeypatch)
    model = copy.deepcopy(drafted_model)
    graphs, prompts = bebop.CudaGraphs(model), lambda B: torch.tensor([[1, 2, 3]]).expand(B, -1)
    for B in (1, 2, 1, 2):
        bebop.speculative_generate(model, prompts(B), 10, graphs=graphs)
    assert len(captures) == 2
    bebop.generate(model, prompts(1), 10, graphs=graphs)
    bebop.speculative_generate(model, prompts(1), 10, temperature=0.5, graphs=graphs)
    assert len(captures) == 4
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())   # new storage
    bebop.speculative_generate(model, prompts(1), 10, graphs=graphs)
    assert len(captures) == 5, "a graph over the old weights was replayed"

    def failing(step, tensors, generator):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(bebop, "capture_cuda_graph", failing)
    eager = bebop.speculative_generate(model, RAGGED, 20, temperature=0)
    graphs = bebop.CudaGraphs(model)
    with pytest.warns(UserWarning, match="capture failed"):
        first = bebop.speculative_generate(model, RAGGED, 20, temperature=0, graphs=graphs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no second capture, so no second warning
        again = bebop.speculative_generate(model, RAGGED, 20, temperature=0, graphs=graphs)
    assert torch.equal(first.new_tokens, eager.new_tokens) and torch.equal(again.new_tokens, eager.new_tokens)
    with warnings.catch_warnings(), pytest.raises(UserWarning, match="stream is capturing"):
        warnings.simplefilter("error")   # as pytestmark makes it for every graphed test: a failed capture fails it
        bebop.generate(model, RAGGED, 20, graphs=bebop.CudaGraphs(model))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="need a model on a CUDA device"):
        bebop.CudaGraphs(drafted_model)


@needs_cuda
def test_a_real_capture_changes_nothing_and_replays_fresh_samples(drafted_model):
    model = copy.deepcopy(drafted_model).cuda()
    x, g = torch.zeros(64, device="cuda"), torch.Generator("cuda").manual_seed(0)
    step = lambda: x.add_(torch.rand(64, device="cuda", generator=g))
    replay = bebop.capture_cuda_graph(step, [x], g)
    assert (x == 0).all()
    replay()
    first = x.clone()
    replay()
    assert not torch.equal(x - first, first) and (x > first).all()
    assert model is not None

# ------------------------------------------------------------------------------------------- 9. choosing gamma


def test_the_gamma_rule_on_synthetic_costs():
    """Shortest expected call, rounds x C(gamma): known optima, plain decoding among them, and the slowest-row term,
    which at a large batch turns down a draft length that Eq. 12 alone would take."""
    c = bebop.GammaChooser(3)
    c.alphas = [0.9, 0.9, 0.9]
    assert c.rounds(0, 32, 128) == 32 and c.rounds(3, 32, 1) == pytest.approx(32 / bebop.tokens_per_forward([0.9] * 3))
    choose = lambda costs, B: min(range(4), key=lambda g: c.rounds(g, 32, B) * costs[g])
    assert choose([1.0, 1.1, 1.2, 1.3], 1) == 3          # latency bound: the longest draft
    assert choose([1.0, 2.2, 3.3, 4.4], 1) == 0          # compute bound: plain decoding
    assert choose([1.0, 1.5, 2.0, 3.0], 1) == 2          # 1.9/1.5, 2.71/2.0, 3.44/3.0: gamma 2
    costs = [1.0, 1.8, 2.6, 3.4]                          # Eq. 12 alone favours gamma 1 (1.9 / 1.8 > 1) ...
    assert c.rounds(1, 32, 1) * costs[1] < 32 and choose(costs, 1) == 1
    assert choose(costs, 128) == 0                        # ... the slowest of 128 rows does not
    c.observe(dict(drafts_accepted=[10, 0, 0], drafts_reached=[20, 0, 0]))      # depth 1 measured: 0.5 for all deeper
    assert c.alphas == pytest.approx([0.5, 0.5, 0.5])
    c.observe(dict(drafts_accepted=[15, 8, 0], drafts_reached=[20, 10, 0]))     # then a running average
    assert c.alphas == pytest.approx([0.625, 0.8, 0.8])


@pytest.mark.parametrize("B", [1, 16, 128])
def test_expected_rounds_of_the_slowest_row_match_a_simulation(B):
    """GammaChooser.rounds against rounds counted by simulating B rows of 32 tokens with these per-depth acceptances;
    the same simulation shows that Eq. 12's mean alone falls short at 128 rows."""
    c, g = bebop.GammaChooser(3), torch.Generator().manual_seed(0)
    c.alphas = [0.8, 0.9, 0.9]
    reach = torch.tensor([1.0, 0.8, 0.72, 0.648, 0.0])
    worst = []
    for _ in range(200):
        left, rounds = torch.full((B,), 32), torch.zeros(B)
        while (left > 0).any():
            kept = 1 + ((torch.rand(B, 1, generator=g) < reach[1:4] / reach[:3]).cumprod(1)).sum(1)
            rounds += left > 0
            left = left - kept
        worst.append(rounds.max().item())
    simulated = sum(worst) / len(worst)
    assert c.rounds(3, 32, B) == pytest.approx(simulated, rel=0.08)
    if B == 128:
        assert 32 / bebop.tokens_per_forward(c.alphas) < 0.85 * simulated

# ------------------------------------------------------------------------------------------- 10. measures


def test_teacher_forced_acceptance_of_a_head_equal_to_the_policy_is_one(drafted_model, monkeypatch):
    """Draft rows equal to the target rows they are compared with give acceptance 1 at every depth; a head shifted by
    a position does not (the alignment is what is tested)."""
    seq = bebop.generate(drafted_model, torch.randint(0, 8, (6, 9), generator=torch.Generator().manual_seed(0)), 20,
                         generator=torch.Generator().manual_seed(1))
    real = drafted_model.mtp_logits

    def perfect(idx, n, backbone=None, shift=0):
        target, T = real(idx, n)[0], idx.size(1)
        return target, torch.stack([target[:, (torch.arange(T) + k + shift).clamp(max=T - 1)] for k in range(1, n + 1)], 1)
    monkeypatch.setattr(bebop, "PROMPT_LEN", 9)
    for shift, check in ((0, lambda a: a == pytest.approx([1.0] * 3, abs=1e-6)), (1, lambda a: max(a) < 0.95)):
        monkeypatch.setattr(drafted_model, "mtp_logits", functools_partial(perfect, shift=shift))
        tf = bebop.teacher_forced(drafted_model, seq.tokens, torch.ones_like(seq.new_tokens, dtype=torch.bool), 3)
        assert tf["valid"].sum() > 100 and check(bebop.masked_mean(tf["rs"], tf["valid"]).tolist())
    assert bebop.tokens_per_forward([0.8] * 4) == pytest.approx(3.3616)   # the paper's example of Eq. 12


def test_teacher_forced_compares_each_kept_token_but_the_first_k_at_depth_k(drafted_model, monkeypatch):
    """valid marks the drafts whose target is a kept answer token: of a row's n kept tokens the first is sampled at the
    prefill and never drafted, so depth k has n - k targets, whatever the EOS cut off."""
    prompts = torch.randint(0, 8, (8, 4), generator=torch.Generator().manual_seed(0))
    roll = bebop.speculative_generate(drafted_model, prompts, 24, gamma=3, eos=0, generator=torch.Generator().manual_seed(2))
    n = roll.mask.sum(1)
    assert n.min() < 3 and n.max() == 24, "the check needs rows cut short by the EOS (some below k) and full rows"
    monkeypatch.setattr(bebop, "PROMPT_LEN", 4)
    valid = bebop.teacher_forced(drafted_model, roll.tokens, roll.mask, 3)["valid"]
    for k in (1, 2, 3):
        assert valid[..., k - 1].sum(1).tolist() == (n - k).clamp(min=0).tolist(), k


def test_evaluate_reports_the_kl_of_the_policy_from_its_start(sft_policy, task, monkeypatch):
    """kl is KL(pi || pi_0) per kept answer token, worked out here a position at a time with full forwards on
    evaluate's own rollouts; KL(pi_0 || pi), the other direction, is another number here, so a swap fails."""
    start, g = copy.deepcopy(sft_policy), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    rolls, real = [], bebop.speculative_generate
    monkeypatch.setattr(bebop, "speculative_generate", lambda *a, **k: rolls.append(real(*a, **k)) or rolls[-1])
    prompts = task.prompts(8, torch.Generator().manual_seed(3))
    kl = bebop.evaluate(sft_policy, start, task, prompts)["kl"]
    forward, reverse = [], []
    with torch.no_grad():
        for tokens, mask in zip(rolls[0].tokens, rolls[0].mask):
            for j in range(int(mask.sum())):   # answer token j is drawn from the law after the first P + j tokens
                p, r = (F.softmax(m(tokens[None, :bebop.PROMPT_LEN + j])[0, -1].double(), -1) for m in (sft_policy, start))
                forward.append((p * (p / r).log()).sum().item())
                reverse.append((r * (r / p).log()).sum().item())
    assert kl == pytest.approx(sum(forward) / len(forward), rel=1e-4)
    assert abs(sum(reverse) / len(reverse) - kl) > 0.03 * kl, (kl, sum(reverse) / len(reverse))   # 7% apart here
    rs = bebop.evaluate(sft_policy, start, task, prompts, temperature=0.5)["rs"]   # drafted and measured at T = 0.5
    tf = bebop.teacher_forced(sft_policy, rolls[-1].tokens, rolls[-1].mask, 3, 0.5)
    assert rs == pytest.approx(bebop.tokens_per_forward(bebop.masked_mean(tf["rs"], tf["valid"]).tolist()))


def test_policy_samples_are_laid_out_like_sft_batches(sft_policy, task):
    """[prompt, answer up to its end mark, padding] and the length through the end mark (or the full width)."""
    seq, lengths = bebop.policy_samples(sft_policy, task, 16, torch.Generator().manual_seed(0))
    assert seq.shape == (16, task.seq_len) and (seq[:, :bebop.PROMPT_LEN] < 10).sum() == 16 * 5   # S, N digits
    for row, n in zip(seq, lengths.tolist()):
        answer = row[bebop.PROMPT_LEN:n]
        assert (answer[:-1] != bebop.EOS).all() and (answer[-1] == bebop.EOS or n == task.seq_len), (row, n)


def functools_partial(fn, **kw):
    return lambda *a, **k: fn(*a, **k, **kw)


def clustered_series(g, runs=4, steps=60, slope=-1.0, rho=0.95):
    """Runs of autocorrelated steps: x drifts within a run (a random walk) and y = slope x + a run offset + AR(1) noise,
    the offsets correlated with each run's x: what RL steps of a few runs look like."""
    xs, ys = [], []
    for _ in range(runs):
        x = torch.cumsum(0.05 * torch.randn(steps, generator=g, dtype=torch.float64), 0) + torch.randn((), generator=g, dtype=torch.float64)
        e = torch.zeros(steps, dtype=torch.float64)
        for t in range(1, steps):
            e[t] = rho * e[t - 1] + 0.05 * torch.randn((), generator=g, dtype=torch.float64)
        xs.append(x.tolist())
        ys.append((slope * x + 0.3 * x.mean() * torch.randn((), generator=g, dtype=torch.float64) + e).tolist())
    return xs, ys


def test_intervals_resample_the_independent_unit():
    """On autocorrelated, run-clustered data, the interval that resamples whole runs covers the true slope at about its
    nominal rate, where the interval that treats every step as an independent point covers it far less often."""
    g, covered, naive = torch.Generator().manual_seed(0), 0, 0
    for _ in range(40):
        xs, ys = clustered_series(g)
        slope, (lo, hi) = bebop.slope_ci(xs, ys)
        covered += lo <= -1.0 <= hi
        x, y = torch.tensor(sum(xs, [])), torch.tensor(sum(ys, []))
        resid = y - (y.mean() + slope * (x - x.mean()))
        se = (resid.pow(2).sum() / (len(x) - 2) / (x - x.mean()).pow(2).sum()).sqrt().item()
        naive += slope - 1.96 * se <= -1.0 <= slope + 1.96 * se
    assert covered >= 30 and naive <= 20, (covered, naive)
    x = torch.cumsum(torch.randn(200, generator=g, dtype=torch.float64), 0).tolist()
    wide, narrow = bebop.bootstrap(lambda i: sum(x[j] for j in i) / len(i), 200, 20), bebop.bootstrap(lambda i: sum(x[j] for j in i) / len(i), 200)
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])   # moving blocks see the drift that single steps hide
    assert bebop.bootstrap(lambda i: 0.1 + len(i), 5) == (5.1, 5.1)   # in float64: no digits lost to float32
    z = torch.randn(400, generator=g, dtype=torch.float64).tolist()   # the level: about the normal 95% interval of a mean
    lo, hi = bebop.bootstrap(lambda i: sum(z[j] for j in i) / len(i), len(z))
    assert hi - lo == pytest.approx(2 * 1.96 * torch.tensor(z).std().item() / 20, rel=0.1)   # a 90% one: 16% narrower


def test_decompose_finds_b_when_drift_starts_inside_the_early_phase():
    """alpha = 0.9 + b (H - H_0) + drift, the drift from step 0 and H trending with noise around it: the early-phase fit
    with a trend recovers b (the H-only fit of the paper's Eq. 16 takes the drift for entropy), and the terms add up."""
    g = torch.Generator().manual_seed(0)
    H = [1.0 + 0.005 * t + 0.05 * torch.randn((), generator=g).item() for t in range(90)]
    alpha = [0.9 - 0.5 * (h - 1.0) - 0.002 * t for t, h in enumerate(H)]
    d = bebop.decompose(H, alpha)
    assert d["b"] == pytest.approx(-0.5, abs=0.02) and d["b_ci"][0] <= d["b"] <= d["b_ci"][1]
    assert bebop.lstsq(alpha[:30], H[:30])[1] < -0.65   # without the trend, part of the drift is taken for entropy
    assert d["delta"] == pytest.approx(d["entropy_term"] + d["residual"])
    assert d["residual"] == pytest.approx(-0.002 * 80, abs=0.01)


def test_rl_entropy_and_decomposition_findings_by_hand(monkeypatch):
    """experiment_rl, _entropy and _decomposition on made-up runs whose answers are known: every rule's alpha_1 falls
    linearly in H (slope -beta) with a drift of 0.001 a step on the fixed contexts only, KL grows c / 1024 a step."""
    beta = {("ce", "to"): 0.3, ("ce", "rs"): 0.1, ("kl", "rs"): 0.08, ("e2e_tv", "rs"): 0.05}
    heads = lambda H, step: {h: {k: [0.9 - beta.get((h, k), 0.2) * H + 0.001 * step, 0.0, 0.0] for k in ("rs", "to")}
                             for h in ("ce", "kl", "e2e_tv", "online")}
    def run(c, slope):   # H rises `slope` a step (with a wiggle, so that H and the step are not collinear)
        H = [1 + slope * i + 0.1 * math.sin(i) for i in range(30)]
        Hf = [2 + slope * i / 2 + 0.1 * math.cos(i) for i in range(30)]
        steps = [dict(entropy=H[i], fixed_entropy=Hf[i], kl_to_start=c * i / 1024, rollouts=heads(H[i], 0),
                      fixed=heads(Hf[i], i)) for i in range(30)]
        return dict(steps=steps, lr=1e-4, online="none", start=dict(reward=0.5, counted=3.0),
                    end=dict(reward=0.6, counted=2.9))
    made = dict(recipe_s0=run(1, 0.001), recipe_s1=run(2, 0.001), fast_s0=run(8, 0.001), fast_s1=run(9, 0.001),
                entropy_up_s0=run(3, 0.05), entropy_down_s0=run(4, -0.05), online_ce_s0=run(5, 0.001),
                online_e2e_tv_s0=run(6, 0.001))
    monkeypatch.setattr(bebop, "rl_run", lambda lab, name, seed: made[f"{name}_s{seed}"])
    g = torch.Generator().manual_seed(0)
    rows = [torch.rand(20, generator=g) * 2 for _ in range(9)]   # per token: H of 9 rows, alpha_1 linear in it
    per_token = dict(entropy=rows, **{f"{k}_{h}": [0.9 - beta[h, k] * H for H in rows] for h, k in beta})
    lab = types.SimpleNamespace(tc=bebop.TrainConfig(rl_steps=30), per_token=lambda T: per_token)
    rl = bebop.experiment_rl(lab)
    assert rl["matched_kl"] == 29 / 1024   # the recipe run that travelled least: c = 1 for 29 steps
    for key, c in (("recipe_s0", 1), ("recipe_s1", 2), ("fast_s0", 8), ("entropy_up_s0", 3)):
        first = -(-29 // c)   # the first step whose KL reaches it; alpha_1 there minus at step 0
        steps = made[key]["steps"]
        want = -beta["e2e_tv", "rs"] * (steps[first]["fixed_entropy"] - steps[0]["fixed_entropy"]) + 0.001 * first
        assert rl["runs"][key]["alpha1_change_at_matched_kl"] == pytest.approx(want), key
    pooled = bebop.experiment_entropy(lab, rl)
    for rule, (head, k) in bebop.RULES.items():   # runs pooled: tokens per forward = 1 + alpha_1 against H
        assert pooled["pooled"][rule][0] == pytest.approx(-beta[head, k], abs=1e-6), rule
    slopes = {k: v[0] for k, v in pooled["per_token"].items()}   # per token: alpha_1 against H
    assert slopes == pytest.approx(dict(to_ce=-0.3, rs_ce=-0.1, rs_e2e_tv=-0.05, rs_e2e_tv_minus_rs_ce=0.05), abs=1e-6)
    split = bebop.experiment_decomposition(lab, rl)
    mean10 = lambda x: sum(x[-10:]) / 10 - sum(x[:10]) / 10
    for key, e in split.items():
        H, Hf = ([s[k] for s in made[key]["steps"]] for k in ("entropy", "fixed_entropy"))
        assert e["entropy_change"] == pytest.approx(mean10(H)) and e["reward_gain"] == pytest.approx(0.1)
        assert bool(e["rules"]) == key.startswith("entropy"), key   # only they move H by 0.2 nats or more
        for rule, d in e["rules"].items():
            b = -beta[bebop.RULES[rule]]
            assert d["b"] == pytest.approx(b, abs=1e-6) and d["residual"] == pytest.approx(0, abs=1e-6)
            assert d["fixed_entropy_term"] == pytest.approx(b * mean10(Hf), abs=1e-6)
            assert d["fixed_residual"] == pytest.approx(0.001 * 20, abs=1e-6)   # the drift, 20 steps between means


def test_mean_ci_is_a_t_interval():
    mean, (lo, hi) = bebop.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(4.30 * 1.0 / math.sqrt(3))

# ------------------------------------------------------------------------------------------- 11. runs


def test_learning_rate_warms_up_linearly_then_decays_by_a_cosine_to_a_tenth():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    lrs = []
    for step in range(100):
        bebop.set_lr(opt, step, 100, 2.0, warmup=10)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:11] == pytest.approx([0.2 * (s + 1) for s in range(10)] + [2.0])
    assert lrs[55] == pytest.approx(0.2 + 1.8 / 2) and lrs[-1] == pytest.approx(0.2, abs=1e-3)   # halfway; the end
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))


def _ddp_worker(rank, world, port, out, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    calls, reduce = [], bebop.all_reduce

    def spy(values, w, op="mean"):   # what each rank contributes and what comes back
        calls.append((dict(values), op, reduce(values, w, op)))
        return calls[-1][2]
    bebop.all_reduce = spy
    model, _ = bebop.train(bebop.parse_args(TINY_RUN + ["--out", out]))
    torch.save(dict(state=model.state_dict(), calls=calls), f"{results}/rank{rank}.pt")


def test_two_ranks_with_gloo_stay_in_sync_and_log_reduced_metrics(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "out"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert states_equal(r0["state"], r1["state"]) and len(r0["calls"]) == len(r1["calls"])
    means = [(a[0], b[0]) for a, b in zip(r0["calls"], r1["calls"]) if "reward" in a[0]]
    sums = [(a[0], b[0]) for a, b in zip(r0["calls"], r1["calls"]) if "drafts_reached" in a[0]]
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl") if '"grpo"' in line]
    assert len(means) == len(sums) == len(log) == 6
    for (v0, v1), (s0, s1), entry in zip(means, sums, log):
        assert entry["reward"] == pytest.approx((v0["reward"] + v1["reward"]) / 2, abs=1e-12)
        assert entry["drafts_reached"] == [a + b for a, b in zip(s0["drafts_reached"], s1["drafts_reached"])]
        assert entry["accept_length"] == pytest.approx((s0["kept_tokens"] + s1["kept_tokens"]) / (s0["row_rounds"] + s1["row_rounds"]))
        assert v0["entropy"] != v1["entropy"], "both ranks drew the same rollouts: the data is not split"
    sft0, sft1 = ([c[0]["loss"] for c in r["calls"] if set(c[0]) == {"loss"}] for r in (r0, r1))
    assert len(sft0) == 20 + 8 and all(a != b for a, b in zip(sft0, sft1)), "ranks trained on the same batches"


def interrupt_at_call(monkeypatch, where, n=3):
    """Ctrl-C arrives in the middle of the n-th call of bebop.<where>."""
    original, calls = getattr(bebop, where), []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)
    monkeypatch.setattr(bebop, where, interrupting)


@pytest.mark.parametrize("where,flags", [("sft_loss", []), ("mtp_training_loss", []),
                                         ("grpo_loss", ["--mtp-online", "e2e_tv", "--temperature", "0.8", "--kl-coef", "0.1"])])
def test_resume_after_ctrl_c_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch, capsys, where, flags):
    """Bit for bit with a fixed gamma: the weights, and each GRPO step's rollouts (the tiny run earns little reward, so
    equal weights alone would show little), including the MTP stage (its policy samples are made again) and an RL run
    that updates the MTP layer online (its optimizer is in the checkpoint) with a KL term (its pi_0 is restored)."""
    full, _ = bebop.train(bebop.parse_args(TINY_RUN + flags + ["--out", str(tmp_path / "a")]))
    interrupt_at_call(monkeypatch, where)
    with pytest.raises(KeyboardInterrupt, match="continue with --resume"):
        bebop.train(bebop.parse_args(TINY_RUN + flags + ["--out", str(tmp_path / "b")]))
    monkeypatch.undo()
    stage = {"sft_loss": "sft", "mtp_training_loss": "mtp", "grpo_loss": "grpo"}[where]
    assert torch.load(tmp_path / "b" / f"{stage}.pt", weights_only=False)["step"] == 3
    err = capsys.readouterr().err
    assert f" 3/{dict(sft=20, mtp=8, grpo=6)[stage]} " in err.replace("\r", "\n").strip().splitlines()[-1]
    assert "Ctrl-C: saving after the step in flight" in err
    resumed, summary = bebop.train(bebop.parse_args(TINY_RUN + flags + ["--out", str(tmp_path / "b"), "--resume"]))
    assert states_equal(full.state_dict(), resumed.state_dict())
    keys = ("reward", "entropy", "kept_tokens", "row_rounds", "drafts_reached", "drafts_accepted")
    logs = [[{k: m[k] for k in keys} for m in map(json.loads, open(tmp_path / r / "log.jsonl")) if m["stage"] == "grpo"]
            for r in ("a", "b")]
    assert logs[0] == logs[1] and len(logs[0]) == 6
    heads = [{k: v for k, v in torch.load(tmp_path / "a" / f"{s}.pt", weights_only=False)["model"].items()
              if k.startswith("mtp.")} for s in ("mtp", "grpo")]
    assert all(torch.equal(v, heads[1][k]) for k, v in heads[0].items()) == ("--mtp-online" not in flags)
    assert summary["reward_before"] == json.load(open(tmp_path / "a" / "summary.json"))["reward_before"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    bebop.train(bebop.parse_args(TINY_RUN + ["--out", str(out)]))
    return out


def copy_run(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


def refusal(argv) -> str:
    """What main() says when it refuses: one line, no traceback."""
    with pytest.raises(SystemExit) as e:
        bebop.main(argv)
    assert str(e.value).startswith("bebop: error: ") and "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing_key", "wrong_shape", "missing_optimizer"])
def test_a_damaged_checkpoint_is_refused_in_one_line_and_left_alone(finished_run, tmp_path, damage):
    out = copy_run(finished_run, tmp_path)
    path, data = out / "grpo.pt", (out / "grpo.pt").read_bytes()
    if damage in ("garbage", "truncated"):
        path.write_bytes(b"not a checkpoint" if damage == "garbage" else data[:len(data) // 2])
    else:
        ckpt = torch.load(path, weights_only=False)
        if damage == "missing_key":
            del ckpt["rng"]
        elif damage == "wrong_shape":
            ckpt["model"]["wte.weight"] = ckpt["model"]["wte.weight"][:, :3].clone()
        else:
            ckpt["optimizers"] = []
        torch.save(ckpt, path)
    bad = path.read_bytes()
    assert "grpo.pt is unreadable or truncated" in refusal(TINY_RUN + ["--out", str(out), "--resume"])
    assert path.read_bytes() == bad and (out / "sft.pt").exists()


def test_runs_never_take_another_runs_checkpoints_unless_told(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "holds checkpoints of another run" in (e := refusal(TINY_RUN + ["--out", str(out)])) and "--overwrite" in e
    differ = refusal(TINY_RUN + ["--out", str(out), "--resume", "--seed", "9", "--mtp-loss", "ce", "--rl-steps", "9",
                                 "--preset", "cpu"])
    for change in ("seed 1337 -> 9", "mtp_loss 'e2e_tv' -> 'ce'", "rl_steps 6 -> 9", "n_layer 2 -> 6", "--overwrite"):
        assert change in differ, (change, differ)   # every difference, of every stage, in the one line
    differ = refusal(TINY_RUN + ["--out", str(out), "--experiment", "losses", "--overwrite", "--seed", "9"])
    assert "sft.pt was made with other settings (seed 1337 -> 9)" in differ, differ
    assert differ.endswith("or use another --out: experiments start from its sft.pt"), differ   # not --overwrite
    differ = refusal(TINY_RUN + ["--out", str(out), "--bench", "--seed", "9"])   # the bench never overwrites either
    assert "mtp.pt was made with other settings (seed 1337 -> 9)" in differ, differ
    assert differ.endswith("or use another --out: the bench times the run in it"), differ
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "file" / "inside"):
        assert "cannot use --out" in refusal(TINY_RUN + ["--out", str(path)])
    bebop.main(TINY_RUN + ["--out", str(out), "--overwrite", "--seed", "5"])
    assert torch.load(out / "grpo.pt", weights_only=False)["train"]["seed"] == 5
    assert sum(json.loads(line)["stage"] == "sft" for line in open(out / "log.jsonl")) == 20


def test_every_experiment_runs_end_to_end_and_a_second_sweep_reuses_its_heads_and_rl_runs(tmp_path, monkeypatch):
    """The findings' code on a toy budget (two seeds, three temperatures, RL runs of 4 steps, one held-out prompt):
    experiments.json holds every experiment, every number in it is finite, tokens per forward at gamma 3 lie in
    [1, 4], RS wins most tokens (App. E), e2e TV minus each loss is paired by seed and the temperature change runs
    from low to high; a second sweep trains nothing, rolls out no GRPO step, and finds the same."""
    monkeypatch.setattr(bebop, "SEEDS", (0, 1))
    monkeypatch.setattr(bebop, "TEMPERATURES", (0.7, 1.0, 1.3))
    argv = TINY_RUN + ["--rl-steps", "10", "--eval-prompts", "1", "--experiment", "all", "--out", str(tmp_path)]
    first = json.loads(json.dumps(bebop.main(argv)))   # one held-out prompt, the fewest: eval_prompts // 2 is 0
    assert list(first) == list(bebop.EXPERIMENTS) == list(json.load(open(tmp_path / "experiments.json")))
    numbers = [x for x in torch.utils._pytree.tree_leaves(first) if isinstance(x, float)]
    assert len(numbers) > 1000 and all(math.isfinite(x) for x in numbers)
    for loss in bebop.MTP_LOSSES:
        r = first["losses"][loss]
        assert all(1 <= r[k][0] <= 4 for k in ("rs_expected", "rs_counted", "to_expected", "to_counted")), (loss, r)
    assert all(1 <= x <= 4 for r in first["temperature"].values() for x in r["accept_length"])
    for loss, diff in first["losses"]["e2e_tv_minus"].items():   # e2e TV minus each loss, paired seed by seed
        for k, (value, _) in diff.items():
            pairs = zip(first["losses"]["e2e_tv"]["seeds"], first["losses"][loss]["seeds"])
            assert value == pytest.approx(sum(a[k] - b[k] for a, b in pairs) / 2), (loss, k)
    shares = [r["rs_wins_tokens"] for r in first["boundary"].values()]   # App. E: RS wins most tokens of a good head
    assert all(0.5 < x <= 1 for x in shares), shares
    assert len(first["rl"]["runs"]) == 8 and all(len(r["steps"]) == 4 for r in first["rl"]["runs"].values())
    for head in ("ce", "kl", "e2e_tv"):   # RL's step 0 measures each head on Table 2's contexts, by another path
        table2, rl0 = first["losses"][head]["seeds"][0], first["rl"]["runs"]["recipe_s0"]["steps"][0]["fixed"][head]
        assert rl0["rs"] == pytest.approx(table2["rs_alphas"], abs=1e-5), head
        assert bebop.tokens_per_forward(rl0["to"]) == pytest.approx(table2["to_expected"], abs=1e-5), head
    for key, r in first["rl"]["runs"].items():   # each step is measured on the weights that wrote its rollouts; an
        assert r["steps"][0]["kl_to_start"] == 0   # entropy bonus moves them every step (a group all scoring alike not)
        assert r["steps"][-1]["kl_to_start"] > 0 or not key.startswith("entropy"), key
    for name in ("mtp_training_loss", "grpo_step"):
        monkeypatch.setattr(bebop, name, lambda *a, **k: pytest.fail("a cached head or RL run was made again"))
    again = torch.utils._pytree.tree_leaves(json.loads(json.dumps(bebop.main(argv))))
    assert [x for x in again if not isinstance(x, float)] == [x for x in torch.utils._pytree.tree_leaves(first)
                                                              if not isinstance(x, float)]
    assert [x for x in again if isinstance(x, float)] == pytest.approx(numbers, rel=1e-9)   # threads sum in any order
    wider = bebop.main(argv[:-6] + ["--eval-prompts", "16", "--experiment", "temperature", "--out", str(tmp_path)])
    for r in wider["temperature"].values():   # the change runs from the lowest temperature to the highest
        assert r["change"][0] == pytest.approx(r["accept_length"][-1] - r["accept_length"][0])
    assert any(r["change"][0] != 0 for r in wider["temperature"].values()), "one prompt: no change to test"
    trained = []   # --overwrite redoes the heads: each head's checkpoint is removed and its training runs again
    monkeypatch.setattr(bebop, "train_mtp", lambda run, *a, **k: trained.append(run.out))
    bebop.main(argv[:-4] + ["--experiment", "losses", "--overwrite", "--out", str(tmp_path)])
    assert len(trained) == 2 * len(bebop.MTP_LOSSES) and not any(os.path.exists(f"{o}/mtp.pt") for o in trained)


def test_an_experiment_reuses_a_cached_rl_run_only_if_made_with_the_same_settings(tmp_path):
    lab = types.SimpleNamespace(out=str(tmp_path), tc=bebop.TrainConfig(gamma=3), overwrite=False)
    lr, coef, online, _ = bebop.RL_RUNS["fast"]
    train = bebop.asdict(bebop.replace(lab.tc, rl_lr=lr, entropy_coef=coef, mtp_online=online))
    path = tmp_path / "exp_rl_fast_s1.json"
    path.write_text(json.dumps(dict(train={**train, "ckpt_every": 7}, steps="cached")))   # changes no result
    assert bebop.rl_run(lab, "fast", 1)["steps"] == "cached"
    path.write_text(json.dumps(dict(train={**train, "rl_steps": 7}, steps="cached")))
    with pytest.raises(bebop.RunError, match=r"rl_steps 7 -> 200\); use the same flags, or --overwrite"):
        bebop.rl_run(lab, "fast", 1)
    assert json.loads(path.read_text())["train"]["rl_steps"] == 7   # refused, left alone
    path.write_text(json.dumps(dict(steps="cached")))
    with pytest.raises(bebop.RunError, match=r"other settings \(it records none\)"):
        bebop.rl_run(lab, "fast", 1)

    class Redone(Exception):
        pass

    def head(*args):   # --overwrite: the run is made again, from the lab's heads
        raise Redone
    lab.overwrite, lab.head = True, head
    with pytest.raises(Redone):
        bebop.rl_run(lab, "fast", 1)


def test_a_finished_run_kept_its_head_frozen_and_its_summary_reads_its_log(finished_run):
    """The recipe freezes the MTP layer through RL; MTP training starts on CE for mtp_ce_warmup of its steps; the
    summary's entropy and accept length are those of the last GRPO steps in log.jsonl (here all 6, of up to 10), and
    its reward gain is paired by prompt."""
    mtp, grpo = (torch.load(finished_run / f"{s}.pt", weights_only=False)["model"] for s in ("mtp", "grpo"))
    assert all(torch.equal(v, grpo[k]) for k, v in mtp.items() if k.startswith("mtp.")), "RL moved the MTP layer"
    assert not all(torch.equal(v, grpo[k]) for k, v in mtp.items()), "RL did not move the policy"
    log = [json.loads(line) for line in open(finished_run / "log.jsonl")]
    assert [m["objective"] for m in log if m["stage"] == "mtp"] == ["ce"] * 4 + ["e2e_tv"] * 4
    last, summary = [m for m in log if m["stage"] == "grpo"][-10:], json.load(open(finished_run / "summary.json"))
    assert summary["entropy"] == pytest.approx(sum(m["entropy"] for m in last) / len(last), rel=1e-12)
    kept, rounds = sum(m["kept_tokens"] for m in last), sum(m["row_rounds"] for m in last)
    assert summary["accept_length"] == pytest.approx(kept / rounds, rel=1e-12) and kept > rounds
    accepted, reached = ([sum(m[k][j] for m in last) for j in range(3)] for k in ("drafts_accepted", "drafts_reached"))
    assert summary["acceptance"][:3] == pytest.approx([a / r for a, r in zip(accepted, reached)], rel=1e-12)
    assert summary["acceptance"][3:] == [None, None]   # gamma 3: depths 4 and 5 never drafted
    assert summary["rollout_speedup"] == pytest.approx(summary["tokens_per_s"]["3"] / summary["tokens_per_s"]["0"])
    # The reward gain's interval resamples prompts, each prompt's reward after RL paired with its own before it.
    ckpt = torch.load(finished_run / "grpo.pt", weights_only=False)
    model, tc = bebop.GPT(bebop.GPTConfig(**ckpt["model_config"])), ckpt["train"]
    model.load_state_dict(ckpt["model"])
    task = bebop.DigitSumTask(seed=tc["task_seed"])
    held = bebop.held_out_prompts(task, tc["eval_prompts"], tc["task_seed"], "cpu")
    after = bebop.evaluate(model, model, task, held, tc["temperature"], tc["seed"])["rewards"]
    gain = [a - b for a, b in zip(after, ckpt["extra"]["evaluations"]["0"]["rewards"])]
    assert summary["reward_after"] == pytest.approx(sum(after) / len(after))
    assert summary["reward_gain_ci"] == pytest.approx(bebop.bootstrap(lambda i: sum(gain[j] for j in i) / len(i), len(gain)))


def test_a_resumed_finished_run_reevaluates_and_keeps_its_wall_time(finished_run, tmp_path, capsys, monkeypatch):
    out = copy_run(finished_run, tmp_path)
    trained = torch.load(out / "grpo.pt", weights_only=False)["wall_seconds"]   # the run's time through RL
    summary = bebop.main(TINY_RUN + ["--out", str(out), "--resume"])
    assert summary["wall_seconds"] > trained and set(summary["frozen_head"]) == {"start", "middle", "end"}
    assert "the policy on 32 held-out prompts" in capsys.readouterr().out
    # the start and middle were measured on the run's prompts: other held-out prompts would compare unlike things
    assert "eval_prompts 32 -> 16" in refusal(TINY_RUN + ["--out", str(out), "--resume", "--eval-prompts", "16"])
    interrupt_at_call(monkeypatch, "time_rollouts", n=1)   # every stage is saved: Ctrl-C in the summary stops at once
    with pytest.raises(SystemExit, match="^\ninterrupted$"):
        bebop.main(TINY_RUN + ["--out", str(out), "--resume"])
    assert "saving after the step" not in capsys.readouterr().err


def test_bf16_rollout_weights_track_the_trainer_and_a_bf16_run_trains(drafted_model, tmp_path, monkeypatch):
    model = copy.deepcopy(drafted_model)
    assert bebop.rollout_weights(model, "fp32") is model
    policy = bebop.rollout_weights(model, "bf16")
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in policy.parameters())
    assert policy.rope_cos.dtype == torch.float32, "rotary tables must stay float32"
    where = [p.data_ptr() for p in policy.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    bebop.refresh_rollout_weights(policy, model)
    assert [p.data_ptr() for p in policy.parameters()] == where, "refreshing moved the weights: graphs would break"
    assert all(torch.equal(q, p.to(torch.bfloat16)) for q, p in zip(policy.parameters(), model.parameters()))
    out, ref = (bebop.speculative_generate(m, RAGGED, 20, temperature=0) for m in (policy, model))
    assert out.logprobs.dtype == torch.float32 and (out.new_tokens == ref.new_tokens).float().mean() > 0.8
    used, evaluated, real, real_evaluate = [], [], bebop.grpo_step, bebop.evaluate
    monkeypatch.setattr(bebop, "grpo_step", lambda model, policy, *a, **k: (
        used.append([p.detach().clone() for p in policy.parameters()]), real(model, policy, *a, **k))[1])
    monkeypatch.setattr(bebop, "evaluate", lambda policy, *a, **k: (
        evaluated.append([p.detach().clone() for p in policy.parameters()]), real_evaluate(policy, *a, **k))[1])
    trained, summary = bebop.train(bebop.parse_args(TINY_RUN + ["--precision", "bf16", "--out", str(tmp_path)]))
    assert all(p.dtype == torch.bfloat16 for p in used[0])
    assert not all(torch.equal(a, b) for a, b in zip(used[0], used[-1])), "rollouts never saw the updated policy"
    assert all(torch.equal(q, p.detach().to(torch.bfloat16)) for q, p in zip(evaluated[-1], trained.parameters())), \
        "the summary evaluated the policy as it was before its last update"
    used.clear()   # the bench's GRPO step rolls out as the run does
    tc, task = bebop.configure(bebop.parse_args(TINY_RUN + ["--precision", "bf16"]))[:2]
    bebop.time_grpo_steps(trained, task, tc, "cpu", dict(plain=0), 1)
    assert used and all(p.dtype == torch.bfloat16 for step in used for p in step)
    sft = [e["loss"] for e in map(json.loads, open(tmp_path / "log.jsonl")) if e["stage"] == "sft"]
    assert sft[-1] < sft[0] - 0.3 and summary["accept_length"] > 1.5 and math.isfinite(summary["reward_after"])


def test_training_stops_at_the_first_non_finite_loss(tmp_path, monkeypatch):
    original, calls = bebop.sft_loss, []
    monkeypatch.setattr(bebop, "sft_loss", lambda *a, **k: calls.append(1) or original(*a, **k) * (math.nan if len(calls) == 12 else 1))
    argv = TINY_RUN + ["--ckpt-every", "5", "--out", str(tmp_path)]
    assert refusal(argv).startswith("bebop: error: sft step 11: the loss is nan; stopped")
    assert not (tmp_path / "mtp.pt").exists() and not (tmp_path / "summary.json").exists()
    assert torch.load(tmp_path / "sft.pt", weights_only=False)["step"] == 10   # saved after steps 5 and 10


def test_auto_picks_from_measured_costs_and_a_run_drafts_with_it(tmp_path, monkeypatch, capsys):
    """gamma auto in a run: costs where plain decoding wins at the RL batch and long drafts at batch 1; the choice
    follows, and the summary says what the rollouts drafted."""
    monkeypatch.setattr(bebop, "round_costs", lambda model, B, *a: [1.0] + [1.0 + (g if B > 1 else 0.05 * g) for g in range(1, 6)])
    _, summary = bebop.train(bebop.parse_args(TINY_RUN[:-4] + ["--gamma", "auto", "--out", str(tmp_path)]))
    assert summary["gamma_chosen_in_rl"] == {"0": 6} and "nothing (plain) on 6 steps" in capsys.readouterr().out
    chooser = bebop.GammaChooser(5)
    assert chooser(None, 1, 8, 33) == 5 and chooser(None, 16, 8, 33) == 0

# ------------------------------------------------------------------------------------------- 13. bench, 14. main


def test_bench_writes_the_table(tmp_path):
    rows = bebop.main(["--bench", "--preset", "tiny", "--sft-steps", "5", "--mtp-steps", "5", "--rl-prompts", "2",
                       "--group-size", "4", "--out", str(tmp_path)])
    assert len(rows) == len(json.load(open(tmp_path / "bench.json")))
    decoding = [r for r in rows if r["mode"] in ("plain", "spec")]
    assert {(r["mode"], r["gamma"], r["batch"]) for r in decoding} == {
        (m, g, B) for B in (1, 4, 16, 8) for m, g in [("plain", None)] + [("spec", g) for g in (1, 2, 3, 4, 5, "auto")]}
    for r in decoding:
        assert r["tokens_per_s"] > 0 and r["calls"] >= 3 and r["ratio_to_plain"][1] <= r["ratio_to_plain"][0] <= r["ratio_to_plain"][2]
        assert r["accept_length"] == 1.0 if r["mode"] == "plain" else r["accept_length"] >= 1.0
    assert sum(next(r for r in decoding if r["gamma"] == "auto")["chosen"].values()) >= 3
    for r in (r for r in rows if r["mode"] == "pieces"):
        assert r["t_plain"] > 0 and len(r["t_round"]) == 5 and min(r["t_round"]) > 0 and r["ideal_speedup"] > 0
        fit = [r["t_fixed"] + g * r["t_per_draft"] for g in range(1, 6)]   # least squares: residuals sum to 0
        assert sum(fit) == pytest.approx(sum(r["t_round"]), rel=1e-6)
    assert {r["rollout"] for r in rows if r["mode"] == "grpo_step"} == {"plain", "spec", "auto"}
    assert {r["variant"] for r in rows if r["mode"] == "tv_memory"} == {"plain_tv", "lean_tv", "plain_e2e", "lean_e2e"}


def test_memory_lean_tv_peak_is_at_most_half_of_plain_autograd():
    """App. F, measured: the peak memory of forward + backward of head matmul + loss, each variant in its own process,
    for per-step and e2e TV; the plain path's peak holds logits-sized tensors, so the harness can see them."""
    mem, logits_mb = bebop.tv_memory_benchmark("cpu"), 768 * 32768 * 4 / 2**20
    for loss in ("tv", "e2e"):
        assert mem[f"plain_{loss}"] >= 1.5 * logits_mb and mem[f"lean_{loss}"] <= 0.5 * mem[f"plain_{loss}"], mem


@pytest.mark.parametrize("argv,message", [
    (["--gamma", "6"], "argument --gamma: expected auto, or an integer in 0..5 (0: plain rollouts), got '6'"),
    (["--gamma", "fast"], "argument --gamma: expected auto, or an integer in 0..5"),
    (["--group-size", "1"], "argument --group-size: expected an integer in 2..65536, got '1'"),
    (["--rl-steps", "0"], "argument --rl-steps: expected an integer in 1..10000000, got '0'"),
    (["--kl-coef", "-0.1"], "argument --kl-coef: expected a finite number in [0, 1e+06], got '-0.1'"),
    (["--kl-coef", "inf"], "expected a finite number"), (["--kl-coef", "nan"], "expected a finite number"),
    (["--entropy-coef=-inf"], "argument --entropy-coef: expected a finite number in [-100, 1e+06]"),
    (["--temperature", "0"], "argument --temperature: expected a finite number in (0, 1e+06], got '0'"),
    (["--mtp-ce-warmup", "nan"], "argument --mtp-ce-warmup: expected a finite number in [0, 1]"),
    (["--sft-steps", "abc"], "argument --sft-steps: expected an integer in 1..10000000, got 'abc'"),
    (["--batch-size", str(10**20)], "argument --batch-size: expected an integer in 1..65536"),
    (["--seed", "-1"], "argument --seed: expected an integer in 0..9223372036854775807"),
    (["--mtp-loss", "mse"], "argument --mtp-loss: invalid choice: 'mse'"), (["--preset", "huge"], "invalid choice"),
    (["--rl-step", "5"], "unrecognized arguments: --rl-step 5"), (["--resume", "--overwrite"], "choose one"),
    (["--bench", "--experiment", "all"], "--bench and --experiment are separate jobs"),
    (["--bench", "--overwrite"], "--bench times the run in --out, --overwrite replaces it: choose one")])
def test_bad_flags_get_one_clear_line(capsys, argv, message):
    with pytest.raises(SystemExit):
        bebop.parse_args(argv)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert "at most 65536" in refusal(["--preset", "tiny", "--rl-prompts", "65536", "--group-size", "4", "--out", "/tmp/x"])


def test_the_bench_and_the_experiments_refuse_torchrun(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")   # as torchrun sets it: every rank would redo the same work in the same files
    for argv in (["--bench"], ["--experiment", "rl"]):
        with pytest.raises(SystemExit):
            bebop.parse_args(argv)
        assert f"{argv[0]} runs in one process, not under torchrun" in capsys.readouterr().err


def test_flags_come_from_train_config_with_their_comments_as_help(capsys):
    for f in bebop.fields(bebop.TrainConfig):
        assert getattr(bebop.parse_args([]), f.name) is None
    tc = bebop.configure(bebop.parse_args(["--preset", "tiny", "--sft-steps", "7", "--gamma", "0", "--no-cuda-graphs"]))[0]
    assert (tc.sft_steps, tc.gamma, tc.cuda_graphs, tc.rl_steps) == (7, 0, False, bebop.PRESETS["tiny"]["rl_steps"])
    with pytest.raises(SystemExit):
        bebop.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("rejection sampling (RS)", "target-only", "k3 estimate", "(default: 1337)", "tiny preset 20",
                 "0 (plain decoding)"):
        assert text in out, text


def test_readme_commands_are_the_ones_ci_and_the_docstring_use_and_its_flags_exist(capsys):
    here = os.path.dirname(os.path.abspath(__file__))
    readme, ci = open(os.path.join(here, "README.md")).read(), open(os.path.join(here, ".ci", "run")).read()
    commands = re.findall(r"^pip install -r requirements.txt && (.+?)\s*(?:#.*)?$", readme, re.M)
    assert commands == ["python bebop.py", "python -m pytest -q"] and ci.strip().splitlines()[-1] == commands[1]
    assert all(c in bebop.__doc__ for c in commands)
    with pytest.raises(SystemExit):
        bebop.parse_args(["--help"])
    known = set(re.findall(r"--[a-z][a-z0-9-]+", capsys.readouterr().out))
    for flag in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]+", readme)) - {"--standalone", "--nproc_per_node",
                                                                            "--index-url"}:   # torchrun's, pip's
        assert flag in known, f"README names {flag}, which bebop does not have"
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README shows how to lift pieces"
    for block in blocks:   # the example runs as printed
        exec(compile(block, "README.md", "exec"), {})


def test_tutorial_notebook_runs_top_to_bottom(monkeypatch):
    """Every code cell of tutorial.ipynb in order, in its short mode; the stored copy is executed, with outputs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    monkeypatch.setenv("BEBOP_TUTORIAL_FAST", "1")
    monkeypatch.setattr(plt, "show", lambda *a, **k: plt.close("all"))
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tutorial.ipynb")
    cells = [c for c in json.load(open(path))["cells"] if c["cell_type"] == "code"]
    namespace = {"__name__": "__tutorial__"}
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        assert not source.lstrip().startswith(("%", "!")), f"cell {i} uses IPython magic"
        exec(compile(source, f"tutorial.ipynb[code cell {i}]", "exec"), namespace)
    assert all(c.get("outputs") for c in cells), "store the notebook executed (README says how)"
    assert os.path.getsize(path) < 3_000_000
