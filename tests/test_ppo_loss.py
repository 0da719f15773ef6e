"""ppo_loss: every backend (reference and the fused ones) against the definition -- the generic op followed by the
per-token PPO formula in autograd (ops/ppo_loss.reference_ppo_loss), evaluated on the fp64 oracle -- for the loss,
the detached logp / entropy and the gradients w.r.t. hidden and weight."""
import importlib
import math

import pytest
import torch

import oracles
from mem1_fast.ops.ppo_loss import available_backends, ppo_loss, reference_ppo_loss

ppo_mod = importlib.import_module("mem1_fast.ops.ppo_loss")  # (mem1_fast.ops.ppo_loss is also the function's name)

BACKENDS = available_backends("cpu")


def make_case(N, H, V, temperature, dtype=torch.float32, scale=1.0, seed=0):
    """Inputs with old log-probs set to logp + offsets so that the ratio lands on both sides of the clip range."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    lp, _ = oracles.logprob_entropy(hidden.double(), weight.double(), targets, temperature)
    # offsets: |d| = 0.5 clips (eps = 0.2), |d| = 0.05 stays inside; advantages of both signs
    offsets = torch.tensor([0.5, -0.5, 0.05, -0.05, 0.3, -0.3])[torch.arange(N) % 6]
    old_logp = (lp + offsets[torch.randperm(N, generator=g)].double()).float()
    advantages = torch.randn(N, generator=g)
    ref_logp = (lp + 0.3 * torch.randn(N, generator=g).double()).float()
    return hidden, weight, targets, old_logp, advantages, ref_logp


def expected(hidden, weight, targets, old_logp, advantages, ref_logp, temperature, clip_eps, entropy_coef, kl_coef,
             normalizer, g_loss, monkeypatch, token_weights=None):
    """reference_ppo_loss with the generic op replaced by the fp64 oracle: (loss, logp, ent, d_hidden, d_weight)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    with monkeypatch.context() as m:
        m.setattr(ppo_mod, "logprob_entropy", oracles.logprob_entropy)
        loss, lp, ent = reference_ppo_loss(h, w, targets, old_logp.double(), advantages.double(),
                                           None if ref_logp is None else ref_logp.double(), temperature, clip_eps,
                                           entropy_coef, kl_coef, normalizer,
                                           None if token_weights is None else token_weights.double())
    (loss * g_loss).backward()
    return loss.detach(), lp, ent, h.grad, w.grad


def loss_scale(lp, ent, old_logp, advantages, ref_logp, entropy_coef, kl_coef, normalizer):
    """Sum of the per-token terms' magnitudes / normalizer: what the loss's rounding error scales with."""
    r = torch.exp(lp.double() - old_logp.double())
    s = advantages.double().abs() * r.clamp(min=0.8) + entropy_coef * ent.double().abs()
    if ref_logp is not None:
        d = ref_logp.double() - lp.double()
        s = s + kl_coef * (torch.exp(d) - d - 1).abs()
    return (s.sum() / normalizer).item()


def run(backend, hidden, weight, targets, old_logp, advantages, ref_logp, temperature, clip_eps, entropy_coef,
        kl_coef, normalizer, g_loss, token_weights=None):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, lp, ent = ppo_loss(h, w, targets, old_logp, advantages, ref_logp, temperature, clip_eps, entropy_coef,
                             kl_coef, normalizer, token_weights=token_weights, backend=backend)
    assert not lp.requires_grad and not ent.requires_grad
    (loss * g_loss).backward()
    return loss.detach(), lp, ent, h.grad, w.grad


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


NAMES = ("loss", "logp", "entropy", "d_hidden", "d_weight")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("coefs", [(0.0, 0.0, False), (0.01, 0.1, True), (0.3, 0.0, False), (0.0, 0.5, True)],
                         ids=["pg-only", "ent+kl", "ent-only", "kl-only"])
@pytest.mark.parametrize("N,H,V", [(1, 32, 7), (37, 64, 1000), (130, 48, 9000)])
def test_matches_definition(backend, temperature, coefs, N, H, V, monkeypatch):
    entropy_coef, kl_coef, with_ref = coefs
    hidden, weight, targets, old_logp, adv, ref_logp = make_case(N, H, V, temperature)
    ref_logp = ref_logp if with_ref else None
    args = (hidden, weight, targets, old_logp, adv, ref_logp, temperature, 0.2, entropy_coef, kl_coef, 3.0 * N, -1.7)
    got = run(backend, *args)
    want = expected(*args, monkeypatch)
    scale = loss_scale(want[1], want[2], old_logp, adv, ref_logp, entropy_coef, kl_coef, 3.0 * N)
    for name, a, b in zip(NAMES, got, want):
        assert torch.isfinite(a).all(), name
        assert a.dtype == torch.float32, name
        err = ((a.double() - b).abs().max() / (scale if name == "loss" else b.abs().max().clamp(min=1.0))).item()
        assert err <= 1e-5, f"{backend} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_weights_are_one_call_of_per_trajectory_means(backend, monkeypatch):
    """seq-mean-token-mean in one call (w_t = 1 / |trajectory|, normalizer = trajectories) equals the mean over
    trajectories of separate token-mean calls, and matches the fp64 definition; without the weights it does not."""
    N, lens = 130, [11, 64, 55]
    hidden, weight, targets, old_logp, adv, ref_logp = make_case(N, 48, 9000, 0.7, seed=3)
    tw = torch.cat([torch.full((n,), 1.0 / n) for n in lens])
    args = (hidden, weight, targets, old_logp, adv, ref_logp, 0.7, 0.2, 0.01, 0.1, float(len(lens)), -1.7)
    got = run(backend, *args, token_weights=tw)
    want = expected(*args, monkeypatch, token_weights=tw)
    for name, a, b in zip(NAMES, got, want):
        assert rel_err(a, b) <= 1e-5, f"{backend} {name}"
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    total, start = 0.0, 0
    for n in lens:
        sl = slice(start, start + n)
        part, _, _ = ppo_loss(h[sl], w, targets[sl], old_logp[sl], adv[sl], ref_logp[sl], 0.7, 0.2, 0.01, 0.1,
                              float(n * len(lens)), backend=backend)
        total = total + part
        start += n
    (total * -1.7).backward()
    assert abs(total.item() - got[0].item()) <= 1e-5 * abs(total.item())
    assert rel_err(got[3], h.grad) <= 1e-5 and rel_err(got[4], w.grad) <= 1e-5
    unweighted = run(backend, *args)
    assert rel_err(unweighted[4], want[4]) > 1e-2  # negative control: the weights are seen


def test_case_exercises_both_sides_of_the_clip():
    """The cases above put tokens in all four (advantage sign) x (clipped / not clipped) cells."""
    hidden, weight, targets, old_logp, adv, _ = make_case(130, 48, 9000, 0.7)
    lp, _ = oracles.logprob_entropy(hidden, weight, targets, 0.7)
    ratio = torch.exp(lp.float() - old_logp)
    outside = (ratio - 1).abs() > 0.2
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(0.8, 1.2)
    takes_clipped = clipped > unclipped  # gradient 0 there
    for a_pos in (True, False):
        sel = (adv > 0) == a_pos
        assert (sel & outside & takes_clipped).any() and (sel & outside & ~takes_clipped).any() and (sel & ~outside).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_logp_entropy_equal_generic_op(backend):
    from mem1_fast.ops import logprob_entropy
    hidden, weight, targets, old_logp, adv, ref_logp = make_case(37, 64, 1000, 0.7)
    _, lp, ent = ppo_loss(hidden, weight, targets, old_logp, adv, ref_logp, 0.7, 0.2, 0.01, 0.1, backend=backend)
    lp2, ent2 = logprob_entropy(hidden, weight, targets, 0.7, backend="reference")
    assert rel_err(lp, lp2) <= 1e-6 and rel_err(ent, ent2) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(backend, dtype, monkeypatch):
    hidden, weight, targets, old_logp, adv, ref_logp = make_case(33, 64, 500, 1.0, dtype=dtype)
    args = (hidden, weight, targets, old_logp, adv, ref_logp, 1.0, 0.2, 0.01, 0.1, 33.0, 0.5)
    got = run(backend, *args)
    want = expected(*args, monkeypatch)
    assert got[3].dtype == dtype and got[4].dtype == dtype
    scale = loss_scale(want[1], want[2], old_logp, adv, ref_logp, 0.01, 0.1, 33.0)
    for name, a, b in zip(NAMES, got, want):
        tol = 1e-5 if name in ("loss", "logp", "entropy") else 4 * torch.finfo(dtype).eps
        err = ((a.double() - b).abs().max() / (scale if name == "loss" else b.abs().max().clamp(min=1.0))).item()
        assert err <= tol, f"{backend} {dtype} {name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_no_nan(backend):
    from mem1_fast.ops import logprob_entropy
    hidden = torch.randn(16, 32) * 1e4
    weight = torch.randn(300, 32)
    targets = torch.randint(0, 300, (16,))
    lp0, _ = logprob_entropy(hidden, weight, targets, backend="reference")  # old / ref near the policy's own logp
    old, ref = lp0 + 0.3 * torch.randn(16), lp0 + 0.3 * torch.randn(16)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss, lp, ent = ppo_loss(h, w, targets, old, torch.randn(16), ref, 1.0, 0.2, 0.01, 0.1, backend=backend)
    loss.backward()
    for x in (loss, lp, ent, h.grad, w.grad):
        assert torch.isfinite(x).all()
    assert (lp <= 0).all() and (ent >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_and_tied_embedding(backend, monkeypatch):
    """A weight that does not require grad gets none; a tied embedding accumulates the head's d_weight."""
    hidden, weight, targets, old_logp, adv, ref_logp = make_case(20, 32, 50, 1.0)
    h = hidden.clone().requires_grad_()
    loss, _, _ = ppo_loss(h, weight, targets, old_logp, adv, None, backend=backend)
    loss.backward()
    want = expected(hidden, weight, targets, old_logp, adv, None, 1.0, 0.2, 0.0, 0.0, 20.0, 1.0, monkeypatch)
    assert weight.grad is None and rel_err(h.grad, want[3]) <= 1e-5

    emb = torch.nn.Embedding(50, 32)
    torch.nn.init.normal_(emb.weight, std=0.3)
    w = emb.weight.detach().double().requires_grad_()
    with monkeypatch.context() as m:
        m.setattr(ppo_mod, "logprob_entropy", oracles.logprob_entropy)
        lp0 = oracles.logprob_entropy(w[targets] * 2, w, targets)[0].detach()
        old, ref = (lp0 + torch.tensor([0.5, -0.5, 0.05, -0.3])[torch.arange(20) % 4]).float(), lp0.float()
        loss2, _, _ = reference_ppo_loss(w[targets] * 2, w, targets, old.double(), adv.double(), ref.double(), 1.0,
                                         0.2, 0.01, 0.1, 20.0)
    loss2.backward()
    loss, _, _ = ppo_loss(emb(targets) * 2, emb.weight, targets, old, adv, ref, 1.0, 0.2, 0.01, 0.1, backend=backend)
    loss.backward()
    assert rel_err(emb.weight.grad, w.grad) <= 1e-5


def test_negative_control(monkeypatch):
    """The comparison is sharp: the same fused result is far from the definition when the clip range, the
    temperature or the upstream gradient differ, so the tests above would catch a mistake in any of them."""
    backend = BACKENDS[-1]
    hidden, weight, targets, old_logp, adv, ref_logp = make_case(37, 64, 1000, 0.7)
    base = (hidden, weight, targets, old_logp, adv, ref_logp, 0.7, 0.2, 0.01, 0.1, 37.0, -1.7)
    got = run(backend, *base)
    assert rel_err(got[3], expected(*base, monkeypatch)[3]) <= 1e-5
    for i, wrong in ((7, 10.0), (6, 1.0), (11, 1.7)):  # no clipping / temperature 1 / upstream grad sign
        args = list(base)
        args[i] = wrong
        want = expected(*args, monkeypatch)
        assert rel_err(got[3], want[3]) > 1e-2 and rel_err(got[4], want[4]) > 1e-2, f"argument {i} not seen"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_are_named(backend):
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    old, adv = torch.zeros(4), torch.ones(4)
    cases = [
        ((torch.randn(4, 8), torch.randn(10, 9), t, old, adv), {}, "hidden must be"),
        ((h, w, torch.full((4,), 10), old, adv), {}, "must lie in \\[0, 10\\)"),
        ((h, w, t, torch.zeros(3), adv), {}, "old_logp must be \\[N=4\\]"),
        ((h, w, t, old, torch.ones(4, 1)), {}, "advantages must be \\[N=4\\]"),
        ((h, w, t, old, adv), {"kl_coef": 0.1}, "kl_coef > 0 needs ref_logp"),
        ((h, w, t, old, adv), {"clip_eps": 0.0}, "clip_eps must be > 0"),
        ((h, w, t, old, adv), {"normalizer": 0.0}, "normalizer must be > 0"),
        ((h, w, t, old, adv), {"token_weights": torch.ones(5)}, "token_weights must be \\[N=4\\]"),
        ((h, w, t, old, adv), {"temperature": -1.0}, "temperature must be > 0"),
        ((h, w, t, old, adv), {"backend": "nope"}, "unknown backend"),
    ]
    for args, kw, msg in cases:
        kw = {"backend": backend, **kw}
        with pytest.raises(ValueError, match=msg):
            ppo_loss(*args, **kw)
