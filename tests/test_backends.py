"""Every registered backend of every op implements the op's `Backend` protocol (the same functions, the same leading
parameters, the declared attributes), and every one available here computes what the op's fp64 reference computes,
forward and backward. A new backend is checked by registering it: nothing here names one."""
import importlib
import inspect

import pytest
import torch

from mem1_fast.visibility import Visibility

# the front modules (mem1_fast.ops re-exports each op's function under the module's name, hence import_module)
sa, le, pl, pam = (importlib.import_module(f"mem1_fast.ops.{op}")
                   for op in ("state_attention", "logprob_entropy", "ppo_loss", "paged_attention"))

FRONTS = {"state_attention": sa, "logprob_entropy": le, "ppo_loss": pl, "paged_attention": pam}
CASES = [(op, name) for op, front in FRONTS.items() for name in front.BACKENDS]


def _protocol_members(proto):
    methods = {n: v for n, v in vars(proto).items() if callable(v) and not n.startswith("_")}
    attrs = [n for n in getattr(proto, "__annotations__", {})]
    return methods, attrs


@pytest.mark.parametrize("op,name", CASES, ids=[f"{o}-{n}" for o, n in CASES])
def test_backend_implements_the_protocol(op, name):
    front = FRONTS[op]
    try:
        mod = front.backend_module(name)
    except ImportError as e:  # e.g. a Triton that does not import here
        pytest.skip(f"{op}/{name} does not import here: {e}")
    assert isinstance(mod, front.Backend), f"{op}/{name} lacks part of {front.Backend.__name__}"
    methods, attrs = _protocol_members(front.Backend)
    assert methods, "the protocol lists no function"
    for meth, proto_fn in methods.items():
        want = list(inspect.signature(proto_fn).parameters)[1:]  # without self
        got = inspect.signature(getattr(mod, meth)).parameters
        names = list(got)
        assert len(names) >= len(want), f"{op}/{name}.{meth}{tuple(names)} takes fewer arguments than {want}"
        assert names[:len(want)] == want, f"{op}/{name}.{meth}{tuple(names)} does not start with {tuple(want)}"
        extra = [p for p in list(got.values())[len(want):] if p.default is inspect.Parameter.empty
                 and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert not extra, f"{op}/{name}.{meth}: extra arguments without defaults {[p.name for p in extra]}"
    for a in attrs:
        assert hasattr(mod, a), f"{op}/{name} lacks {a}"


def test_protocol_check_has_teeth():
    """Negative control: a module missing `backward` is not a state_attention Backend."""
    class Half:
        available = staticmethod(lambda device: True)
        tile_sizes = staticmethod(lambda q: (64, 64))
        forward = staticmethod(lambda q, k, v, vis, scale, BM, BN: None)
    assert not isinstance(Half, sa.Backend)


# --- behaviour: every backend available here against the fp64 reference -------------------------------------------
def _available(front):
    return [n for n in front.available_backends("cpu") if n != "reference"]


def _vis(T):
    lo = torch.zeros(T, 1, dtype=torch.int32)
    lo[T // 2:, 0] = T // 3
    return Visibility(lo, torch.arange(1, T + 1, dtype=torch.int32)[:, None]).validate()


@pytest.mark.parametrize("name", _available(sa))
def test_state_attention_backend_matches_the_reference(name):
    torch.manual_seed(11)
    vis = _vis(40)
    q, k, v = (torch.randn(40, h, 32, requires_grad=True) for h in (4, 2, 2))
    out = sa.state_attention(q, k, v, vis, backend=name)
    g = torch.autograd.grad((out * out.detach().sin()).sum(), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = sa.state_attention(q64, k64, v64, vis, backend="reference")
    g_ref = torch.autograd.grad((ref * out.detach().double().sin()).sum(), (q64, k64, v64))
    assert (out.double() - ref).abs().max() < 1e-4
    assert all((a.double() - b).abs().max() < 1e-4 for a, b in zip(g, g_ref))


@pytest.mark.parametrize("name", _available(le))
def test_logprob_entropy_backend_matches_the_reference(name):
    torch.manual_seed(12)
    h, w = torch.randn(13, 16, requires_grad=True), torch.randn(70, 16, requires_grad=True)
    t = torch.randint(0, 70, (13,))
    lp, ent = le.logprob_entropy(h, w, t, 0.8, backend=name)
    g = torch.autograd.grad((lp * 0.3 - ent).sum(), (h, w))
    h64, w64 = (x.detach().double().requires_grad_() for x in (h, w))
    lp_r, ent_r = le.logprob_entropy(h64, w64, t, 0.8, backend="reference")
    g_ref = torch.autograd.grad((lp_r * 0.3 - ent_r).sum(), (h64, w64))
    assert (lp.double() - lp_r).abs().max() < 1e-4 and (ent.double() - ent_r).abs().max() < 1e-4
    assert all((a.double() - b).abs().max() < 1e-4 for a, b in zip(g, g_ref))


@pytest.mark.parametrize("name", _available(pl))
def test_ppo_loss_backend_matches_the_reference(name):
    torch.manual_seed(13)
    h, w = torch.randn(13, 16, requires_grad=True), torch.randn(70, 16, requires_grad=True)
    t, adv = torch.randint(0, 70, (13,)), torch.randn(13)
    with torch.no_grad():
        old = le.logprob_entropy(h, w, t, backend="reference")[0] + 0.3 * torch.randn(13)
    kw = dict(ref_logp=old - 0.1, entropy_coef=0.01, kl_coef=0.05, token_weights=torch.rand(13))
    loss, _, _ = pl.ppo_loss(h, w, t, old, adv, backend=name, **kw)
    g = torch.autograd.grad(loss, (h, w))
    h64, w64 = (x.detach().double().requires_grad_() for x in (h, w))
    loss_r, _, _ = pl.ppo_loss(h64, w64, t, old, adv, backend="reference", **kw)
    g_ref = torch.autograd.grad(loss_r, (h64, w64))
    assert abs(float(loss.detach()) - float(loss_r.detach())) < 1e-5
    assert all((a.double() - b).abs().max() < 1e-5 for a, b in zip(g, g_ref))


@pytest.mark.parametrize("name", _available(pam))
def test_paged_attention_backend_matches_the_reference(name):
    torch.manual_seed(14)
    kc, vc = torch.randn(6, 4, 1, 8), torch.randn(6, 4, 1, 8)
    table = torch.tensor([[0, 2, -1], [1, 3, 4]], dtype=torch.int32)
    seq = torch.tensor([0, 1, 1], dtype=torch.int32)
    lo = torch.tensor([[0, 0], [2, 9], [0, 0]], dtype=torch.int32)
    hi = torch.tensor([[7, 0], [6, 11], [11, 0]], dtype=torch.int32)
    q = torch.randn(3, 2, 8)
    out = pam.paged_attention(q, kc, vc, table, seq, lo, hi, backend=name)
    ref = pam.paged_attention(q.double(), kc.double(), vc.double(), table, seq, lo, hi, backend="reference")
    assert (out.double() - ref).abs().max() < 1e-5
