"""state_attention against the fp64 dense oracle, forward and all three gradients."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oracles
from mem1_fast.consolidation import MODES, pack
from mem1_fast.ops import state_attention
from mem1_fast.ops.state_attention import available_backends
from mem1_fast.visibility import Visibility
from test_visibility import trajectories

BACKENDS = available_backends("cpu")  # every backend that runs on this machine is held to the same oracle


def run(q, k, v, vis, backend, dtype):
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out, lse = state_attention(q, k, v, vis, return_lse=True, backend=backend)
    return q, k, v, out, lse


def check_against_oracle(vis, Hq, Hkv, D, backend, dtype=torch.float32, tol=1e-4):
    T = vis.T
    q, k, v = torch.randn(T, Hq, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    go = torch.randn(T, Hq, D)
    q1, k1, v1, out, lse = run(q, k, v, vis, backend, dtype)
    (out.float() * go).sum().backward()
    oracles.assert_attention_matches(q, k, v, go, vis, out, lse, (q1.grad, k1.grad, v1.grad), tol)


@settings(max_examples=25, deadline=None)
@given(st.lists(trajectories(), min_size=1, max_size=4), st.sampled_from(MODES),
       st.sampled_from([(2, 2), (4, 2), (4, 1)]), st.sampled_from([32, 64]))
def test_reference_matches_oracle_on_mode_specs(trajs, mode, heads, D):
    vis = pack(trajs, mode)[0].visibility
    for backend in BACKENDS:
        check_against_oracle(vis, *heads, D, backend)


def test_single_token_and_empty_rows():
    """Rows with no visible key: output 0, lse -inf, zero gradients, no NaN anywhere."""
    lo = torch.tensor([[0, 0], [0, 0], [1, 0], [0, 0], [2, 0]], dtype=torch.int32)
    hi = torch.tensor([[1, 0], [0, 0], [3, 0], [0, 0], [5, 0]], dtype=torch.int32)
    vis = Visibility(lo, hi).validate()
    for backend in BACKENDS:
        check_against_oracle(vis, 2, 1, 32, backend)
        q, k, v, out, lse = run(torch.randn(5, 2, 32), torch.randn(5, 1, 32), torch.randn(5, 1, 32), vis, backend,
                                torch.float32)
        out.sum().backward()
        assert (out[[1, 3]] == 0).all() and torch.isinf(lse[:, [1, 3]]).all()
        assert (q.grad[[1, 3]] == 0).all()


def test_nan_in_keys_a_row_cannot_see():
    """NaN in K/V of another trajectory must not reach this trajectory's rows."""
    trajs = [pack_traj(6, 3), pack_traj(5, 4)]
    b = pack(trajs, "retain")[0]
    T, L0 = b.num_tokens, int(b.cu_seqlens[1])
    q, k, v = torch.randn(T, 2, 32), torch.randn(T, 2, 32), torch.randn(T, 2, 32)
    k2, v2 = k.clone(), v.clone()
    k2[L0:], v2[L0:] = math.nan, math.nan
    for backend in BACKENDS:
        a = state_attention(q, k, v, b.visibility, backend=backend)[:L0]
        c = state_attention(q, k2, v2, b.visibility, backend=backend)[:L0]
        assert torch.equal(a, c)


def pack_traj(q, n):
    from mem1_fast.trajectory import Trajectory
    return Trajectory.from_triples([("PROMPT", 0, [3] * q), ("STATE", 0, [4] * n), ("ACTION", 0, [5] * n)])


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_half_precision_inputs(dtype, tol):
    vis = pack([pack_traj(9, 7), pack_traj(4, 12)], "recompute")[0].visibility
    for backend in BACKENDS:
        check_against_oracle(vis, 4, 2, 64, backend, dtype=dtype, tol=tol)


def test_oracle_negative_control():
    """A wrong visibility (causal instead of the mode's) must fail the comparison."""
    b = pack([pack_traj(6, 5)] * 2, "retain")[0]
    T = b.num_tokens
    causal = Visibility(torch.zeros(T, 1, dtype=torch.int32), torch.arange(1, T + 1, dtype=torch.int32)[:, None])
    q, k, v = torch.randn(T, 2, 32), torch.randn(T, 2, 32), torch.randn(T, 2, 32)
    out = state_attention(q, k, v, causal)
    ref, _ = oracles.attention(q, k, v, b.visibility.dense())
    assert (out.double() - ref).abs().max() > 1e-2


@pytest.mark.parametrize("bad,msg", [
    (lambda q, k, v, vis: (q[:, :, :16], k, v, vis), "must be \\[T="),
    (lambda q, k, v, vis: (q[:, :3], k, v, vis), "multiple of key/value heads"),
    (lambda q, k, v, vis: (q, k.double(), v, vis), "share a float dtype"),
    (lambda q, k, v, vis: (q[:-1], k[:-1], v[:-1], vis), "visibility covers"),
    (lambda q, k, v, vis: (q[0], k, v, vis), "must be \\[T, H, D\\]"),
])
def test_bad_inputs_are_named(bad, msg):
    vis = pack([pack_traj(3, 3)], "retain")[0].visibility
    T = vis.T
    args = bad(torch.randn(T, 4, 32), torch.randn(T, 2, 32), torch.randn(T, 2, 32), vis)
    with pytest.raises(ValueError, match=msg):
        state_attention(*args)
    with pytest.raises(ValueError, match="unknown backend"):
        state_attention(torch.randn(T, 4, 32), torch.randn(T, 2, 32), torch.randn(T, 2, 32), vis, backend="nope")


def test_nan_in_keys_of_the_same_trajectory():
    """NaN placed in turn-0 keys: rows of later turns that cannot see turn 0 stay finite and unchanged (values
    and gradients); rows that can see it become NaN, as the definition says."""
    t = pack_traj(4, 6)
    from mem1_fast.trajectory import Trajectory
    t = Trajectory.from_triples([("PROMPT", 0, [3] * 4), ("STATE", 0, [4] * 6), ("OBS", 0, [6] * 5),
                                 ("STATE", 1, [4] * 6), ("OBS", 1, [6] * 5), ("ACTION", 2, [5] * 7)])
    b = pack([t], "recompute")[0]
    T = b.num_tokens
    dense = b.visibility.dense()
    bad_cols = torch.arange(4, 10)  # turn-0 generation in block B_0
    blind = ~dense[:, bad_cols].any(1)
    assert blind.sum() > 5 and (~blind).sum() > 5
    q, k, v = torch.randn(T, 2, 32), torch.randn(T, 2, 32), torch.randn(T, 2, 32)
    k2, v2 = k.clone(), v.clone()
    k2[bad_cols], v2[bad_cols] = math.nan, math.nan
    for backend in BACKENDS:
        outs, grads = [], []
        for kk, vv in ((k, v), (k2, v2)):
            qq = q.clone().requires_grad_()
            o = state_attention(qq, kk, vv, b.visibility, backend=backend)
            o[blind].sum().backward()
            outs.append(o.detach())
            grads.append(qq.grad)
        assert torch.equal(outs[0][blind], outs[1][blind])
        assert torch.isnan(outs[1][~blind]).all()
        assert torch.equal(grads[0][blind], grads[1][blind])
