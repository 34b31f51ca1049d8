"""Tests for bebop.py. Run: python -m pytest -q

Statistical tests use fixed seeds and a chi-square test whose p-value must stay above P_MIN for the
real sampler; each family also checks that the same test rejects deliberately broken samplers
(p-value below P_BROKEN), so a pass means something."""
import copy
import itertools
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bebop


# ----------------------------------------------------------------------------- helpers and shared fixtures


P_MIN = 1e-4      # a correct sampler must pass every chi-square test at this level


P_BROKEN = 1e-8   # a broken sampler must fail at least this clearly


def chi2_pvalue(counts, probs, min_expected=5.0):
    """Pearson chi-square goodness of fit; cells with small expected counts are pooled into one."""
    counts, probs = counts.double(), probs.double()
    n = counts.sum()
    expected = n * probs
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    if (obs[~keep] > 0).any():   # mass where the law has none: impossible under the null
        return 0.0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = max(int(keep.sum()) - 1, 1)
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def tiny_model(seed=0, vocab=5, n_layer=1, n_embd=16, block_size=16, sharpen=4.0):
    """A random model whose next-token laws are peaked and depend on the context."""
    torch.manual_seed(seed)
    cfg = bebop.GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=n_embd)
    model = bebop.GPT(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen / (0.02 * math.sqrt(n_embd)))
    return model.eval()


def exact_sequence_law(model, prompt, n_new, temperature=1.0):
    """P(x_1..x_n | prompt) for every continuation, by enumeration with full forwards."""
    V = model.config.vocab_size
    conts = torch.tensor(list(itertools.product(range(V), repeat=n_new)))
    seqs = torch.cat([prompt.expand(len(conts), -1), conts], 1)
    with torch.no_grad():
        logp = F.log_softmax(model(seqs[:, :-1]).float() / temperature, -1)
    P = prompt.numel()
    lp = logp[:, P - 1:].gather(-1, conts[..., None]).squeeze(-1).sum(1)
    return conts, lp.exp()


def sequence_counts(new_tokens, V):
    n_new = new_tokens.size(1)
    code = (new_tokens * V ** torch.arange(n_new - 1, -1, -1)).sum(1)
    return torch.bincount(code, minlength=V ** n_new)


def broken_rejection_sample(bug):
    """Copies of the sampler with one planted bug each, to prove the tests can fail."""
    def sampler(target_probs, draft_probs, draft_tokens, generator=None):
        B, gamma = draft_tokens.shape
        p, q = target_probs.float(), draft_probs.float()
        p_d = p[:, :gamma].gather(-1, draft_tokens[..., None]).squeeze(-1)
        q_d = q.gather(-1, draft_tokens[..., None]).squeeze(-1)
        u = torch.rand(B, gamma, device=p.device, generator=generator)
        accepted = u * p_d < q_d if bug == "accept_q_over_p" else u * q_d < p_d
        n = accepted.long().cumprod(1).sum(1)
        rows = torch.arange(B, device=p.device)
        p_n, q_n = p[rows, n], F.pad(q, (0, 0, 0, 1))[rows, n]
        if bug == "bonus_wrong_row":
            p_n = torch.where((n == gamma)[:, None], p[rows, gamma - 1], p_n)
        residual = p_n if bug == "resample_from_p" else (p_n - q_n).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
        new = bebop.sample(residual, generator)
        tokens = F.pad(draft_tokens, (0, 1))
        tokens.scatter_(1, n[:, None], new[:, None])
        return n, tokens
    return sampler


BUGS = ("accept_q_over_p", "resample_from_p", "bonus_wrong_row")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# Where decoding runs: eagerly; through the CUDA-graph machinery with a stand-in for the capture (any
# machine); with real CUDA graphs (GPU only).
WHERE = ["eager", "stand_in", pytest.param("cuda", marks=needs_cuda)]


def stand_in_graphs(monkeypatch, replay_of=lambda step: step):
    """CUDA graphs without a GPU: a CudaGraphs can be made for a CPU model, decoding through it goes
    through StaticDecoder (static caches and state reused across calls, the graph's own reseeded
    generator, the warm-up and its restore, the rebinding check), and the 'replay' runs the captured step
    eagerly (through replay_of(step), which may watch it). Only the capture itself is not exercised."""
    captures = []

    def capture(step, tensors, generator):
        bebop.warm_up(step, tensors, generator)
        captures.append(step)
        return replay_of(step)
    monkeypatch.setattr(bebop, "cuda_graphs_supported", lambda device: True)
    monkeypatch.setattr(bebop, "capture_cuda_graph", capture)
    return captures


def decoding_on(where, model, monkeypatch):
    """(model, graphs argument) for decoding eagerly, through the stand-in, or with real CUDA graphs: a fresh
    CudaGraphs that insists on capturing (strict), so a capture failure fails the test."""
    if where == "stand_in":
        stand_in_graphs(monkeypatch)
        return model, bebop.CudaGraphs(model, strict=True)
    if where == "cuda":
        model = copy.deepcopy(model).cuda()
        return model, bebop.CudaGraphs(model, strict=True)
    return model, None


def train_mtp_briefly(model, steps, n_new=20, prompt_len=3, K=4, seed=0):
    """Fit the MTP layer to the model's own samples with the KL loss, so that drafts get accepted."""
    V = model.config.vocab_size
    opt = torch.optim.AdamW(model.mtp.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        seq = bebop.generate(model, torch.randint(0, V, (32, prompt_len), generator=g), n_new, generator=g).tokens
        target, draft = model.mtp_logits(seq, K)
        T = seq.size(1)
        mask = torch.arange(T)[None, :] + torch.arange(1, K + 1)[:, None] <= T - 1   # (K, T)
        tgt = torch.stack([F.pad(target[:, k:], (0, 0, 0, k)) for k in range(1, K + 1)], 1)
        chains = lambda x: x.transpose(1, 2).flatten(0, 1)
        loss = bebop.mtp_loss("kl", chains(draft), chains(tgt), None, chains(mask.expand(len(seq), -1, -1)))
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


def naive_greedy(model, prompt, n_new, eos=None):
    seq = prompt.clone()
    for _ in range(n_new):
        with torch.no_grad():
            seq = torch.cat([seq, model(seq[None])[0, -1].argmax()[None]])
    new = seq[prompt.numel():]
    if eos is not None:
        hit = (new == eos).nonzero()
        if len(hit):
            new[hit[0, 0] + 1:] = eos
    return new


RAGGED = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([5, 6, 7, 0, 2]), torch.tensor([3, 3])]


@pytest.fixture(scope="module")
def task():
    return bebop.DigitSumTask()


def small_task_model(task, seed=0):
    torch.manual_seed(seed)
    cfg = bebop.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=task.seq_len + 5)
    return bebop.GPT(cfg)


# A fixed draft length: with "auto" the draft lengths, hence the random streams, follow measured timings, so two
# runs are exact but not bit-identical (test_resume_with_auto_draft_length covers auto with fixed costs).
TINY_RUN = ["--preset", "tiny", "--sft-steps", "20", "--mtp-steps", "8", "--rl-steps", "6", "--rl-prompts", "4",
            "--group-size", "4", "--gamma", "3"]


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- 2. model


def test_mtp_chain_mask_matches_design():
    m = bebop.mtp_chain_mask(4, 3)
    assert m.shape == (4, 12)
    assert m[2, :4].tolist() == [True, True, True, False]       # depth-1 entries of anchors <= t
    assert m[2, 4:8].tolist() == [False, False, True, False]    # own chain at depth 2
    assert m[2, 8:].tolist() == [False, False, True, False]     # own chain at depth 3


# ----------------------------------------------------------------------------- 3. losses (Eq. 10, 11, 13) and the memory-lean TV


def plain_tv(z, p):
    return 1 - torch.minimum(p, F.softmax(z, -1)).sum(-1)


def lean_tv_against_autograd(chunk=5):
    """Max differences of the memory-lean TV (value, and gradients wrt the logits, the hidden states and
    the head's weight on the fused path) from plain autograd of the formula, in float64."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(37, 11, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(37, 6, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
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
    assert lean_tv_against_autograd(chunk=5) < 1e-10      # chunked: 5 rows at a time
    assert lean_tv_against_autograd(chunk=1000) < 1e-10   # one chunk
    g = torch.Generator().manual_seed(1)
    z = torch.randn(9, 13, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(13, 4, generator=g, dtype=torch.float64, requires_grad=True)
    p = F.softmax(torch.randn(9, 13, generator=g, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(lambda a: bebop.tv_distance(a, p, chunk=4), (z,))
    assert torch.autograd.gradcheck(lambda a, b: bebop.tv_distance(a, p, head_weight=b, chunk=4), (x, W))
    # Prop. 3: |dL/dz_j| <= q_j
    (grad,) = torch.autograd.grad(bebop.tv_distance(z, p).sum(), z)
    assert (grad.abs() <= F.softmax(z, -1) + 1e-12).all()


def test_packed_bits_round_trip():
    mask = torch.rand(7, 21, generator=torch.Generator().manual_seed(0)) > 0.5
    bits = bebop.pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.shape == (7, 3)
    assert torch.equal(bebop.unpack_bits(bits, 21), mask)


def test_memory_lean_tv_gradient_check_can_fail(monkeypatch):
    """A planted error in bebop's own backward (the indicator 1[q > p] flipped) is caught by the same
    comparison with autograd."""
    assert lean_tv_against_autograd() < 1e-10
    unpack = bebop.unpack_bits
    monkeypatch.setattr(bebop, "unpack_bits", lambda bits, V: ~unpack(bits, V))
    assert lean_tv_against_autograd() > 1e-3


def test_e2e_tv_on_hand_made_chains():
    # Chain 1: step 1 p=(1,0), q=(.5,.5): d=.5; step 2 p=q: d=0. L = 1 - (.5 + .5*1)/2 = .5
    # Chain 2: same steps but only step 1 exists (masked prefix): L = 1 - .5/1 = .5
    # Chain 3: p=q at both steps: L = 0.
    p = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]] * 2 + [[[0.3, 0.7], [0.9, 0.1]]])
    q = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]] * 2 + [[[0.3, 0.7], [0.9, 0.1]]])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    loss = bebop.e2e_tv_loss(q.log(), p, mask)
    torch.testing.assert_close(loss, torch.tensor((0.5 + 0.5 + 0.0) / 3))
    # random chains against 1 - mean_j prod_{i<=j} (1 - d_i)
    g = torch.Generator().manual_seed(1)
    z, pr = torch.randn(4, 5, 7, generator=g), F.softmax(torch.randn(4, 5, 7, generator=g), -1)
    d = plain_tv(z, pr)
    expected = (1 - torch.cumprod(1 - d, 1).mean(1)).mean()
    torch.testing.assert_close(bebop.e2e_tv_loss(z, pr), expected)


@pytest.mark.parametrize("kind", bebop.MTP_LOSSES)
def test_each_mtp_loss_decreases_and_never_reaches_the_backbone(task, kind):
    model = small_task_model(task)
    g = torch.Generator().manual_seed(0)
    seq, lengths = task.sft_batch(16, g)
    opt = torch.optim.AdamW(model.mtp.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = bebop.mtp_training_loss(model, kind, seq, lengths, 3)
        opt.zero_grad()
        loss.backward()
        if not losses:   # the first backward: nothing outside the MTP layer got a gradient
            outside = [n for n, p in model.named_parameters() if not n.startswith("mtp.") and p.grad is not None]
            assert outside == [], outside
            assert all(p.grad is not None for p in model.mtp.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_unknown_mtp_loss_is_refused():
    with pytest.raises(ValueError, match="unknown MTP loss"):
        bebop.mtp_loss("mse", torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), None, torch.ones(1, 1))


# ----------------------------------------------------------------------------- 4. sampling: rejection_sample


def make_case(kind, gamma, V=6, seed=0):
    """Target rows p (gamma+1, V) and draft rows q (gamma, V) of one kind."""
    g = torch.Generator().manual_seed(seed)
    dirichlet = lambda n: (lambda x: x / x.sum(-1, keepdim=True))(torch._standard_gamma(torch.ones(n, V), generator=g))
    p = dirichlet(gamma + 1)
    if kind == "random":
        q = dirichlet(gamma)
    elif kind == "sparse":   # p and q each live on part of the vocabulary, overlapping partly
        p = p * (torch.arange(V) < V - 2)
        p = p / p.sum(-1, keepdim=True)
        q = dirichlet(gamma) * (torch.arange(V) >= 2)
        q = q / q.sum(-1, keepdim=True)
    elif kind == "one_hot":  # the TO rule: a one-hot draft at argmax of some draft law
        q = F.one_hot(dirichlet(gamma).argmax(-1), V).float()
    elif kind == "identical":
        q = p[:gamma].clone()
    return p, q


def emitted_pvalues(sampler, p, q, N=200_000, seed=1):
    """For each position i, the chi-square p-value of the tokens emitted there against p_i.

    Drafts at different positions are drawn independently from their q rows, so given that position i
    is emitted (drafts 1..i accepted), its token must be distributed as p_i exactly."""
    gamma, V = q.shape
    g = torch.Generator().manual_seed(seed)
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g) for j in range(gamma)], 1)
    n, tokens = sampler(p.expand(N, -1, -1), q.expand(N, -1, -1), drafts, generator=g)
    assert ((tokens[:, :gamma] == drafts) | (torch.arange(gamma) >= n[:, None])).all()
    pvals = []
    for i in range(gamma + 1):
        emitted = n >= i
        pvals.append(chi2_pvalue(torch.bincount(tokens[emitted, i], minlength=V), p[i]))
    return pvals, n


@pytest.mark.parametrize("kind", ["random", "sparse", "one_hot", "identical"])
@pytest.mark.parametrize("gamma", [1, 2, 3, 4])
def test_rejection_sample_is_exact(kind, gamma):
    p, q = make_case(kind, gamma, seed=gamma)
    pvals, n = emitted_pvalues(bebop.rejection_sample, p, q)
    assert min(pvals) > P_MIN, pvals
    # First-step acceptance is sum_v min(p, q) = 1 - d_TV (Eq. 2); within 5 binomial standard errors.
    alpha = torch.minimum(p[0], q[0]).sum().item()
    rate = (n >= 1).double().mean().item()
    assert abs(rate - alpha) <= 5 * math.sqrt(max(alpha * (1 - alpha), 1e-12) / n.numel()) + 1e-9


@pytest.mark.parametrize("bug", BUGS)
def test_exactness_test_rejects_broken_samplers(bug):
    p, q = make_case("random", 3, seed=3)
    pvals, _ = emitted_pvalues(broken_rejection_sample(bug), p, q)
    assert min(pvals) < P_BROKEN, (bug, pvals)
    # and the uncorrupted copy passes the very same test
    assert min(emitted_pvalues(broken_rejection_sample(None), p, q)[0]) > P_MIN


def first_step_acceptance_z(sampler, greedy, N=200_000, seed=5):
    """z-scores of the counted first-step acceptance of `sampler` against Eq. 2 (RS: sum min(p, q)) or
    Eq. 1 (TO: p(argmax q)), for a few random (p, q) pairs; N verifications each."""
    g = torch.Generator().manual_seed(seed)
    zs = []
    for case in range(4):
        p = F.softmax(torch.randn(2, 7, generator=g) * 1.5, -1)
        q = F.softmax(torch.randn(1, 7, generator=g) * 1.5, -1)
        if greedy:
            d = q.argmax(-1).expand(N, 1)
            q_used, alpha = bebop.one_hot(d, 7), p[0, q.argmax()].item()
        else:
            d = bebop.sample(q.expand(N, -1), g)[:, None]
            q_used, alpha = q.expand(N, -1, -1), torch.minimum(p[0], q[0]).sum().item()
        n, _ = sampler(p.expand(N, -1, -1), q_used, d, g)
        rate = (n >= 1).double().mean().item()
        zs.append((rate - alpha) / math.sqrt(alpha * (1 - alpha) / N))
    return zs


@pytest.mark.parametrize("greedy", [False, True])
def test_acceptance_rate_is_eq2_for_rs_and_eq1_for_to(greedy):
    """The identities behind App. E: counted acceptance equals 1 - d_TV(p, q) (RS) and p(argmax q) (TO);
    the same test rejects a sampler that accepts with q/p instead of p/q."""
    assert max(abs(z) for z in first_step_acceptance_z(bebop.rejection_sample, greedy)) < 4.5
    broken = first_step_acceptance_z(broken_rejection_sample("accept_q_over_p"), greedy)
    assert max(abs(z) for z in broken) > 10


class OpCounter(TorchDispatchMode):
    """The name of every tensor op dispatched inside the block, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_rejection_sample_shapes_and_no_python_loop_over_rows():
    """Shapes and ranges; and the same ops for 7 rows as for 700 (a loop over rows would add ops per row),
    which the same count tells apart from a sampler that loops."""
    p, q = make_case("random", 3)
    per_row = lambda p, q, d, generator=None: [bebop.rejection_sample(p[i:i + 1], q[i:i + 1], d[i:i + 1], generator)
                                               for i in range(d.size(0))]
    ops = {}
    for name, sampler in (("batched", bebop.rejection_sample), ("looped", per_row)):
        for B in (7, 700):
            d = torch.multinomial(q, B, replacement=True, generator=torch.Generator().manual_seed(B)).T
            with OpCounter() as count:
                out = sampler(p.expand(B, -1, -1), q.expand(B, -1, -1), d)
            ops[name, B] = count.ops
            if name == "batched":
                n, tokens = out
                assert n.shape == (B,) and tokens.shape == (B, 4) and n.dtype == torch.long
                assert ((0 <= n) & (n <= 3)).all()
    assert ops["batched", 7] == ops["batched", 700]
    assert len(ops["looped", 700]) > len(ops["looped", 7]), "the op count cannot see a loop over rows"


@pytest.mark.parametrize("args,match", [
    (((2, 4, 6), (2, 3, 6), (2, 2)), r"expected target_probs \(B, gamma\+1, V\) = \(2, 3, V\)"),
    (((2, 4, 6), (2, 3, 5), (2, 3)), "with one V"),
    (((2, 4, 6), (2, 3, 6), (2, 3, 1)), r"draft_tokens must be \(B, gamma\) integer ids"),
])
def test_rejection_sample_checks_shapes_up_front(args, match):
    p, q, d = torch.rand(args[0]), torch.rand(args[1]), torch.zeros(args[2], dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        bebop.rejection_sample(p, q, d)
    with pytest.raises(ValueError, match="integer ids"):
        bebop.rejection_sample(torch.rand(2, 4, 6), torch.rand(2, 3, 6), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="floating point probabilities"):
        bebop.rejection_sample(torch.ones(2, 4, 6, dtype=torch.long), torch.rand(2, 3, 6), torch.zeros(2, 3).long())


def test_check_distributions_and_the_debug_mode(drafted_model, monkeypatch):
    p = F.softmax(torch.randn(3, 4, 6), -1)
    bebop.check_distributions(p, "p")
    for bad in (torch.randn(3, 4, 6), p * 2, torch.zeros(3, 4, 6), p.masked_fill(p > 0.3, float("nan"))):
        with pytest.raises(ValueError, match="not a probability distribution"):
            bebop.check_distributions(bad, "p")
    # Logits passed where probabilities belong are silent without debug, caught with it.
    original = bebop.probs_from_logits
    monkeypatch.setattr(bebop, "probs_from_logits", lambda logits, t: logits.float() if logits.size(0) and t else original(logits, t))
    prompt = torch.tensor([[1, 2, 3]])
    bebop.speculative_generate(drafted_model, prompt, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="draft_probs row .* is not a probability distribution"):
        bebop.speculative_generate(drafted_model, prompt, 8, generator=torch.Generator().manual_seed(0), debug=True)


# ----------------------------------------------------------------------------- 5. generation: exact sequence laws


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("gamma,draft,temperature", [(2, "sample", 1.0), (3, "greedy", 0.7)])
def test_speculative_sequence_law_is_exact(exact_model, gamma, draft, temperature, where, monkeypatch):
    """The joint law of 4 new tokens (625 outcomes) against exact enumeration, 60,000 rows in one batch,
    eagerly and replayed as a CUDA graph (real on a GPU, a stand-in elsewhere)."""
    V, n_new, N = exact_model.config.vocab_size, 4, 60_000
    prompt = torch.tensor([[1, 3, 0]])
    conts, law = exact_sequence_law(exact_model, prompt, n_new, temperature)
    model, graphs = decoding_on(where, exact_model, monkeypatch)
    gen = torch.Generator(model.lm_head.weight.device).manual_seed(7)
    out = bebop.speculative_generate(model, prompt.expand(N, -1), n_new, gamma=gamma, draft=draft,
                                     temperature=temperature, generator=gen, graphs=graphs)
    stats = out.stats
    assert stats["acceptance"][0] < 0.95, "no rejections: the test would not exercise corrections"
    assert stats["acceptance"][-1] * stats["drafts_reached"][-1] > 100, "no bonus tokens were drawn"
    assert chi2_pvalue(sequence_counts(out.new_tokens.cpu(), V), law) > P_MIN


@pytest.mark.parametrize("schedule,draft,temperature", [([0, 3, 1], "sample", 1.0), ([2, 0, 1], "greedy", 0.7)])
def test_sequence_law_is_exact_under_a_switching_draft_length(exact_model, schedule, draft, temperature, monkeypatch):
    """gamma changes every round (0, a plain step that keeps the MTP cache current, included): the joint
    law of 4 new tokens is still exact; the same test rejects a broken sampler on the same schedule."""
    V, n_new, N = exact_model.config.vocab_size, 4, 60_000
    prompt = torch.tensor([[1, 3, 0]])
    _, law = exact_sequence_law(exact_model, prompt, n_new, temperature)
    run = lambda: bebop.speculative_generate(exact_model, prompt.expand(N, -1), n_new, gamma=schedule, draft=draft,
                                             temperature=temperature, generator=torch.Generator().manual_seed(7))
    out = run()
    assert all(out.stats["gamma_rounds"][g] > 0 for g in schedule), out.stats["gamma_rounds"]
    assert out.stats["acceptance"][0] < 0.95
    assert chi2_pvalue(sequence_counts(out.new_tokens, V), law) > P_MIN
    monkeypatch.setattr(bebop, "rejection_sample", broken_rejection_sample("resample_from_p"))
    assert chi2_pvalue(sequence_counts(run().new_tokens, V), law) < P_BROKEN


@pytest.mark.parametrize("where", WHERE)
def test_sequence_law_test_rejects_a_broken_sampler(exact_model, where, monkeypatch):
    V, n_new, N = exact_model.config.vocab_size, 4, 60_000
    prompt = torch.tensor([[1, 3, 0]])
    _, law = exact_sequence_law(exact_model, prompt, n_new)
    model, graphs = decoding_on(where, exact_model, monkeypatch)   # fresh static decoders: captures the bug
    monkeypatch.setattr(bebop, "rejection_sample", broken_rejection_sample("resample_from_p"))
    out = bebop.speculative_generate(model, prompt.expand(N, -1), n_new, gamma=2, graphs=graphs,
                                     generator=torch.Generator(model.lm_head.weight.device).manual_seed(7))
    assert chi2_pvalue(sequence_counts(out.new_tokens.cpu(), V), law) < P_BROKEN


@pytest.mark.parametrize("where", WHERE)
def test_generate_sequence_law_is_exact(where, monkeypatch):
    V, n_new, N = 5, 4, 60_000
    prompt = torch.tensor([[2, 2]])
    _, law = exact_sequence_law(tiny_model(), prompt, n_new)
    model, graphs = decoding_on(where, tiny_model(), monkeypatch)
    out = bebop.generate(model, prompt.expand(N, -1), n_new, graphs=graphs,
                         generator=torch.Generator(model.lm_head.weight.device).manual_seed(3))
    assert chi2_pvalue(sequence_counts(out.new_tokens.cpu(), V), law) > P_MIN


# ----------------------------------------------------------------------------- 5. generation: greedy, cache, drafts, statistics


@pytest.mark.parametrize("gamma", [1, 2, 3, 4])
@pytest.mark.parametrize("draft", ["sample", "greedy"])
def test_greedy_speculative_matches_naive_argmax(drafted_model, gamma, draft):
    out = bebop.speculative_generate(drafted_model, RAGGED, 20, gamma=gamma, temperature=0, draft=draft)
    for b, prompt in enumerate(RAGGED):
        assert torch.equal(out.new_tokens[b], naive_greedy(drafted_model, prompt, 20))
        assert torch.equal(out.tokens[b], torch.cat([prompt, out.new_tokens[b]]))
    assert out.stats["accept_length"] > 1.5, "drafts were hardly accepted: the test would be weak"
    ar = bebop.generate(drafted_model, RAGGED, 20, temperature=0)
    assert torch.equal(ar.new_tokens, out.new_tokens)


@pytest.mark.parametrize("gamma", [[0, 1, 4, 2, 0, 3, 5], "auto"])
@pytest.mark.parametrize("draft", ["sample", "greedy"])
def test_greedy_with_switching_or_auto_draft_length_matches_naive_argmax(drafted_model, gamma, draft):
    chooser = bebop.DraftLengthChooser(5)
    for _ in range(2):   # "auto": the second call uses the costs profiled by the first
        out = bebop.speculative_generate(drafted_model, RAGGED, 20, gamma=gamma, temperature=0, draft=draft,
                                         chooser=chooser, eos=6)
        for b, prompt in enumerate(RAGGED):
            assert torch.equal(out.new_tokens[b], naive_greedy(drafted_model, prompt, 20, eos=6))
    if gamma != "auto":
        assert set(g for g, n in out.stats["gamma_rounds"].items() if n) == set(gamma)


def test_a_gamma_zero_round_is_a_plain_step_that_keeps_drafting_resumable(drafted_model):
    """A gamma-0 round emits the plain sample (the same as generate at temperature 0) and leaves g^1 equal
    to what a speculative round would have produced: drafting resumes on a current MTP cache."""
    prompt = torch.tensor([[1, 2, 3]] * 2)
    zero = bebop.speculative_generate(drafted_model, prompt, 10, gamma=[0], temperature=0)
    assert torch.equal(zero.new_tokens, bebop.generate(drafted_model, prompt, 10, temperature=0).new_tokens)
    assert zero.stats["accept_length"] == 1.0 and zero.stats["gamma_rounds"][0] == 9
    # After gamma-0 rounds, drafts are as good as ever: the q used online equals the training path's q.
    trace = []
    out = bebop.speculative_generate(drafted_model, prompt, 16, gamma=[0, 0, 3], temperature=1.0, trace=trace,
                                     generator=torch.Generator().manual_seed(0))
    _, draft_logits = drafted_model.mtp_logits(out.tokens, 3)
    checked = 0
    for rd in trace:
        if rd["draft_logits"].size(1) == 0:
            continue
        for b in range(2):
            if rd["active"][b]:
                L = int(rd["L"][b])
                torch.testing.assert_close(rd["draft_logits"][b, 0], draft_logits[b, 0, L - 1], atol=1e-5, rtol=0)
                checked += 1
    assert checked >= 4


def test_greedy_eos_inside_an_accepted_run(drafted_model):
    """Pick as EOS a token that some row emits as an accepted draft with more accepted drafts after it."""
    trace = []
    out = bebop.speculative_generate(drafted_model, RAGGED, 20, gamma=3, temperature=0, trace=trace)
    choice = None
    for rd in trace:
        for b in range(len(RAGGED)):
            if rd["active"][b] and rd["n"][b] >= 2:
                v = int(rd["tokens"][b, 0])
                start = int(rd["L"][b]) + 1 - RAGGED[b].numel()   # index of this token among new tokens
                if start < 20 and v not in out.new_tokens[b, :start].tolist():
                    choice = (b, v)
                    break
        if choice:
            break
    assert choice is not None, "no accepted run to place EOS in"
    b, eos = choice
    out = bebop.speculative_generate(drafted_model, RAGGED, 20, gamma=3, temperature=0, eos=eos)
    for r, prompt in enumerate(RAGGED):
        assert torch.equal(out.new_tokens[r], naive_greedy(drafted_model, prompt, 20, eos))
    first = (out.new_tokens[b] == eos).nonzero()[0, 0]
    assert out.mask[b, :first + 1].all() and not out.mask[b, first + 1:].any()
    assert (out.logprobs[b, first + 1:] == 0).all()


def test_decoding_stops_rows_at_their_end_mark(drafted_model):
    """A row that emitted EOS takes no further part; the batch stops when its last row ends."""
    prompt, eos = torch.tensor([[1, 2, 3]]).expand(16, -1), 6
    out = bebop.generate(drafted_model, prompt, 30, eos=eos, generator=torch.Generator().manual_seed(0))
    lengths = out.mask.sum(1)
    assert (lengths < 30).all(), "some row never emitted EOS: pick another seed"
    assert out.stats["target_forwards"] == lengths.max()       # one forward per token of the longest row
    trace = []
    out = bebop.speculative_generate(drafted_model, prompt, 30, eos=eos, trace=trace,
                                     generator=torch.Generator().manual_seed(0))
    assert (out.mask.sum(1) < 30).all()
    ended_early = 0
    for now, later in zip(trace, trace[1:]):
        ended = now["active"] & ((now["tokens"] == eos) & (torch.arange(4) <= now["n"][:, None])).any(1)
        assert not (ended & later["active"]).any(), "a row went on after its EOS"
        ended_early += int(ended.sum())
    assert ended_early > 0, "no row ended before the last round: the check above tested nothing"
    assert trace[-1]["active"].any() and len(trace) == out.stats["rounds"]


def hand_count_stats(trace, max_new_tokens, eos, gamma):
    """Acceptance statistics counted by hand from a trace, one row-round at a time in plain Python: walk
    each round's n+1 tokens, stop at the cap and after the end mark, and count what the row keeps."""
    hist, reached, accepted = [0] * (gamma + 1), [0] * gamma, [0] * gamma
    count = {}
    for rd in trace:
        for b in range(len(rd["n"])):
            if not rd["active"][b]:
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
def test_acceptance_statistics_count_only_kept_tokens(drafted_model, draft, eos, max_new):
    """sum_i (i+1) hist[i] is every kept token but the prefill's first; accept_length is that over the
    row-rounds; alpha_j counts a draft only where its token would be kept (end marks inside accepted runs,
    the cap cutting a round short). Checked against a hand count from the trace."""
    trace, gamma, B = [], 3, 24
    prompt = torch.randint(0, 8, (B, 3), generator=torch.Generator().manual_seed(1))
    out = bebop.speculative_generate(drafted_model, prompt, max_new, gamma=gamma, draft=draft, eos=eos, trace=trace,
                                     generator=torch.Generator().manual_seed(2))
    st = out.stats
    hist, reached, accepted = hand_count_stats(trace, max_new, eos, gamma)
    assert st["accept_histogram"] == hist
    assert st["drafts_reached"] == reached and st["drafts_accepted"] == accepted
    kept = sum((i + 1) * h for i, h in enumerate(st["accept_histogram"]))
    assert kept == int(out.mask.sum()) - B
    assert st["accept_length"] == pytest.approx(kept / sum(st["accept_histogram"]))
    assert st["acceptance"] == pytest.approx([a / r for a, r in zip(accepted, reached)])
    # The case must exercise what it claims: rounds cut short, and (with an end mark) drafts past it.
    verified = sum(int(rd["active"].sum()) for rd in trace) * gamma
    assert sum(reached) < verified, "no draft was discarded: the case tests nothing"
    if eos is not None:
        after_end = any(rd["active"][b] and (rd["tokens"][b, :int(rd["n"][b])] == eos).any()
                        for rd in trace for b in range(B))
        assert after_end, "no end mark inside an accepted run"


def test_cache_logits_logprobs_and_drafts_match_the_training_path(drafted_model):
    """After rejections and rollbacks: the verify logits equal full-forward logits, the returned logprobs
    equal the full-forward log-softmax, and every draft row q_k used online equals the training path's
    q_k at the same anchor and depth, all in fp32 to 1e-5."""
    model, gamma, n_new = drafted_model, 3, 24
    trace = []
    out = bebop.speculative_generate(model, RAGGED, n_new, gamma=gamma, temperature=1.0,
                                     generator=torch.Generator().manual_seed(0), trace=trace)
    assert any((rd["n"] < gamma).any() for rd in trace), "no rejection happened"
    checked_p = checked_q = 0
    for b, prompt in enumerate(RAGGED):
        seq = out.tokens[b][None]
        P = prompt.numel()
        with torch.no_grad():
            full_logits, draft_logits = model.mtp_logits(seq, gamma)
        logp = F.log_softmax(full_logits[0, P - 1:-1], -1).gather(-1, seq[0, P:, None]).squeeze(-1)
        torch.testing.assert_close(out.logprobs[b], logp, atol=1e-5, rtol=0)
        for rd in trace:
            if not rd["active"][b]:
                continue
            L, n = int(rd["L"][b]), int(rd["n"][b])
            for k in range(1, gamma + 1):
                if k - 1 > n or L + k - 1 >= seq.size(1):   # draft k reached only if 1..k-1 accepted
                    break
                torch.testing.assert_close(rd["target_logits"][b, k - 1], full_logits[0, L + k - 1], atol=1e-5, rtol=0)
                torch.testing.assert_close(rd["draft_logits"][b, k - 1], draft_logits[0, k - 1, L - 1], atol=1e-5, rtol=0)
                checked_p += 1
                checked_q += 1
    assert checked_p > 50 and checked_q > 50


def test_logprobs_are_at_the_sampling_temperature(drafted_model):
    for fn in (bebop.generate, bebop.speculative_generate):
        out = fn(drafted_model, RAGGED[:1], 10, temperature=0.7, generator=torch.Generator().manual_seed(0))
        seq = out.tokens[0]
        with torch.no_grad():
            logits = drafted_model(seq[None, :-1])[0, 2:]
        expected = F.log_softmax(logits / 0.7, -1).gather(-1, seq[3:, None]).squeeze(-1)
        torch.testing.assert_close(out.logprobs[0], expected, atol=1e-5, rtol=0)


def test_drafts_are_drawn_at_the_sampling_temperature(drafted_model):
    """q must be the MTP law at the same temperature as p, else acceptance drops (exactness would not
    catch it: rejection sampling is exact for any q the drafts were really drawn from)."""
    trace = []
    out = bebop.speculative_generate(drafted_model, RAGGED[:1], 12, gamma=3, temperature=0.5,
                                     generator=torch.Generator().manual_seed(0), trace=trace)
    with torch.no_grad():
        _, draft_logits = drafted_model.mtp_logits(out.tokens[0][None], 1)
    for rd in trace:
        L = int(rd["L"][0])
        if rd["active"][0]:
            expected = F.softmax(draft_logits[0, 0, L - 1] / 0.5, -1)
            torch.testing.assert_close(rd["draft_probs"][0, 0], expected, atol=1e-5, rtol=0)


def test_draft_consistency_test_can_fail(drafted_model):
    """The training path with a shifted anchor does not match the online drafts: the check has teeth."""
    trace = []
    out = bebop.speculative_generate(drafted_model, RAGGED[:1], 12, gamma=3,
                                     generator=torch.Generator().manual_seed(0), trace=trace)
    with torch.no_grad():
        _, draft_logits = drafted_model.mtp_logits(out.tokens[0][None], 3)
    rd = trace[1]
    L = int(rd["L"][0])
    assert not torch.allclose(rd["draft_logits"][0, 0], draft_logits[0, 0, L - 2], atol=1e-5)


# ----------------------------------------------------------------------------- 5. generation: bad input


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(gamma=0), ValueError, "gamma must be an integer in 1..5"),
    (dict(gamma=True), ValueError, "gamma must be an integer in 1..5"),
    (dict(gamma=6), ValueError, "depth the MTP layer was trained to"),
    (dict(gamma=2.0), ValueError, "gamma must be an integer"),
    (dict(temperature=-0.5), ValueError, "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite number >= 0"),
    (dict(draft="beam"), ValueError, "draft rule"),
    (dict(eos=99), ValueError, "eos must be None or an integer token id"),
    (dict(eos=1.5), ValueError, "eos must be None or an integer token id"),
    (dict(eos=True), ValueError, "eos must be None or an integer token id"),
    (dict(generator="seed"), TypeError, "generator must be a torch.Generator"),
    (dict(trace=()), TypeError, "trace must be a list"),
])
def test_speculative_bad_arguments(kwargs, error, match):
    model = tiny_model()
    with pytest.raises(error, match=match):
        bebop.speculative_generate(model, torch.tensor([[1, 2]]), 3, **kwargs)
    if "gamma" not in kwargs and "draft" not in kwargs and "trace" not in kwargs:   # plain decoding checks alike
        with pytest.raises(error, match=match):
            bebop.generate(model, torch.tensor([[1, 2]]), 3, **kwargs)


@pytest.mark.parametrize("prompt,n_new,error,match", [
    (torch.tensor([[1.0, 2.0]]), 3, TypeError, "prompt token ids must be integers, got dtype torch.float32"),
    (torch.tensor([[True, False]]), 3, TypeError, "prompt token ids must be integers"),
    ([[1.5, 2.0]], 3, TypeError, "prompt token ids must be integers"),
    (torch.tensor([[1, 2]]), 3.0, TypeError, "max_new_tokens must be an integer"),
    (torch.tensor([[1, 2]]), True, TypeError, "max_new_tokens must be an integer"),
])
def test_bad_prompt_types_and_lengths(prompt, n_new, error, match):
    model = tiny_model()
    for fn in (bebop.generate, bebop.speculative_generate):
        with pytest.raises(error, match=match):
            fn(model, prompt, n_new)


def test_numpy_integers_are_integers_and_one_new_token_has_sensible_stats():
    import numpy as np
    model = tiny_model()
    out = bebop.speculative_generate(model, np.array([[1, 2]]).tolist(), np.int64(3), gamma=np.int64(2), eos=np.int64(4),
                                     generator=torch.Generator().manual_seed(0))
    assert out.new_tokens.shape == (1, 3)
    one = bebop.speculative_generate(model, torch.tensor([[1, 2]] * 3), 1, generator=torch.Generator().manual_seed(0))
    assert one.stats["accept_length"] == 1.0 and one.stats["rounds"] == 0 and one.stats["target_forwards"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_a_generator_on_another_device_is_refused():
    with pytest.raises(ValueError, match="generator lives on cuda"):
        bebop.generate(tiny_model(), torch.tensor([[1, 2]]), 3, generator=torch.Generator("cuda"))


@pytest.mark.parametrize("prompt,n_new,match", [
    (torch.zeros(1, 17, dtype=torch.long), 1, "exceeds block_size"),
    (torch.zeros(1, 10, dtype=torch.long), 5, "exceeds block_size"),
    ([torch.tensor([], dtype=torch.long)], 3, "empty prompt"),
    (torch.tensor([[1, 9]]), 3, "token ids"),
    (torch.tensor([[1, -1]]), 3, "token ids"),
    (torch.tensor([[1, 2]]), 0, "max_new_tokens"),
])
def test_bad_prompts(prompt, n_new, match):
    model = tiny_model()
    for fn in (bebop.generate, bebop.speculative_generate):
        if fn is bebop.generate and "block_size" in match and n_new == 5:
            continue  # 10 + 5 fits plain decoding; only the speculative lookahead overflows
        with pytest.raises(ValueError, match=match):
            fn(model, prompt, n_new)


def test_reproducible_with_a_generator():
    model = tiny_model()
    prompt = torch.tensor([[1, 3, 0]]).expand(8, -1)
    a = bebop.speculative_generate(model, prompt, 6, generator=torch.Generator().manual_seed(5))
    b = bebop.speculative_generate(model, prompt, 6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)


# ----------------------------------------------------------------------------- 6-7. toy task and the RL algorithm; pieces that lift out


def test_reward_on_hand_written_answers(task):
    answers = ["12345.", "9990.", "12346.", "1234.", "12a", "123456.", "..", "5.", "0000000."]
    S = torch.tensor([15, 27, 15, 10, 15, 15, 0, 5, 0])
    N = torch.tensor([5, 4, 5, 5, 5, 5, 0, 1, 3])
    toks = [bebop.encode(a.replace("a", "S")) for a in answers]
    width = max(len(t) for t in toks) + 2
    tokens = torch.stack([F.pad(t, (0, width - len(t)), value=bebop.EOS) for t in toks])
    r, correct = task.reward(tokens, S, N)
    assert correct.tolist() == [True, True, False, False, False, False, True, True, False]
    assert r[0] == 1 and r[1] == 1
    assert r[2] == pytest.approx(0.5 + 0.5 * 0.9)     # right length, sum off by 1
    assert r[3] == pytest.approx(0.5)                  # wrong length, sum 10 = S
    assert r[4] == 0                                   # not well formed
    assert r[5] == pytest.approx(0.5 * 0.4)            # wrong length, sum 21: 6 away
    assert r[8] == pytest.approx(0.5 * 1.0)            # sum right, length wrong (7 vs 3)


def test_task_prompts_and_style(task):
    g = torch.Generator().manual_seed(0)
    seq, lengths = task.sft_batch(64, g)
    text = bebop.decode(seq[0])
    assert text.startswith("S") and text[4] == "N" and text[7] == "="
    S, N = int(text[1:4]), int(text[5:7])
    answer = text[8:8 + N]
    assert sum(map(int, answer)) == S and text[8 + N] == "."
    r, correct = task.reward(seq[:, bebop.PROMPT_LEN:], *[torch.tensor(x) for x in zip(*[
        (int(bebop.decode(s)[1:4]), int(bebop.decode(s)[5:7])) for s in seq])])
    assert correct.all()                               # SFT data is always right
    # the style is peaked and uneven: per-context entropies of the Markov rows spread widely
    H = -(task.style * task.style.clamp(min=1e-12).log()).sum(-1)
    assert H.min() < 0.8 and H.max() > 1.6 and H.mean() < math.log(10) - 0.5


@pytest.fixture(scope="module")
def sft_policy(task, tmp_path_factory):
    """A tiny policy after a short SFT and MTP training, through the same stage functions main() uses."""
    tc = bebop.TrainConfig(preset="tiny", sft_steps=300, mtp_steps=20, batch_size=32, ckpt_every=10**9)
    cfg = bebop.build_config(tc, task)
    torch.manual_seed(0)
    model = bebop.GPT(cfg)
    run = bebop.Run(str(tmp_path_factory.mktemp("sft")), tc, cfg, resume=False)
    g = torch.Generator().manual_seed(0)
    bebop.train_sft(run, model, task, g, "cpu")
    bebop.train_mtp(run, model, task, g, "cpu")
    return model.eval(), cfg


def rollout_batch(model, task, seed, prompts=8, G=8, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    idx, S, N = (x.repeat_interleave(G, 0) for x in task.prompts(prompts, g))
    roll = bebop.speculative_generate(model, idx, task.max_new_tokens, generator=g, eos=bebop.EOS,
                                      temperature=temperature)
    return roll, task.reward(roll.new_tokens, S, N)[0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_equal_the_trainers(sft_policy, task, temperature):
    model, _ = sft_policy
    roll, _ = rollout_batch(model, task, 0, temperature=temperature)
    assert roll.stats["acceptance"][0] < 1.0
    logp, _ = bebop.policy_logprobs(model, roll.tokens, bebop.PROMPT_LEN, temperature)
    torch.testing.assert_close(logp * roll.mask, roll.logprobs, atol=1e-5, rtol=0)
    if temperature != 1.0:   # the check can fail: untempered trainer log-probs do not match
        untempered, _ = bebop.policy_logprobs(model, roll.tokens, bebop.PROMPT_LEN)
        assert not torch.allclose(untempered * roll.mask, roll.logprobs, atol=1e-3)


@pytest.mark.parametrize("sign", [1, -1])
def test_grpo_update_moves_logprobs_with_the_advantage(sft_policy, task, sign):
    """One small gradient step raises the log-probability of above-average samples of a group and
    lowers the others'; a planted sign error (sign = -1) shows up as the opposite correlation."""
    model = copy_model(sft_policy)
    roll, rewards = rollout_batch(model, task, 1)
    A = sign * bebop.group_advantages(rewards, 8)
    logp, _ = bebop.policy_logprobs(model, roll.tokens, bebop.PROMPT_LEN)
    params = bebop.backbone_parameters(model)
    grads = torch.autograd.grad(bebop.grpo_loss(logp, roll.logprobs, A, roll.mask), params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= 1e-2 * g
        new_logp, _ = bebop.policy_logprobs(model, roll.tokens, bebop.PROMPT_LEN)
    moved = ((new_logp - logp) * roll.mask).sum(1)
    corr = torch.corrcoef(torch.stack([moved, sign * A]))[0, 1]
    assert corr > 0.3 if sign == 1 else corr < -0.3


def copy_model(policy):
    model, cfg = policy
    clone = bebop.GPT(cfg)
    clone.load_state_dict(model.state_dict())
    return clone


def test_grpo_raises_held_out_reward(sft_policy, task, tmp_path):
    model = copy_model(sft_policy)
    tc = bebop.TrainConfig(preset="tiny", rl_steps=40, rl_lr=3e-4, rl_prompts=8, group_size=8, ckpt_every=10**9,
                           gamma=3)
    run = bebop.Run(str(tmp_path), tc, model.config, resume=False)
    held_out = task.prompts(256, torch.Generator().manual_seed(5))
    before, _ = bebop.evaluate(model, task, held_out, seed=0, gamma=3)
    bebop.train_grpo(run, model, task, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1), "cpu", {})
    after, _ = bebop.evaluate(model, task, held_out, seed=0, gamma=3)
    # a flipped advantage sign collapses the reward and a detached loss leaves it unchanged
    assert after > before + 0.02, (before, after)
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(log) == 40 and all(0 <= m["reward"] <= 1 and len(m["acceptance"]) == 3 for m in log)


# Each piece a reader may copy into another project, with the only bebop helpers it needs (module constants
# it reads are copied as values). The test runs them in a namespace holding nothing but torch, F and math.
LIFTABLE = {
    "rejection_sample": ["sample", "rejection_sample"],
    "tv_distance": ["pack_bits", "unpack_bits", "logits_of", "TVDistance", "tv_distance"],
    "e2e_tv_loss": ["pack_bits", "unpack_bits", "logits_of", "TVDistance", "tv_distance", "e2e_tv_loss"],
    "mtp_loss": ["pack_bits", "unpack_bits", "logits_of", "TVDistance", "tv_distance", "e2e_tv_loss", "MTP_LOSSES",
                 "mtp_loss"],
    "group_advantages": ["group_advantages"],
    "grpo_loss": ["grpo_loss"],
    "mtp_chain_targets": ["mtp_chain_targets"],
    "answer_mask": ["answer_mask"],
}


def test_each_piece_lifts_out_with_only_its_helpers():
    """Copy the source of each liftable piece and its helpers (nothing else of bebop) into a fresh namespace:
    it runs and returns what bebop's own returns, gradients included."""
    import inspect
    g = torch.Generator().manual_seed(0)
    N, K, V, C = 6, 3, 11, 4
    probs = lambda *shape: F.softmax(torch.randn(*shape, generator=g), -1)
    x = torch.randn(N, K, C, generator=g, dtype=torch.float64)
    W = torch.randn(V, C, generator=g, dtype=torch.float64)
    p, mask = probs(N, K, V).double(), torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]] * 2, dtype=torch.bool)
    logits, labels = torch.randn(N, K, V, generator=g), torch.randint(0, V, (N, K), generator=g)
    seq, lengths = torch.randint(0, V, (3, 9), generator=g), torch.tensor([9, 7, 5])
    calls = {
        "rejection_sample": lambda ns: ns["rejection_sample"](probs(5, 4, V), probs(5, 3, V), torch.randint(0, V, (5, 3), generator=g),
                                                            torch.Generator().manual_seed(1)),
        "tv_distance": lambda ns: torch.autograd.grad(ns["tv_distance"](x.requires_grad_(), p, W, chunk=4).sum(), x),
        "e2e_tv_loss": lambda ns: torch.autograd.grad(ns["e2e_tv_loss"](x.requires_grad_(), p, mask, W), x),
        "mtp_loss": lambda ns: [ns["mtp_loss"](kind, logits, logits.roll(1, -1), labels, mask) for kind in bebop.MTP_LOSSES],
        "group_advantages": lambda ns: ns["group_advantages"](torch.rand(12, generator=g), 4),
        "grpo_loss": lambda ns: ns["grpo_loss"](torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g),
                                                torch.randn(4, generator=g), torch.ones(4, 5, dtype=torch.bool),
                                                entropy_coef=0.1, entropy=torch.rand(4, 5, generator=g)),
        "mtp_chain_targets": lambda ns: ns["mtp_chain_targets"](seq, lengths, torch.randn(3, 9, V, generator=g),
                                                                torch.randn(3, K, 9, V, generator=g), 3),
        "answer_mask": lambda ns: ns["answer_mask"](lengths, 8, 3),
    }
    for piece, helpers in LIFTABLE.items():
        source = "\n\n".join(f"{h} = {getattr(bebop, h)!r}" if not callable(getattr(bebop, h))
                             else inspect.getsource(getattr(bebop, h)) for h in helpers)
        namespace = {"torch": torch, "F": F, "math": math}
        exec(compile(source, f"<lifted {piece}>", "exec"), namespace)
        state = g.get_state()
        lifted = calls[piece](namespace)
        g.set_state(state)
        own = calls[piece](vars(bebop))
        for a, b in zip(torch.utils._pytree.tree_leaves(lifted), torch.utils._pytree.tree_leaves(own)):
            assert torch.equal(a, b), piece


# ----------------------------------------------------------------------------- 8. CUDA graphs


@pytest.mark.parametrize("where", ["stand_in", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_decoding_equals_eager(drafted_model, where, precision, monkeypatch):
    """Greedy decoding gives identical tokens, log-probs and stats with and without graphs: plain and
    speculative (RS and TO rules), ragged prompts, with and without EOS, over repeated calls that replay
    the graph captured by the first, and after the weights change in place (as an optimizer step does).
    Through the stand-in in fp32 the graphed tokens must also equal a naive argmax loop."""
    model, graphs = decoding_on(where, bebop.rollout_weights(drafted_model, precision), monkeypatch)
    calls = [(bebop.generate, {}), (bebop.speculative_generate, dict(gamma=3, draft="sample")),
             (bebop.speculative_generate, dict(gamma=2, draft="greedy"))]
    kept = []
    for perturb in (False, True):
        if perturb:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.05)
        for fn, kw in calls:
            for eos in (None, 3):
                eager = fn(model, RAGGED, 20, temperature=0, eos=eos, **kw)
                if where == "stand_in" and precision == "fp32":   # and the graph path against ground truth
                    graphed = fn(model, RAGGED, 20, temperature=0, eos=eos, graphs=graphs, **kw)
                    for b, prompt in enumerate(RAGGED):
                        assert torch.equal(graphed.new_tokens[b], naive_greedy(model, prompt, 20, eos))
                for _ in range(2):
                    graphed = fn(model, RAGGED, 20, temperature=0, eos=eos, graphs=graphs, **kw)
                    assert torch.equal(graphed.new_tokens, eager.new_tokens), (fn.__name__, kw, eos, perturb)
                    torch.testing.assert_close(graphed.logprobs, eager.logprobs, rtol=0, atol=1e-5)
                    assert graphed.stats == eager.stats
                    kept.append((graphed, eager))
    assert any(e.stats.get("accept_length", 1) > 1.5 for _, e in kept), "drafts were hardly accepted"
    for graphed, eager in kept:   # nothing returned may alias the static buffers a later call reuses
        assert torch.equal(graphed.new_tokens, eager.new_tokens)


@pytest.mark.parametrize("where", ["stand_in", pytest.param("cuda", marks=needs_cuda)])
def test_graphed_sampling_follows_the_callers_generator(drafted_model, where, monkeypatch):
    model, graphs = decoding_on(where, drafted_model, monkeypatch)
    dev = model.lm_head.weight.device
    run = lambda fn, seed: fn(model, RAGGED, 20, graphs=graphs, generator=torch.Generator(dev).manual_seed(seed))
    for fn in (bebop.generate, bebop.speculative_generate):
        a, b, c = run(fn, 1), run(fn, 1), run(fn, 2)
        assert torch.equal(a.new_tokens, b.new_tokens) and torch.equal(a.logprobs, b.logprobs)
        assert not torch.equal(a.new_tokens, c.new_tokens)


@pytest.mark.parametrize("lag", [1, 2])
def test_idle_steps_after_the_batch_ended_change_nothing(drafted_model, lag, monkeypatch):
    """With CUDA graphs the host learns that every row is done one step late, so a finished batch runs an
    idle step. Forcing that lag through the stand-in: the same tokens, log-probs and stats as reading the
    flag at once (lag 0, same static decoder path and so the same random stream)."""
    prompt, eos = torch.tensor([[1, 2, 3]]).expand(16, -1), 6
    calls = [(bebop.generate, {}), (bebop.speculative_generate, dict(draft="sample")),
             (bebop.speculative_generate, dict(draft="greedy"))]
    stand_in_graphs(monkeypatch)
    at_once = [fn(drafted_model, prompt, 30, eos=eos, generator=torch.Generator().manual_seed(0),
                  graphs=bebop.CudaGraphs(drafted_model, lag=0), **kw) for fn, kw in calls]
    steps, real = [], bebop.repeat_until_done

    def watched(step, done, max_steps, lag_):
        def counted_step():
            steps.append(bool(done.all()))
            step()
        real(counted_step, done, max_steps, lag_)
    monkeypatch.setattr(bebop, "repeat_until_done", watched)
    for (fn, kw), ref in zip(calls, at_once):
        steps.clear()
        out = fn(drafted_model, prompt, 30, eos=eos, generator=torch.Generator().manual_seed(0),
                 graphs=bebop.CudaGraphs(drafted_model, lag=lag), **kw)
        assert steps.count(True) == lag, "the lagged loop ran no idle step: the test proves nothing"
        assert torch.equal(out.new_tokens, ref.new_tokens) and torch.equal(out.mask, ref.mask)
        assert torch.equal(out.logprobs, ref.logprobs) and out.stats == ref.stats


class GraphHazards(TorchDispatchMode):
    """Records each op that would break a CUDA graph or make it silently wrong: reading a value back to
    the host (.item(), int(t), `if t:`, a data-dependent shape such as nonzero or a boolean-mask index),
    an op tagged unsafe for graphs, and a random draw not taken from the generator handed to the step
    (a replay would not draw fresh numbers from it). Blind to .tolist() and .cpu() on a CPU tensor."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tags = set(func.tags)
        integer_index = func is torch.ops.aten.index.Tensor and all(
            i is None or i.dtype != torch.bool for i in args[1])       # gathers by position: a fixed shape
        if (torch.Tag.data_dependent_output in tags or torch.Tag.cudagraph_unsafe in tags
                or (torch.Tag.dynamic_output_shape in tags and not integer_index)):
            self.found.append(str(func))
        schema = func._schema.arguments
        named = ({a.name: a.default_value for a in schema if a.has_default_value()}
                 | {a.name: v for a, v in zip(schema, args)} | kwargs)
        random = torch.Tag.nondeterministic_seeded in tags and named.get("dropout_p", 1) > 0  # SDPA: no dropout
        if random and named.get("generator") is None:
            self.found.append(f"{func} without the step's generator")
        return func(*args, **kwargs)


def hazards_of_graphed_steps(monkeypatch, model, decode):
    """Run decode(graphs) through the stand-in, graphs a CudaGraphs of model, with every replayed step
    watched by GraphHazards."""
    found, replays = [], []

    def watched(step):
        def replay():
            with GraphHazards() as watch:
                step()
            found.extend(watch.found)
            replays.append(1)
        return replay
    stand_in_graphs(monkeypatch, watched)
    decode(bebop.CudaGraphs(model, strict=True))
    assert replays, "no step was replayed"
    return found


@pytest.mark.parametrize("fn,kw", [
    (bebop.generate, dict(temperature=1.0)),
    (bebop.generate, dict(temperature=0.0, eos=3)),
    (bebop.speculative_generate, dict(temperature=1.0, draft="sample", eos=3)),
    (bebop.speculative_generate, dict(temperature=0.7, draft="greedy")),
    (bebop.speculative_generate, dict(temperature=0.0, draft="sample", gamma=2)),
    (bebop.speculative_generate, dict(temperature=1.0, draft="sample", gamma="auto", eos=3)),
])
def test_a_decoding_step_never_waits_on_the_host(drafted_model, monkeypatch, fn, kw):
    """What makes a step capturable, checked op by op on a CPU: no read-back to the host, no
    data-dependent shape or branch, every random number from the step's own generator."""
    decode = lambda graphs: fn(drafted_model, RAGGED, 20, graphs=graphs, generator=torch.Generator().manual_seed(0), **kw)
    assert hazards_of_graphed_steps(monkeypatch, drafted_model, decode) == []


def test_rounds_of_every_draft_length_never_wait_on_the_host(drafted_model):
    """gamma 0..5, each round run under the dispatch hook directly (schedules run eagerly; "auto" replays
    one graph per gamma, checked through the stand-in above)."""
    B, P = 3, 3
    caches = bebop.Caches(drafted_model, B, P + 20 + 5)
    idx, lengths = torch.tensor([[1, 2, 3]] * B), torch.full((B,), P)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        s = bebop.speculative_prefill(drafted_model, caches, idx, lengths, 20, 5, 1.0, g, 3)
        for gamma in range(6):
            with GraphHazards() as watch:
                bebop.speculative_round(drafted_model, caches, s, gamma, 1.0, False, 3, 20, generator=g)
            assert watch.found == [], (gamma, watch.found)


@pytest.mark.parametrize("plant,expected", [
    (lambda s: s.done.all().item(), "_local_scalar_dense"),
    (lambda s: 1 if s.done.any() else 0, "_local_scalar_dense"),     # a branch on a tensor's value
    (lambda s: s.x[s.done], "aten.index.Tensor"),                     # a boolean-mask index
    (lambda s: (s.tokens == 3).nonzero(), "aten.nonzero"),
    (lambda s: torch.rand(1), "without the step's generator"),        # the global RNG
    (lambda s: F.one_hot(s.x, 8), "_local_scalar_dense"),             # checks its ids on the host off CUDA
])
def test_the_host_wait_check_can_fail(drafted_model, monkeypatch, plant, expected):
    real = bebop.plain_step

    def planted(model, caches, s, *args, **kwargs):
        real(model, caches, s, *args, **kwargs)
        plant(s)
    monkeypatch.setattr(bebop, "plain_step", planted)
    found = hazards_of_graphed_steps(monkeypatch, drafted_model,
                                     lambda graphs: bebop.generate(drafted_model, RAGGED, 20, graphs=graphs))
    assert any(expected in f for f in found), found


def test_static_decoders_capture_once_per_shape_and_follow_the_weights(drafted_model, monkeypatch):
    captures = stand_in_graphs(monkeypatch)
    model = copy.deepcopy(drafted_model)
    graphs = bebop.CudaGraphs(model, strict=True)
    prompts = lambda B: torch.tensor([[1, 2, 3]]).expand(B, -1)
    for B in (1, 2, 1, 2):
        bebop.speculative_generate(model, prompts(B), 10, graphs=graphs)
    assert len(captures) == 2
    bebop.generate(model, prompts(1), 10, graphs=graphs)
    bebop.speculative_generate(model, prompts(1), 10, temperature=0.5, graphs=graphs)
    assert len(captures) == 4
    bebop.speculative_generate(model, prompts(1), 10, graphs=bebop.CudaGraphs(model))   # another owner: its own
    assert len(captures) == 5
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())   # new storage
    bebop.speculative_generate(model, prompts(1), 10, graphs=graphs)
    assert len(captures) == 6, "a graph over the old weights was replayed"
    graphs.max_shapes = 2                                    # memory bound: the oldest shape is dropped
    for B in (2, 3, 1):
        bebop.speculative_generate(model, prompts(B), 10, graphs=graphs)
    assert len(captures) == 9
    with pytest.raises(ValueError, match="CudaGraphs made for this model"):
        bebop.generate(drafted_model, prompts(1), 10, graphs=graphs)   # another model's graphs


def test_a_graphed_step_that_rebinds_its_state_is_refused(drafted_model, monkeypatch):
    stand_in_graphs(monkeypatch)
    real = bebop.plain_step

    def rebinding(model, caches, s, *args, **kwargs):
        real(model, caches, s, *args, **kwargs)
        s.x = s.x.clone()   # a new tensor: a graph would go on writing the old one
    monkeypatch.setattr(bebop, "plain_step", rebinding)
    with pytest.raises(RuntimeError, match="in place.*'x'"):
        bebop.generate(drafted_model, RAGGED, 5, graphs=bebop.CudaGraphs(drafted_model))


def test_a_failed_capture_falls_back_to_eager_unless_graphs_were_insisted_on(drafted_model, monkeypatch):
    stand_in_graphs(monkeypatch)

    def failing(step, tensors, generator):
        bebop.warm_up(step, tensors, generator)
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(bebop, "capture_cuda_graph", failing)
    eager = bebop.speculative_generate(drafted_model, RAGGED, 20, temperature=0)
    graphs = bebop.CudaGraphs(drafted_model)
    with pytest.warns(UserWarning, match="capture failed"):
        auto = bebop.speculative_generate(drafted_model, RAGGED, 20, temperature=0, graphs=graphs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no second capture, so no second warning
        again = bebop.speculative_generate(drafted_model, RAGGED, 20, temperature=0, graphs=graphs)
    assert torch.equal(auto.new_tokens, eager.new_tokens) and torch.equal(again.new_tokens, eager.new_tokens)
    with pytest.raises(RuntimeError, match="stream is capturing"):
        bebop.generate(drafted_model, RAGGED, 20, graphs=bebop.CudaGraphs(drafted_model, strict=True))


def test_cuda_graphs_are_refused_where_they_cannot_run(drafted_model, monkeypatch):
    with pytest.raises(ValueError, match="need a model on a CUDA device"):
        bebop.CudaGraphs(drafted_model)     # a CPU model, on any machine
    with pytest.raises(ValueError, match="graphs must be None or a CudaGraphs"):
        bebop.generate(drafted_model, RAGGED, 5, graphs=True)
    stand_in_graphs(monkeypatch)
    with pytest.raises(ValueError, match="trace records every round eagerly"):
        bebop.speculative_generate(drafted_model, RAGGED, 5, trace=[], graphs=bebop.CudaGraphs(drafted_model))


# ----------------------------------------------------------------------------- 9. adaptive draft length


def test_the_draft_length_rule_on_synthetic_costs():
    """argmax E(gamma)/C(gamma), E from Eq. 12: known optima, gamma = 0 (plain) among them."""
    c = bebop.DraftLengthChooser(3, alphas=[0.9, 0.9, 0.9], prior_tokens=0.0)
    # E = 1, 1.9, 2.71, 3.439; latency-bound costs (a round costs little more than a plain step): longest wins
    assert c.choose([1.0, 1.1, 1.2, 1.3]) == 3
    # compute-bound: a round costs (gamma + 1) plain steps plus drafting: plain decoding wins
    assert c.choose([1.0, 2.2, 3.3, 4.4]) == 0
    # in between: 1.9/1.5 = 1.27, 2.71/2.0 = 1.355, 3.439/3.0 = 1.15 -> gamma = 2
    assert c.choose([1.0, 1.5, 2.0, 3.0]) == 2
    low = bebop.DraftLengthChooser(3, alphas=[0.1, 0.1, 0.1])   # drafts almost never accepted
    assert low.choose([1.0, 1.1, 1.2, 1.3]) == 0
    # a large batch whose slowest row sets the pace: half of Eq. 12's drafted part reaches the critical path
    c.observe_batch("B", 3, longest=1 + 10 * (1 + 0.5 * 2.439), rounds=10)
    assert c.efficiency("B") == pytest.approx([0.5] * 4)             # measured at gamma 3, assumed for the rest
    assert c.choose([1.0, 1.5, 2.0, 3.0], c.efficiency("B")) == 0    # every rate now below plain decoding's
    c.observe_batch("B", 1, longest=1 + 10 * (1 + 0.9), rounds=10)   # gamma 1 loses nothing: shares per gamma
    assert c.efficiency("B")[1] == pytest.approx(1.0) and c.efficiency("B")[3] == pytest.approx(0.5)
    assert c.efficiency("B")[2] == pytest.approx((9 + 12.195) / (9 + 24.39))   # the others pooled
    assert c.choose([1.0, 1.5, 2.0, 3.0], c.efficiency("B")) == 1
    c.observe(dict(drafts_accepted=[10, 0, 0], drafts_reached=[20, 0, 0]))   # only depth 1 observed: replaces
    assert c.alphas == pytest.approx([0.5, 0.9, 0.9])
    c.observe(dict(drafts_accepted=[15, 8, 0], drafts_reached=[20, 10, 0]))  # then averaged in (weight 0.5)
    assert c.alphas == pytest.approx([0.625, 0.8, 0.9])


def test_one_unlucky_call_does_not_switch_drafting_off():
    """The critical-path efficiency is pooled over calls from a prior: one unlucky call of one row (25 tokens
    in 12 rounds where Eq. 12 expects about 7) moves it only part of the way, where alone it would switch
    drafting off; many calls reach their pooled ratio, here 0.8 of Eq. 12's drafted part."""
    costs = [1.0, 1.6, 2.0, 2.4]                          # batch-1-like costs measured on this CPU
    alone = bebop.DraftLengthChooser(3, alphas=[0.9, 0.9, 0.9], prior_tokens=0.0)
    c = bebop.DraftLengthChooser(3, alphas=[0.9, 0.9, 0.9])
    for chooser in (alone, c):
        chooser.observe_batch("B1", 3, longest=25, rounds=12)
    assert alone.efficiency("B1")[3] < 0.45 and alone.choose(costs, alone.efficiency("B1")) == 0
    assert 0.65 < c.efficiency("B1")[3] < 0.8 and c.choose(costs, c.efficiency("B1")) == 3
    for _ in range(50):
        c.observe_batch("B1", 3, longest=1 + round(100 * (1 + 0.8 * 2.439)), rounds=100)
    assert c.efficiency("B1")[3] == pytest.approx(0.8, abs=0.01)
    state = c.state()
    d = bebop.DraftLengthChooser(3)
    d.load(state)
    assert d.drafted == c.drafted and d.efficiency("B1") == c.efficiency("B1")


def test_auto_drafts_once_after_a_run_of_plain_calls(drafted_model, monkeypatch):
    """Costs where plain decoding always wins and gamma 1 is the runner-up (a gamma-1 round costs 2.5 plain
    steps, more than the 2 tokens it can yield; longer ones far more): gamma 1 runs at the second call (it
    never ran), then at every (explore_every + 1)-th; the others decode plainly. (The costs stay the
    profiled ones here: the calls' own timings are not folded in.)"""
    K = drafted_model.config.mtp_train_steps
    monkeypatch.setattr(bebop, "round_costs", lambda *a, **k: [1.0, 2.5] + [50.0] * (K - 1))
    monkeypatch.setattr(bebop.DraftLengthChooser, "observe_cost", lambda *a, **k: None)
    chooser = bebop.DraftLengthChooser(K, explore_every=3)
    prompt = torch.randint(0, 8, (2, 5), generator=torch.Generator().manual_seed(0))
    gammas = [bebop.speculative_generate(drafted_model, prompt, 6, gamma="auto", chooser=chooser,
                                         generator=torch.Generator().manual_seed(i)).stats["gamma"] for i in range(9)]
    assert gammas == [0, 1, 0, 0, 0, 1, 0, 0, 0], gammas
    assert chooser.observed[0] == 2                     # each drafting call fed the acceptance estimates
    resumed = bebop.DraftLengthChooser(K, explore_every=3)
    resumed.load(chooser.state())
    assert resumed.streak == chooser.streak


def test_round_costs_are_learned_from_the_calls():
    """The profile (each step alone) says plain decoding wins: a gamma-1 round costs 2 plain steps, more than
    the 1.9 tokens it yields. The calls measure a round at 1.25 s and a plain step at 1.0 s (the loop around
    the steps and the machine add to both, unequally): then gamma 1 wins. The parts of a call outside its
    steps are subtracted. The first call sets the level only (nothing to compare it with); plain's call,
    after it, is compared with that level: offset (1 + 1.0 / 0.625) / 2 = 1.3. A slow minute that doubles
    the time of the gamma-1 calls that follow one another moves the level, not the offsets or the choice."""
    c = bebop.DraftLengthChooser(3, alphas=[0.9, 0.9, 0.9], prior_calls=1, drift=0.5)
    c.costs["B"], c.prefill["B"] = [1.0, 2.0, 3.0, 4.0], [0.5, 0.7]
    assert c.choose(c.round_cost("B")) == 0
    c.observe_cost("B", 1, 12.5 + 0.7, 10)           # 10 rounds of gamma 1, 1.25 s each, + the speculative prefill
    assert c.round_cost("B") == pytest.approx([0.625, 1.25, 1.875, 2.5])   # level 0.625, no offsets yet
    assert c.choose(c.round_cost("B")) == 0          # a level alone never changes the choice
    c.observe_cost("B", 0, 10.0 + 0.5, 10)           # 10 plain steps, 1.0 s each, as profiled
    level = 0.625 + 0.5 * (1.0 / 1.3 - 0.625)
    assert c.level["B"] == pytest.approx(level)
    assert c.round_cost("B") == pytest.approx([level * 1.3, level * 2, level * 3, level * 4])
    assert c.choose(c.round_cost("B")) == 1
    c.observe_cost("B", 1, 12.5 + 0.7, 10)           # gamma 1 again, compared with the level plain's call left
    assert c.choose(c.round_cost("B")) == 1
    offsets = {g: c.offset_of("B", g) for g in range(4)}
    for _ in range(4):
        c.observe_cost("B", 1, 25.0 + 0.7, 10)       # then the machine at half speed
        assert c.choose(c.round_cost("B")) == 1
    assert {g: c.offset_of("B", g) for g in range(4)} == offsets and c.level["B"] > 1.8 * level
    d = bebop.DraftLengthChooser(3, alphas=[0.9, 0.9, 0.9], prior_calls=1, drift=0.5)
    d.load(c.state())
    assert d.round_cost("B") == c.round_cost("B") and d.last == c.last


def test_auto_learns_each_calls_steps_and_wall_time(drafted_model, monkeypatch):
    """adaptive_generate folds in the steps each call ran (its target forwards after the prefill's) and its
    wall time less the profiled parts outside the steps, over the profiled cost of a step (here made to
    dwarf the real times, which are milliseconds): the first call sets the level, the second, with another
    gamma, is compared with it."""
    K = drafted_model.config.mtp_train_steps
    monkeypatch.setattr(bebop, "round_costs", lambda *a, **k: [1.0] + [10.0] * K)   # plain, then gamma K
    monkeypatch.setattr(bebop, "prefill_costs", lambda *a, **k: [-100.0, -200.0])
    chooser = bebop.DraftLengthChooser(K, explore_every=1)
    prompt = torch.randint(0, 8, (2, 5), generator=torch.Generator().manual_seed(0))
    outs = [bebop.speculative_generate(drafted_model, prompt, 6, gamma="auto", chooser=chooser) for _ in range(2)]
    shape = (2, 5, 6, False)
    steps = [o.stats["target_forwards"] - 1 for o in outs]
    assert [o.stats["gamma"] for o in outs] == [0, K] and min(steps) > 0
    assert list(chooser.offset[shape]) == [K] and chooser.offset[shape][K][1] == 1 and chooser.last[shape] == K
    first_level = 100.0 / steps[0] / 1.0
    assert chooser.offset[shape][K][0] == pytest.approx(200.0 / steps[1] / 10.0 / first_level, rel=0.01)


def test_auto_explores_the_runner_up_and_guesses_unmeasured_depths_from_the_deepest():
    """Exploring: plain decoding runs once right after the best's first call (it never ran), the runner-up
    likewise after the best's next call, then after every explore_every calls in a row with one pick. Without
    a given prior, depths not yet measured take the deepest measured depth's acceptance (a given prior stays)."""
    c = bebop.DraftLengthChooser(3, alphas=[0.9, 0.9, 0.9], explore_every=2)
    c.costs["B"] = [1.0, 1.1, 1.2, 1.3]       # latency-bound: rates 1, 1.73, 2.26, 2.65: gamma 3, then 2
    assert [c.pick("B") for _ in range(8)] == [3, 0, 3, 2, 3, 3, 2, 3]
    assert c.chosen["B"] == {3: 5, 0: 1, 2: 2}
    d = bebop.DraftLengthChooser(3)
    d.observe(dict(drafts_accepted=[19, 9, 0], drafts_reached=[20, 10, 0]))
    assert d.alphas == pytest.approx([0.95, 0.9, 0.9])
    given = bebop.DraftLengthChooser(3, alphas=[0.8, 0.6, 0.4])
    given.observe(dict(drafts_accepted=[19, 9, 0], drafts_reached=[20, 10, 0]))
    assert given.alphas == pytest.approx([0.95, 0.9, 0.4])


def test_round_costs_are_the_line_through_the_timings():
    """A fixed part plus a part per drafted token: the line recovers both from noisy timings, so noise cannot
    make a longer draft look cheaper than a shorter one; with two timings there is no line to fit."""
    g = torch.Generator().manual_seed(0)
    noisy = [2.0 + 0.5 * k + 0.3 * float(torch.rand((), generator=g) - 0.5) for k in range(1, 6)]
    noisy[1], noisy[3] = noisy[3], noisy[1]                 # gamma 2 timed dearer than gamma 4
    line = bebop.round_cost_line(noisy)
    steps = [b - a for a, b in zip(line, line[1:])]
    assert all(s == pytest.approx(steps[0]) for s in steps) and 0.3 < steps[0] < 0.7
    assert sum(line) == pytest.approx(sum(noisy))
    assert bebop.round_cost_line([1.0, 3.0]) == [1.0, 3.0]


# ----------------------------------------------------------------------------- 10. data parallelism


def _ddp_worker(rank, world, port, out, results):
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    calls = []
    reduce = bebop.all_reduce
    def spy(values, w, op="mean"):   # record what each rank contributes and what comes back
        reduced = reduce(values, w, op)
        calls.append((dict(values), op, reduced))
        return reduced
    bebop.all_reduce = spy
    model, _ = bebop.train(bebop.parse_args(TINY_RUN + ["--out", out]))
    torch.save(dict(state=model.state_dict(), calls=calls), f"{results}/rank{rank}.pt")


def test_two_ranks_with_gloo_stay_in_sync_and_log_reduced_metrics(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    mp.spawn(_ddp_worker, args=(2, port, str(out), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert states_equal(r0["state"], r1["state"])
    assert len(r0["calls"]) == len(r1["calls"])
    # GRPO's averaged numbers, found by name; and the pooled sums behind the logged acceptance
    grpo = [(a, b) for a, b in zip(r0["calls"], r1["calls"]) if "reward" in a[0] and a[1] == "mean"]
    sums = [(a, b) for a, b in zip(r0["calls"], r1["calls"]) if "drafts_reached" in a[0] and a[1] == "sum"]
    log = [json.loads(line) for line in open(out / "log.jsonl") if '"grpo"' in line]
    assert len(grpo) == len(sums) == len(log) == 6
    differ = 0
    for (v0, _, reduced), (v1, _, _), (s0, s1), entry in zip(*zip(*grpo), sums, log):
        assert entry["reward"] == pytest.approx((v0["reward"] + v1["reward"]) / 2, abs=1e-12)
        assert entry["reward"] == pytest.approx(reduced["reward"], abs=1e-12)
        assert entry["entropy"] == pytest.approx((v0["entropy"] + v1["entropy"]) / 2, abs=1e-12)
        reached = [a + b for a, b in zip(s0[0]["drafts_reached"], s1[0]["drafts_reached"])]
        accepted = [a + b for a, b in zip(s0[0]["drafts_accepted"], s1[0]["drafts_accepted"])]
        assert entry["acceptance"] == pytest.approx([a / r for a, r in zip(accepted, reached)], abs=1e-12)
        assert entry["accept_length"] == pytest.approx(
            (s0[0]["kept_tokens"] + s1[0]["kept_tokens"]) / (s0[0]["row_rounds"] + s1[0]["row_rounds"]), abs=1e-12)
        differ += v0["entropy"] != v1["entropy"]
    assert differ == len(log), "both ranks drew the same rollouts: the data is not split"
    sft0, sft1 = ([c[0]["loss"] for c in r["calls"] if set(c[0]) == {"loss"} and c[1] == "mean"] for r in (r0, r1))
    assert len(sft0) == 20 + 8 and all(a != b for a, b in zip(sft0, sft1)), "ranks trained on the same batches"


# ----------------------------------------------------------------------------- 11. checkpoints and resume


@pytest.mark.parametrize("where,flags", [("sft_loss", []), ("mtp_training_loss", []), ("grpo_loss", []),
                                         ("grpo_loss", ["--mtp-online", "e2e_tv", "--temperature", "0.8"])])
def test_resume_after_ctrl_c_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch, capsys, where, flags):
    """Bit-identical, including the MTP stage (its training set of policy samples is regenerated) and an RL
    run that updates the MTP layer online (its optimizer state is in the checkpoint)."""
    import signal
    run = TINY_RUN + flags
    full, _ = bebop.train(bebop.parse_args(run + ["--out", str(tmp_path / "a")]))
    original = getattr(bebop, where)
    calls = []
    def interrupting(*args, **kwargs):   # Ctrl-C arrives in the middle of the third step
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)
    monkeypatch.setattr(bebop, where, interrupting)
    with pytest.raises(KeyboardInterrupt, match="continue with --resume"):
        bebop.train(bebop.parse_args(run + ["--out", str(tmp_path / "b")]))
    monkeypatch.setattr(bebop, where, original)
    stage = {"sft_loss": "sft", "mtp_training_loss": "mtp", "grpo_loss": "grpo"}[where]
    assert torch.load(tmp_path / "b" / f"{stage}.pt", weights_only=False)["step"] == 3
    total = {"sft": 20, "mtp": 8, "grpo": 6}[stage]
    last_bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert f" 3/{total} " in last_bar, last_bar   # the bar agrees with the step saved
    resumed, summary = bebop.train(bebop.parse_args(run + ["--out", str(tmp_path / "b"), "--resume"]))
    assert states_equal(full.state_dict(), resumed.state_dict())
    assert summary["reward_before"] == json.load(open(tmp_path / "a" / "summary.json"))["reward_before"]
    # The tiny run earns almost no reward, so equal weights do not show equal rollouts: compare those too.
    keys = ("reward", "entropy", "kept_tokens", "row_rounds", "drafts_reached", "drafts_accepted")
    logs = [[{k: m[k] for k in keys} for m in map(json.loads, open(tmp_path / r / "log.jsonl")) if m["stage"] == "grpo"]
            for r in ("a", "b")]
    assert logs[0] == logs[1] and len(logs[0]) == 6


def test_resume_with_auto_draft_length_is_bit_identical(tmp_path, monkeypatch):
    """gamma auto: the chooser's costs and running acceptance are in the checkpoint, so a resumed run picks
    the draft lengths the uninterrupted run picked (costs made deterministic here; on a real run they are
    profiled at the first rollout and then learned from every call's wall time)."""
    import signal
    costs = [1.0, 1.02, 1.05, 1.08, 1.5, 2.0]    # latency-bound-like: gamma 3 unless acceptance drops
    monkeypatch.setattr(bebop, "round_costs", lambda *a, **k: list(costs))
    monkeypatch.setattr(bebop.DraftLengthChooser, "observe_cost", lambda *a, **k: None)   # no wall times
    run = TINY_RUN[:-2] + ["--gamma", "auto"]
    full, _ = bebop.train(bebop.parse_args(run + ["--out", str(tmp_path / "a")]))
    chosen = json.load(open(tmp_path / "a" / "summary.json"))["gamma_chosen_in_rl"]
    original, calls = bebop.grpo_loss, []
    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)
    monkeypatch.setattr(bebop, "grpo_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        bebop.train(bebop.parse_args(run + ["--out", str(tmp_path / "b")]))
    monkeypatch.setattr(bebop, "grpo_loss", original)
    resumed, summary = bebop.train(bebop.parse_args(run + ["--out", str(tmp_path / "b"), "--resume"]))
    assert states_equal(full.state_dict(), resumed.state_dict())
    assert summary["gamma_chosen_in_rl"] == chosen and sum(chosen.values()) == 6
    # The tiny run earns almost no reward (most steps none), so its weights hardly depend on the rollouts, and
    # equal weights do not show equal rollouts. Each step's rollout statistics, and the chooser the runs end
    # with (timings aside):
    rollout_keys = ("gamma", "reward", "entropy", "kept_tokens", "row_rounds", "drafts_reached", "drafts_accepted")
    logs = [[{k: m[k] for k in rollout_keys} for m in map(json.loads, open(tmp_path / r / "log.jsonl"))
             if m["stage"] == "grpo"] for r in ("a", "b")]
    assert logs[0] == logs[1] and len(logs[0]) == 6
    ends = [torch.load(tmp_path / r / "grpo.pt", weights_only=False)["extra"]["chooser"] for r in ("a", "b")]
    for key in ("alphas", "observed", "drafted", "chosen", "streak"):
        assert ends[0][key] == ends[1][key], key


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    bebop.train(bebop.parse_args(TINY_RUN + ["--out", str(out)]))
    return out


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint_is_refused_and_left_alone(finished_run, tmp_path, damage):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    path = out / "mtp.pt"
    data = path.read_bytes()
    bad = b"not a checkpoint" if damage == "garbage" else data[:len(data) // 2]
    path.write_bytes(bad)
    with pytest.raises(bebop.CheckpointError, match="mtp.pt is unreadable or truncated"):
        bebop.train(bebop.parse_args(TINY_RUN + ["--out", str(out), "--resume"]))
    assert path.read_bytes() == bad and (out / "sft.pt").exists()


def test_checkpoint_from_another_config_is_refused(finished_run, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    args = [a if a != "tiny" else "cpu" for a in TINY_RUN]
    with pytest.raises(bebop.CheckpointError, match="was made with n_layer=2, this run has n_layer=6"):
        bebop.train(bebop.parse_args(args + ["--out", str(out), "--resume"]))


def test_main_prints_one_line_for_a_bad_checkpoint(finished_run, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "sft.pt").write_bytes(b"oops")
    with pytest.raises(SystemExit, match="^bebop: error: checkpoint .*sft.pt is unreadable"):
        bebop.main(TINY_RUN + ["--out", str(out), "--resume"])


def copy_run(finished_run, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def snapshot(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_a_fresh_run_refuses_an_out_with_checkpoints_and_removes_nothing(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        bebop.main(TINY_RUN + ["--out", str(out)])
    assert "holds checkpoints of another run" in str(e.value) and "--overwrite" in str(e.value)
    assert "\n" not in str(e.value) and snapshot(out) == before


def test_overwrite_removes_nothing_until_the_new_run_has_saved(finished_run, tmp_path, monkeypatch):
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    def crash(*args, **kwargs):
        raise RuntimeError("crashed in the first step")
    monkeypatch.setattr(bebop, "sft_loss", crash)
    with pytest.raises(RuntimeError, match="crashed"):
        bebop.main(TINY_RUN + ["--out", str(out), "--overwrite"])
    assert snapshot(out) == before, "a crashed --overwrite run destroyed the old run"
    monkeypatch.undo()
    bebop.main(TINY_RUN + ["--out", str(out), "--overwrite", "--seed", "5"])
    ckpt = torch.load(out / "grpo.pt", weights_only=False)
    assert ckpt["train"]["seed"] == 5 and ckpt["done"]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[0]["stage"] == "sft" and log[0]["step"] == 0 and sum(m["stage"] == "sft" for m in log) == 20


@pytest.mark.parametrize("flags,differ", [(["--seed", "9"], "seed 1337 -> 9"),
                                          (["--mtp-loss", "ce"], "mtp_loss 'e2e_tv' -> 'ce'"),
                                          (["--rl-steps", "9"], "rl_steps 6 -> 9"),
                                          (["--gamma", "2"], "gamma 3 -> 2")])
def test_resume_refuses_a_checkpoint_made_with_other_settings(finished_run, tmp_path, flags, differ):
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        bebop.main(TINY_RUN + flags + ["--out", str(out), "--resume"])
    assert "other settings" in str(e.value) and differ in str(e.value) and "\n" not in str(e.value)
    assert snapshot(out) == before


def test_resume_on_an_empty_out_says_it_starts_from_scratch(tmp_path, capsys, task):
    tc = bebop.TrainConfig(preset="tiny")
    bebop.Run(str(tmp_path / "new"), tc, bebop.build_config(tc, task), resume=True)
    assert "nothing to resume" in capsys.readouterr().out


def test_a_later_stage_without_an_earlier_one_is_refused(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    (out / "sft.pt").unlink()
    with pytest.raises(SystemExit, match="holds grpo.pt but no sft.pt"):
        bebop.main(TINY_RUN + ["--out", str(out), "--resume"])


def test_an_out_that_is_a_file_gets_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "inside"):
        with pytest.raises(SystemExit) as e:
            bebop.main(TINY_RUN + ["--out", str(out)])
        assert str(e.value).startswith("bebop: error:") and "\n" not in str(e.value)


@pytest.mark.parametrize("edit", ["missing_key", "wrong_shape", "missing_optimizer"])
def test_hand_edited_checkpoints_are_refused_in_one_line(finished_run, tmp_path, edit):
    out = copy_run(finished_run, tmp_path)
    ckpt = torch.load(out / "mtp.pt", weights_only=False)
    if edit == "missing_key":
        del ckpt["rng"]
    elif edit == "wrong_shape":
        ckpt["model"]["wte.weight"] = ckpt["model"]["wte.weight"][:, :3].clone()
    else:
        ckpt["optimizers"] = []
    ckpt["done"] = False
    torch.save(ckpt, out / "mtp.pt")
    with pytest.raises(SystemExit, match="^bebop: error: checkpoint .*mtp.pt is unreadable or truncated"):
        bebop.main(TINY_RUN + ["--out", str(out), "--resume"])


# ----------------------------------------------------------------------------- 12. training stages


def test_bf16_rollout_weights_track_the_trainer_in_place(drafted_model):
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
    out = bebop.speculative_generate(policy, RAGGED, 20, temperature=0)
    ref = bebop.speculative_generate(model, RAGGED, 20, temperature=0)
    assert out.logprobs.dtype == torch.float32
    assert (out.new_tokens == ref.new_tokens).float().mean() > 0.8
    assert out.stats["accept_length"] > 1.5


def test_bf16_training_runs_end_to_end(tmp_path, monkeypatch):
    """--precision bf16 (the CUDA default) on a CPU: autocast in SFT, MTP training (memory-lean TV under
    autocast) and GRPO, rollouts on the refreshed bf16 copy."""
    used = []
    real = bebop.rollout

    def spy(model, *args, **kwargs):
        used.append([p.detach().clone() for p in model.parameters()])
        return real(model, *args, **kwargs)
    monkeypatch.setattr(bebop, "rollout", spy)
    _, summary = bebop.train(bebop.parse_args(TINY_RUN + ["--precision", "bf16", "--out", str(tmp_path)]))
    assert all(p.dtype == torch.bfloat16 for p in used[0])
    assert not all(torch.equal(a, b) for a, b in zip(used[0], used[-1])), "rollouts never saw the updated policy"
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    sft = [e["loss"] for e in log if e["stage"] == "sft"]
    assert all(math.isfinite(e["loss"]) for e in log)
    assert sft[-1] < sft[0] - 0.3
    assert summary["accept_length"] > 1.5 and math.isfinite(summary["reward_after"])


def test_training_stops_at_the_first_non_finite_loss(tmp_path, monkeypatch):
    original, calls = bebop.sft_loss, []
    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) == 12 else loss
    monkeypatch.setattr(bebop, "sft_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        bebop.main(TINY_RUN + ["--out", str(tmp_path)])
    assert str(e.value).startswith("bebop: error: sft step 11: the loss is nan; stopped")
    assert not (tmp_path / "mtp.pt").exists() and not (tmp_path / "summary.json").exists()


# ----------------------------------------------------------------------------- 13. measures of the experiments


def test_fit_line_recovers_a_planted_slope_with_an_honest_interval():
    g = torch.Generator().manual_seed(0)
    covered = 0
    for trial in range(200):
        x = torch.rand(40, generator=g, dtype=torch.float64)
        y = 3.0 - 1.68 * x + 0.05 * torch.randn(40, generator=g, dtype=torch.float64)
        fit = bebop.fit_line(x.tolist(), y.tolist())
        covered += fit["ci"][0] <= -1.68 <= fit["ci"][1]
    assert abs(fit["slope"] + 1.68) < 0.1 and abs(fit["intercept"] - 3.0) < 0.1
    assert 0.90 <= covered / 200 <= 0.99, covered       # a 95% interval covers the truth about 95% of the time


def test_decompose_splits_a_planted_series():
    """alpha = 0.9 - 0.5 (H - H_0) + drift: the entropy term carries the planted slope, the residual the drift."""
    H = [1.0 + 0.01 * t for t in range(60)]
    drift = [-0.001 * max(0, t - 20) for t in range(60)]            # starts after the early phase
    alpha = [0.9 - 0.5 * (h - 1.0) + d for h, d in zip(H, drift)]
    d = bebop.decompose(H, alpha)
    assert d["b"] == pytest.approx(-0.5, abs=1e-9)
    H0 = sum(H[:5]) / 5
    assert d["entropy_term"][-1] == pytest.approx(-0.5 * (H[-1] - H0), abs=1e-9)
    assert d["residual"][-1] == pytest.approx(drift[-1] - sum(drift[:5]) / 5, abs=1e-9)
    assert all(abs(a - b - c) < 1e-12 for a, b, c in zip(d["delta"], d["entropy_term"], d["residual"]))


def test_teacher_forced_acceptance_of_a_head_equal_to_the_policy_is_one(drafted_model, monkeypatch):
    """Draft rows equal to the target rows they are compared with give acceptance exactly 1 at every depth;
    a head shifted by one position does not (the alignment is what is tested)."""
    seq = bebop.generate(drafted_model, torch.randint(0, 8, (6, 9), generator=torch.Generator().manual_seed(0)), 20,
                         generator=torch.Generator().manual_seed(1))
    real = drafted_model.mtp_logits
    def perfect(idx, n, backbone=None, shift=0):
        target, _ = real(idx, n)
        T = idx.size(1)
        rows = [target[:, (torch.arange(T) + k + shift).clamp(max=T - 1)] for k in range(1, n + 1)]
        return target, torch.stack(rows, 1)
    tokens, mask = seq.tokens, torch.ones_like(seq.new_tokens, dtype=torch.bool)
    monkeypatch.setattr(bebop, "PROMPT_LEN", 9)
    monkeypatch.setattr(drafted_model, "mtp_logits", perfect)
    tok = bebop.teacher_forced_acceptance(drafted_model, tokens, mask, 3)
    assert tok["valid"].sum() > 100
    assert bebop.per_depth(tok["rs"], tok["valid"]) == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    assert bebop.tokens_per_forward([1.0, 1.0, 1.0]) == 4.0
    monkeypatch.setattr(drafted_model, "mtp_logits", lambda idx, n, backbone=None: perfect(idx, n, shift=1))
    tok = bebop.teacher_forced_acceptance(drafted_model, tokens, mask, 3)
    assert max(bebop.per_depth(tok["rs"], tok["valid"])) < 0.95


def test_eq12_and_ranking_with_ties():
    assert bebop.tokens_per_forward([0.8] * 4) == pytest.approx(3.3616)      # PAPER's example
    assert bebop.rank_with_ties({"a": (3.7, 0.01), "b": (3.69, 0.02), "c": (3.3, 0.05)}) == "a ~ b > c"


# ----------------------------------------------------------------------------- 14. benchmark


def test_bench_writes_the_table(tmp_path):
    result = bebop.main(["--bench", "--preset", "tiny", "--sft-steps", "5", "--mtp-steps", "5", "--rl-prompts", "2",
                         "--group-size", "4", "--out", str(tmp_path)])
    rows = json.load(open(tmp_path / "bench.json"))
    batches = (1, 4, 16, 8)
    decoding = [r for r in rows if r["mode"] in ("plain", "spec")]
    assert {(r["mode"], r.get("gamma"), r["batch"]) for r in decoding} == {
        (m, g, B) for B in batches for m, g in [("plain", None)] + [("spec", g) for g in (1, 2, 3, 4, 5, "auto")]}
    for r in decoding:
        assert r["cuda_graphs"] is False and r["tokens_per_s"] > 0
        assert r["accept_length"] == 1.0 if r["mode"] == "plain" else r["accept_length"] >= 1.0
        assert r["calls"] >= 6
        if r.get("gamma") == "auto":
            assert set(r["chosen"]) <= {str(g) for g in range(6)} and sum(r["chosen"].values()) == r["calls"]
            lo, hi = r["auto_over_best_90"]
            assert 0 < lo <= hi and r["auto_over_best"] > 0 and r["auto_over_held_out_best"] > 0
    assert any(r["accept_length"] > 1 for r in decoding if r["mode"] == "spec")
    for r in (r for r in rows if r["mode"] == "pieces"):
        assert r["t_spec_step"] > r["t_verify"] > 0 and 0 < r["achieved_over_ideal"]
        assert r["launches_spec_step"] > r["launches_plain"] > 0
    assert {r["rollout"] for r in rows if r["mode"] == "grpo_step"} == {"plain", "spec", "auto"}
    for r in (r for r in rows if r["mode"] == "grpo_step"):
        assert r["seconds"] > 0 and r["steps"] == 6
        if r["rollout"] != "plain":
            assert len(r["gamma"]) == 6 and r["plain_over_this_90"][0] <= r["plain_over_this_90"][1]
    tv = result["tv_loss"]
    assert tv["lean_tv"]["peak_mb"] < tv["plain_tv"]["peak_mb"] / 2
    assert tv["lean_e2e"]["peak_mb"] < tv["plain_e2e"]["peak_mb"] / 2


def test_paired_interval_of_a_known_ratio():
    """Mode b does each call's work in half a's time, up to noise shared by the modes within a call (as
    when a burst of other work slows one call of every mode): the interval is tight around 2."""
    g = torch.Generator().manual_seed(0)
    work = [float(w) for w in torch.randint(50, 150, (30,), generator=g)]
    burst = (1 + torch.rand(30, generator=g)).tolist()
    secs = {"a": [w / 100 * s for w, s in zip(work, burst)], "b": [w / 200 * s for w, s in zip(work, burst)]}
    lo, hi = bebop.paired_interval({"a": work, "b": work}, secs, "b", ["a"])
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    # Noise of its own in each mode widens the interval, which still covers the truth.
    own = {k: [t * (0.8 + 0.4 * float(torch.rand((), generator=g))) for t in v] for k, v in secs.items()}
    lo, hi = bebop.paired_interval({"a": work, "b": work}, own, "b", ["a"])
    assert lo < 2.0 < hi and hi - lo > 0.05


def test_held_out_best_picks_on_one_half_and_times_on_the_other():
    work = {"a": [1.0] * 4, "b": [1.0] * 4}
    assert bebop.held_out_best(work, {"a": [1.0] * 4, "b": [2.0] * 4}, ["a", "b"]) == pytest.approx(1.0)
    # b looks fast on the even calls only: picked there, it is timed on the odd ones (and a on the even ones)
    secs = {"a": [1.0, 1.0, 1.0, 1.0], "b": [0.5, 2.0, 0.5, 2.0]}
    assert bebop.held_out_best(work, secs, ["a", "b"]) == pytest.approx(4 / 6)


def test_memory_lean_tv_peak_is_at_most_half_of_plain_autograd():
    """App. F, measured: peak memory of forward + backward of head matmul + loss, each variant in its own
    process (peak RSS above a baseline taken once the inputs exist), for per-step and e2e TV."""
    mem = bebop.tv_memory_benchmark("cpu", rows=384, vocab=32768, hidden=256)
    logits_mb = 384 * 32768 * 4 / 2**20
    for loss in ("tv", "e2e"):
        plain, lean = mem[f"plain_{loss}"], mem[f"lean_{loss}"]
        assert plain["floor_mb"] < 0.5 * logits_mb and lean["floor_mb"] < 0.5 * logits_mb
        assert plain["peak_mb"] >= 1.5 * logits_mb, plain     # the harness sees autograd keep logits-sized tensors
        assert lean["peak_mb"] <= 0.5 * plain["peak_mb"], (lean, plain)


# ----------------------------------------------------------------------------- 15. main: flags and the tutorial


@pytest.mark.parametrize("argv,message", [
    (["--gamma", "0"], "argument --gamma: expected auto or an integer in 1..5, got '0'"),
    (["--gamma", "6"], "argument --gamma: expected auto or an integer in 1..5, got '6'"),
    (["--gamma", "fast"], "argument --gamma: expected auto or an integer in 1..5, got 'fast'"),
    (["--group-size", "1"], "argument --group-size: must be in 2..65536, got 1"),
    (["--rl-steps", "0"], "argument --rl-steps: must be in 1..10000000, got 0"),
    (["--kl-coef", "-0.1"], "argument --kl-coef: must be in [0, 1e+06], got -0.1"),
    (["--kl-coef", "inf"], "argument --kl-coef: must be a finite number, got inf"),
    (["--kl-coef", "nan"], "argument --kl-coef: must be a finite number, got nan"),
    (["--entropy-coef=-inf"], "argument --entropy-coef: must be a finite number, got -inf"),
    (["--temperature", "0"], "argument --temperature: must be in (0, 100], got 0"),
    (["--mtp-ce-warmup", "nan"], "argument --mtp-ce-warmup: must be a finite number, got nan"),
    (["--sft-steps", "abc"], "argument --sft-steps: expected an integer, got 'abc'"),
    (["--batch-size", str(10**20)], "argument --batch-size: must be in 1..65536, got 100000000000000000000"),
    (["--seed", "-1"], "argument --seed: must be in 0..9223372036854775807, got -1"),
    (["--seed", str(2**64)], "argument --seed: must be in 0..9223372036854775807"),
    (["--mtp-loss", "mse"], "argument --mtp-loss: invalid choice: 'mse'"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--rollout", "beam"], "argument --rollout: invalid choice: 'beam'"),
    (["--resume", "--overwrite"], "choose one"),
])
def test_bad_arguments_get_one_clear_line(capsys, argv, message):
    with pytest.raises(SystemExit):
        bebop.parse_args(argv)
    err = capsys.readouterr().err
    assert message in err and "invalid check value" not in err and "Traceback" not in err


def test_help_shows_defaults_presets_and_spells_out_the_rules(capsys):
    with pytest.raises(SystemExit):
        bebop.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("rejection sampling", "target-only", "k3 estimate", "(default: 1337)", "smoke test",
                 "6 layers x d=96", "seed of the initial weights"):
        assert text in out, text


def test_flags_come_from_train_config():
    """Every TrainConfig field is a flag; a flag left out takes the preset's value or TrainConfig's; one given
    wins over both."""
    for f in bebop.fields(bebop.TrainConfig):
        assert f.name in bebop.FLAGS, f"no flag for TrainConfig.{f.name}"
        assert getattr(bebop.parse_args([]), f.name) is None
    tc = bebop.configure(bebop.parse_args(["--preset", "tiny"]))[0]
    assert tc.sft_steps == bebop.PRESETS["tiny"]["sft_steps"] and tc.clip_eps == bebop.TrainConfig.clip_eps
    tc = bebop.configure(bebop.parse_args(["--preset", "tiny", "--sft-steps", "7", "--clip-eps", "0.3",
                                           "--gamma", "2", "--no-cuda-graphs"]))[0]
    assert (tc.sft_steps, tc.clip_eps, tc.gamma, tc.cuda_graphs) == (7, 0.3, 2, False)
    assert bebop.configure(bebop.parse_args([]))[0] == bebop.TrainConfig(preset="cpu") or torch.cuda.is_available()


def test_too_many_rollouts_per_step_get_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bebop.main(["--preset", "tiny", "--rl-prompts", "65536", "--group-size", "4", "--out", str(tmp_path)])
    assert str(e.value).startswith("bebop: error: --rl-prompts 65536 x --group-size 4") and "\n" not in str(e.value)


def test_tutorial_notebook_runs_top_to_bottom(monkeypatch):
    """Execute every code cell of tutorial.ipynb in order, with the notebook's small test sizes."""
    import os
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    monkeypatch.setenv("BEBOP_TUTORIAL_FAST", "1")
    monkeypatch.setattr(plt, "show", lambda *a, **k: plt.close("all"))
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tutorial.ipynb")
    nb = json.load(open(path))
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 10
    namespace = {"__name__": "__tutorial__"}
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        assert not source.lstrip().startswith(("%", "!")), f"cell {i} uses IPython magic"
        exec(compile(source, f"tutorial.ipynb[code cell {i}]", "exec"), namespace)
    assert set(namespace["results"]) == set(bebop.EXPERIMENTS)
    # The stored notebook is the executed full walkthrough (README says how it was made): every code cell
    # has its outputs, and the file stays small enough to read on the web.
    assert all(c.get("outputs") for c in cells), "store the notebook executed (see README)"
    assert os.path.getsize(path) < 600_000
