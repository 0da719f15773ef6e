"""C++ CPU backend of logprob_entropy / ppo_loss (csrc/cpu/logprob_entropy.cpp): the paths the generic tests do not
reach -- every compiled ISA body, tile shapes that split rows and vocabulary (the online max/sum merge, partial
tiles, several row blocks / chunks), the fp16/bf16 conversion paths, mixed and fp64 dtypes, one gradient only,
N = 0, non-contiguous inputs, and the op's own input checks. Values are held to the fp64 oracle."""
import math

import pytest
import torch

import oracles
from mem1_fast.ops import _cpp_logprob_entropy as le

pytestmark = pytest.mark.skipif(not le.available("cpu"), reason="the C++ extension does not load here")

ISAS = {"generic": 0, "avx2": 1, "avx512": 2}
BEST = le.kernel_isa(torch.float32) if le.available("cpu") else "generic"
ISA_LIST = [v for k, v in ISAS.items() if v <= ISAS[BEST]]
TILES = [(0, 0), (16, 100), (5, 16), (64, 333)]  # (rows, cols): automatic, and tiles cutting rows and vocabulary


def op():
    return torch.ops.mem1_fast


def rel(a, b, floor=1.0):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=floor)).item()


def grad_tol(dtype):
    return 1e-5 if dtype in (torch.float32, torch.float64) else 4 * torch.finfo(dtype).eps


def oracle_grads(h, w, t, tau, g_lp, g_ent):
    h2, w2 = h.detach().double().clone().requires_grad_(), w.detach().double().clone().requires_grad_()
    lp, ent = oracles.logprob_entropy(h2, w2, t, tau)
    ((lp * g_lp.double()).sum() + (ent * g_ent.double()).sum()).backward()
    return lp.detach(), ent.detach(), h2.grad, w2.grad


def ppo_oracle(h, w, t, old, adv, ref, tau, eps, ce, ck, norm):
    h2, w2 = h.detach().double().clone().requires_grad_(), w.detach().double().clone().requires_grad_()
    lp, ent = oracles.logprob_entropy(h2, w2, t, tau)
    r = torch.exp(lp - old.double())
    a = adv.double()
    tok = torch.maximum(-a * r, -a * r.clamp(1 - eps, 1 + eps)) - ce * ent
    d = ref.double() - lp
    tok = tok + ck * (torch.exp(d) - d - 1)
    loss = tok.sum() / norm
    loss.backward()
    return loss.detach(), tok.detach().abs().sum() / norm, h2.grad, w2.grad


@pytest.mark.parametrize("isa", ISA_LIST, ids=[k for k, v in ISAS.items() if v in ISA_LIST])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("tile", TILES, ids=["auto", "16x100", "5x16", "64x333"])
def test_every_isa_tile_and_dtype(isa, dtype, tile):
    torch.manual_seed(1)
    N, H, V, tau = 70, 48, 1000, 0.7
    h = torch.randn(N, H).to(dtype)
    w = (torch.randn(V, H) / math.sqrt(H)).to(dtype)
    t = torch.randint(0, V, (N,))
    g_lp, g_ent = torch.randn(N), torch.randn(N)
    lp, ent, lse, ez = op().logprob_entropy_fwd(h, w, t, tau, *tile, isa)
    dh, dw = op().logprob_entropy_bwd(g_lp, g_ent, h, w, t, lse, ez, tau, True, True, *tile, isa)
    rlp, rent, rdh, rdw = oracle_grads(h, w, t, tau, g_lp, g_ent)
    out_dt = torch.float64 if dtype == torch.float64 else torch.float32
    assert lp.dtype == ent.dtype == out_dt and dh.dtype == dw.dtype == dtype
    assert rel(lp, rlp) <= 1e-5 and rel(ent, rent) <= 1e-5
    assert rel(dh, rdh) <= grad_tol(dtype) and rel(dw, rdw) <= grad_tol(dtype)

    old = (rlp + 0.4 * torch.randn(N).double()).float()
    ref = (rlp + 0.3 * torch.randn(N).double()).float()
    adv = torch.randn(N)
    loss, flp, fent, fdh, fdw = op().ppo_loss_fused(h, w, t, old, adv, ref, tau, 0.2, 0.01, 0.1, 2.0 * N, True, True,
                                                    *tile, isa)
    rloss, scale, rdh, rdw = ppo_oracle(h, w, t, old, adv, ref, tau, 0.2, 0.01, 0.1, 2.0 * N)
    assert abs(loss.item() - rloss.item()) <= 1e-5 * scale.item()
    assert torch.equal(flp, lp) or rel(flp, rlp) <= 1e-5
    assert rel(fent, rent) <= 1e-5
    assert rel(fdh, rdh) <= grad_tol(dtype) and rel(fdw, rdw) <= grad_tol(dtype)


def test_isa_names():
    names = {op().logprob_entropy_cpu_isa(torch.empty(0), i) for i in ISA_LIST}
    assert names == {k for k, v in ISAS.items() if v in ISA_LIST}
    assert op().logprob_entropy_cpu_isa(torch.empty(0, dtype=torch.float64)) == "generic"
    if ISAS[BEST] < 2:
        with pytest.raises(RuntimeError, match="not available"):
            op().logprob_entropy_fwd(torch.randn(2, 4), torch.randn(3, 4), torch.zeros(2, dtype=torch.long), 1.0,
                                     0, 0, ISAS[BEST] + 1)


@pytest.mark.parametrize("isa", ISA_LIST)
@pytest.mark.parametrize("tile", [(0, 0), (4, 64)])
def test_extreme_logits_values(isa, tile):
    """+-1e4-scale logits over several vocabulary tiles (the online max merge): exact-ish values, no NaN, no
    overflow, and only the arg-max-ish entries carry gradient."""
    torch.manual_seed(2)
    N, H, V = 16, 32, 300
    h = torch.randn(N, H) * 1e4
    w = torch.randn(V, H)
    t = torch.randint(0, V, (N,))
    g_lp, g_ent = torch.randn(N), torch.randn(N)
    lp, ent, lse, ez = op().logprob_entropy_fwd(h, w, t, 1.0, *tile, isa)
    dh, dw = op().logprob_entropy_bwd(g_lp, g_ent, h, w, t, lse, ez, 1.0, True, True, *tile, isa)
    rlp, rent, rdh, rdw = oracle_grads(h, w, t, 1.0, g_lp, g_ent)
    for x in (lp, ent, dh, dw):
        assert torch.isfinite(x).all()
    assert (lp <= 0).all() and (ent >= 0).all()
    assert rel(lp, rlp) <= 1e-5 and (ent.double() - rent).abs().max() <= 1e-4
    assert rel(dh, rdh) <= 1e-4 and rel(dw, rdw) <= 1e-4


@pytest.mark.parametrize("hd,wd", [(torch.float32, torch.bfloat16), (torch.float16, torch.float32),
                                   (torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_mixed_dtypes(hd, wd):
    torch.manual_seed(3)
    N, H, V = 21, 32, 257
    h, w = torch.randn(N, H).to(hd), (torch.randn(V, H) / math.sqrt(H)).to(wd)
    t = torch.randint(0, V, (N,))
    g_lp, g_ent = torch.randn(N), torch.randn(N)
    lp, ent, lse, ez = op().logprob_entropy_fwd(h, w, t, 1.3, 8, 100)
    dh, dw = op().logprob_entropy_bwd(g_lp, g_ent, h, w, t, lse, ez, 1.3, True, True, 8, 100)
    rlp, rent, rdh, rdw = oracle_grads(h, w, t, 1.3, g_lp, g_ent)
    assert dh.dtype == hd and dw.dtype == wd
    assert lp.dtype == (torch.float64 if torch.float64 in (hd, wd) else torch.float32)
    assert rel(lp, rlp) <= 1e-5 and rel(ent, rent) <= 1e-5
    assert rel(dh, rdh) <= grad_tol(hd) and rel(dw, rdw) <= grad_tol(wd)


def test_one_gradient_or_one_output():
    torch.manual_seed(4)
    N, H, V = 19, 16, 90
    h, w, t = torch.randn(N, H), torch.randn(V, H), torch.randint(0, V, (N,))
    g = torch.randn(N)
    _, _, lse, ez = op().logprob_entropy_fwd(h, w, t, 1.0)
    dh_all, dw_all = op().logprob_entropy_bwd(g, None, h, w, t, lse, ez, 1.0, True, True)
    dh, dw = op().logprob_entropy_bwd(g, None, h, w, t, lse, ez, 1.0, True, False)
    assert dw is None and torch.allclose(dh, dh_all, atol=0)
    dh, dw = op().logprob_entropy_bwd(g, None, h, w, t, lse, ez, 1.0, False, True)
    assert dh is None and torch.allclose(dw, dw_all, atol=0)
    _, _, rdh, rdw = oracle_grads(h, w, t, 1.0, g, torch.zeros(N))
    assert rel(dh_all, rdh) <= 1e-5 and rel(dw_all, rdw) <= 1e-5
    dh, dw = op().logprob_entropy_bwd(None, None, h, w, t, lse, ez, 1.0, True, True)
    assert (dh == 0).all() and (dw == 0).all()
    # the backend module's interface (what the front calls)
    lp, ent, saved = le.forward(h, w, t, 1.0)
    dh, dw = le.backward(None, g, h, w, t, 1.0, saved, True, False)
    _, _, rdh, _ = oracle_grads(h, w, t, 1.0, torch.zeros(N), g)
    assert dw is None and rel(dh, rdh) <= 1e-5
    out = op().ppo_loss_fused(h, w, t, lp, g, None, 1.0, 0.2, 0.0, 0.0, 1.0, False, False)
    assert out[3] is None and out[4] is None and torch.isfinite(out[0])


def test_empty_batch():
    h, w, t = torch.randn(0, 8), torch.randn(10, 8), torch.zeros(0, dtype=torch.long)
    lp, ent, lse, ez = op().logprob_entropy_fwd(h, w, t, 1.0)
    assert lp.shape == ent.shape == (0,)
    dh, dw = op().logprob_entropy_bwd(torch.zeros(0), torch.zeros(0), h, w, t, lse, ez, 1.0, True, True)
    assert dh.shape == (0, 8) and dw.shape == (10, 8) and (dw == 0).all()
    loss, lp, ent, dh, dw = op().ppo_loss_fused(h, w, t, torch.zeros(0), torch.zeros(0), None, 1.0, 0.2, 0.0, 0.0,
                                                1.0, True, True)
    assert loss.item() == 0 and dh.shape == (0, 8) and (dw == 0).all()


def test_non_contiguous_inputs():
    torch.manual_seed(5)
    N, H, V = 12, 24, 77
    h = torch.randn(H, N).T  # transposed view
    w = torch.randn(V, 2 * H)[:, ::2]  # strided view
    t = torch.randint(0, V, (2 * N,))[::2]
    g_lp, g_ent = torch.randn(N), torch.randn(N)
    lp, ent, lse, ez = op().logprob_entropy_fwd(h, w, t, 1.0, 5, 16)
    dh, dw = op().logprob_entropy_bwd(g_lp, g_ent, h, w, t, lse, ez, 1.0, True, True, 5, 16)
    rlp, rent, rdh, rdw = oracle_grads(h, w, t, 1.0, g_lp, g_ent)
    assert rel(lp, rlp) <= 1e-5 and rel(ent, rent) <= 1e-5 and rel(dh, rdh) <= 1e-5 and rel(dw, rdw) <= 1e-5


def test_op_input_checks():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    fwd = op().logprob_entropy_fwd
    with pytest.raises(RuntimeError, match="hidden must be \\[N, H\\] and weight \\[V, H\\]"):
        fwd(h, torch.randn(10, 9), t, 1.0)
    with pytest.raises(RuntimeError, match="targets must be int64"):
        fwd(h, w, t.int(), 1.0)
    with pytest.raises(RuntimeError, match="targets must be \\[N=4\\]"):
        fwd(h, w, t[:3], 1.0)
    with pytest.raises(RuntimeError, match="must lie in \\[0, 10\\), got 10 at row 2"):
        fwd(h, w, torch.tensor([0, 1, 10, 3]), 1.0)
    with pytest.raises(RuntimeError, match="must lie in \\[0, 10\\), got -1"):
        fwd(h, w, torch.tensor([0, -1, 1, 3]), 1.0)
    with pytest.raises(RuntimeError, match="temperature must be > 0"):
        fwd(h, w, t, 0.0)
    with pytest.raises(RuntimeError, match="float32/float16/bfloat16/float64"):
        fwd(h.int(), w, t, 1.0)
    _, _, lse, ez = fwd(h, w, t, 1.0)
    with pytest.raises(RuntimeError, match="g_logp must be \\[N=4\\]"):
        op().logprob_entropy_bwd(torch.zeros(5), None, h, w, t, lse, ez, 1.0, True, True)
    with pytest.raises(RuntimeError, match="lse must be \\[N=4\\]"):
        op().logprob_entropy_bwd(None, None, h, w, t, lse[:2], ez, 1.0, True, True)
    ppo = op().ppo_loss_fused
    z, o = torch.zeros(4), torch.ones(4)
    with pytest.raises(RuntimeError, match="kl_coef != 0 needs ref_logp"):
        ppo(h, w, t, z, o, None, 1.0, 0.2, 0.0, 0.1, 4.0)
    with pytest.raises(RuntimeError, match="clip_eps must be > 0"):
        ppo(h, w, t, z, o, None, 1.0, 0.0, 0.0, 0.0, 4.0)
    with pytest.raises(RuntimeError, match="normalizer must be > 0"):
        ppo(h, w, t, z, o, None, 1.0, 0.2, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="advantages must be \\[N=4\\]"):
        ppo(h, w, t, z, torch.ones(3), None, 1.0, 0.2, 0.0, 0.0, 4.0)


def test_called_with_tensors_that_require_grad():
    """Called outside the autograd Function (grad mode on, inputs requiring grad), the op still computes."""
    h, w = torch.randn(3, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    t = torch.tensor([1, 2, 3])
    lp, ent, lse, ez = op().logprob_entropy_fwd(h, w, t, 1.0)
    dh, dw = op().logprob_entropy_bwd(torch.ones(3), None, h, w, t, lse, ez, 1.0, True, True)
    _, _, rdh, rdw = oracle_grads(h, w, t, 1.0, torch.ones(3), torch.zeros(3))
    assert rel(dh, rdh) <= 1e-5 and rel(dw, rdw) <= 1e-5
