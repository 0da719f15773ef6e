"""fp64 dense oracles, used only by tests: the plain definitions, no chunking, no cleverness."""
import math

import torch


def attention(q, k, v, mask, scale=None):
    """q [T,Hq,D], k/v [T,Hkv,D], mask [T,T] bool. Rows with no visible key give 0 output and -inf lse."""
    q, k, v = q.double(), k.double(), v.double()
    T, Hq, D = q.shape
    g = Hq // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = 1 / math.sqrt(D) if scale is None else scale
    s = torch.einsum("thd,uhd->htu", q, k) * scale
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.where(mask, torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None]), 0)
    return torch.einsum("htu,uhd->thd", p, v), lse


def assert_attention_matches(q, k, v, go, vis, out, lse, grads, tol):
    """A backend's out, lse and (dq, dk, dv) at inputs q, k, v with upstream gradient go, against attention() on
    vis.dense() in fp64: every value finite, max abs error <= tol, -inf lse exactly where the oracle has it."""
    q2, k2, v2 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = attention(q2, k2, v2, vis.dense())
    (ref * go.double()).sum().backward()
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, q2.grad, k2.grad, v2.grad)):
        assert torch.isfinite(a).all(), name
        err = (a.double() - b).abs().max().item()
        assert err <= tol, f"{name}: max error {err:.2e} > {tol:.0e}"
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (lse[fin].double() - ref_lse[fin]).abs().max() <= tol


def logprob_entropy(hidden, weight, targets, temperature=1.0):
    z = hidden.double() @ weight.double().T / temperature
    logp_all = torch.log_softmax(z, -1)
    p = logp_all.exp()
    return logp_all.gather(1, targets[:, None])[:, 0], -(p * logp_all).sum(-1)


def logprob_case(N, H, V, dtype=torch.float32, scale=1.0, seed=0, wdtype=None):
    """Random (hidden [N, H], weight [V, H], targets [N], g_logp [N], g_entropy [N]) for logprob_entropy tests."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(wdtype or dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, targets, torch.randn(N, generator=g), torch.randn(N, generator=g)
