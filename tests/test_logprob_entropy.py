"""logprob_entropy against the fp64 oracle, values and gradients for random upstream gradients on both outputs."""
import math

import pytest
import torch

import oracles
from mem1_fast.ops import logprob_entropy
from mem1_fast.ops.logprob_entropy import available_backends

BACKENDS = available_backends("cpu")  # every backend that runs here is held to the same oracle


def check(N, H, V, temperature, backend, dtype=torch.float32, scale=1.0, tol=1e-5, device="cpu"):
    hidden = torch.randn(N, H) * scale
    weight = torch.randn(V, H) / math.sqrt(H)
    targets = torch.randint(0, V, (N,))
    g_lp, g_ent = torch.randn(N), torch.randn(N)
    h1, w1 = (x.to(device, dtype).clone().requires_grad_() for x in (hidden, weight))
    lp, ent = logprob_entropy(h1, w1, targets.to(device), temperature, backend=backend)
    ((lp * g_lp.to(device)).sum() + (ent * g_ent.to(device)).sum()).backward()
    lp, ent, dh, dw = lp.cpu(), ent.cpu(), h1.grad.cpu(), w1.grad.cpu()
    h2, w2 = (x.detach().to(dtype).double().requires_grad_() for x in (hidden, weight))
    rlp, rent = oracles.logprob_entropy(h2, w2, targets, temperature)
    ((rlp * g_lp.double()).sum() + (rent * g_ent.double()).sum()).backward()
    for name, a, b in [("logp", lp, rlp), ("entropy", ent, rent), ("d_hidden", dh, h2.grad),
                       ("d_weight", dw, w2.grad)]:
        assert torch.isfinite(a).all(), name
        rel = ((a.double() - b).abs().max() / b.abs().max().clamp(min=1.0)).item()
        # outputs are fp32 whatever the input dtype; gradients come back in the input dtype
        t = tol if name in ("logp", "entropy") or dtype == torch.float32 else 4 * torch.finfo(dtype).eps
        assert rel <= t, f"{name}: relative error {rel:.2e} > {t:.0e}"
    # invariants
    assert (lp <= 0).all() and (ent >= -1e-6).all() and (ent <= math.log(V) + 1e-5).all()
    return lp, ent


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("N,H,V", [(1, 32, 7), (37, 64, 1000), (130, 48, 9000)])
def test_matches_oracle(backend, temperature, N, H, V):
    check(N, H, V, temperature, backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,H,V", [(37, 64, 1000), (300, 1024, 32003)])
def test_cuda_backends_match_oracle(backend, dtype, N, H, V):
    if backend not in available_backends("cuda"):
        pytest.skip(f"the {backend!r} backend is not available on this CUDA machine")
    check(N, H, V, 0.7, backend, dtype=dtype, device="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_inputs(backend):
    check(33, 64, 500, 1.0, backend, dtype=torch.float16, tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_no_nan(backend):
    hidden = torch.randn(16, 32) * 1e4
    weight = torch.randn(300, 32)
    lp, ent = logprob_entropy(hidden.requires_grad_(), weight.requires_grad_(), torch.randint(0, 300, (16,)),
                              backend=backend)
    (lp.sum() + ent.sum()).backward()
    for x in (lp, ent, hidden.grad, weight.grad):
        assert torch.isfinite(x).all()
    assert (lp <= 0).all() and (ent >= 0).all()


def test_tied_embedding_gradients_accumulate():
    """The LM head shares the embedding: the op's d_weight adds to the embedding's gradient."""
    emb = torch.nn.Embedding(50, 32)
    torch.nn.init.normal_(emb.weight, std=0.3)
    ids = torch.randint(0, 50, (9,))
    h = emb(ids) * 2
    lp, ent = logprob_entropy(h, emb.weight, ids)
    (lp.sum() + ent.sum()).backward()
    g = emb.weight.grad.clone()
    emb.weight.grad = None
    z = (emb(ids) * 2) @ emb.weight.T
    ref_lp = torch.log_softmax(z, -1).gather(1, ids[:, None])[:, 0]
    p = torch.softmax(z, -1)
    (ref_lp.sum() + (-(p * torch.log_softmax(z, -1)).sum(-1)).sum()).backward()
    assert (g - emb.weight.grad).abs().max() <= 1e-5 * emb.weight.grad.abs().max()


def test_only_one_output_used():
    hidden, weight, t = torch.randn(5, 16, requires_grad=True), torch.randn(20, 16), torch.randint(0, 20, (5,))
    lp, _ = logprob_entropy(hidden, weight, t)
    lp.sum().backward()
    h2 = hidden.detach().double().requires_grad_()
    oracles.logprob_entropy(h2, weight, t)[0].sum().backward()
    assert torch.allclose(hidden.grad.double(), h2.grad, atol=1e-6)


def test_negative_control_temperature_matters():
    hidden, weight, t = torch.randn(5, 16), torch.randn(20, 16), torch.randint(0, 20, (5,))
    lp, _ = logprob_entropy(hidden, weight, t, 0.7)
    rlp, _ = oracles.logprob_entropy(hidden, weight, t, 1.0)
    assert (lp.double() - rlp).abs().max() > 1e-3


@pytest.mark.parametrize("args,msg", [
    ((torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long)), "hidden must be"),
    ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long)), "targets must be \\[N=4\\]"),
    ((torch.randn(4, 8), torch.randn(10, 8), torch.full((4,), 10)), "must lie in \\[0, 10\\)"),
    ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4)), "integer ids"),
])
def test_bad_inputs_are_named(args, msg):
    with pytest.raises(ValueError, match=msg):
        logprob_entropy(*args)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        logprob_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), 0.0)
