"""Triton backend of state_attention: tile paths, GQA, strides, non-finite K/V, determinism (under the interpreter,
TRITON_INTERPRET=1, set by conftest.py), and GPU readiness without a GPU: the kernels compile for sm_80 and sm_90a
with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, in a subprocess without
TRITON_INTERPRET (the decorators read it at import), with registers / spills / shared memory printed per kernel
(`pytest -s` to see the table) and no spill allowed in the main configurations (fp16/bf16, D = 64 and 128).

    MEM1_FAST_TEST_TRITON_COMPILE=all python -m pytest tests/test_state_attention_triton.py -q -s -k compile
compiles every shipped configuration and kernel (all head dims and dtypes, the non-finite K/V variants, the
preprocess and flag kernels): ~150 compiles, several minutes on 2 cores with a cold Triton cache.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import oracles
import pytest
import torch
from triton_compile import SMEM_LIMIT, compile_rows, report

from mem1_fast.ops import state_attention
from mem1_fast.visibility import Visibility, canonical

tk = pytest.importorskip("mem1_fast.triton_kernels.state_attention")

ROOT = Path(__file__).resolve().parent.parent
interpreted = pytest.mark.skipif(not tk.available("cpu"), reason="needs TRITON_INTERPRET=1 before triton kernels load")


# ---------------------------------------------------------------------------------------------------------------
# Specs that exercise every tile path
# ---------------------------------------------------------------------------------------------------------------

def _vis(intervals_per_row: list[list[tuple[int, int]]], K: int | None = None) -> Visibility:
    T = len(intervals_per_row)
    K0 = max(1, max(len(r) for r in intervals_per_row))
    lo = torch.zeros(T, K0, dtype=torch.int64)
    hi = torch.zeros(T, K0, dtype=torch.int64)
    for p, row in enumerate(intervals_per_row):
        for j, (a, b) in enumerate(row):
            lo[p, j], hi[p, j] = a, b
    lo, hi = canonical(lo, hi, K)
    return Visibility(lo, hi).validate()


def tiled_spec(T: int = 97, a: int = 56) -> Visibility:
    """Trajectory A = [0, a): causal. Trajectory B = [a, T): its prompt [a, a + 6) seen by all its rows, then each
    row sees the prompt and [a + 6 + 8 j, p] (blocks of 8 restarting, like consolidation), except row a + 10:
    nothing. With T = 97 and BM = 16 the last query block is the single row 96, so the last (ragged) key block is a
    *full* tile for it."""
    rows = []
    for p in range(T):
        if p < a:
            rows.append([(0, p + 1)])
        elif p < a + 6:
            rows.append([(a, p + 1)])
        elif p == a + 10:
            rows.append([])
        else:
            rows.append([(a, a + 6), (a + 6 + 8 * ((p - a - 6) // 8), p + 1)])
    return _vis(rows)


def check(vis, Hq=4, Hkv=2, D=32, dtype=torch.float32, tol=1e-4, seed=0):
    """Triton (through the front, with its autograd) against the fp64 oracle: out, lse, dq, dk, dv."""
    g = torch.Generator().manual_seed(seed)
    T = vis.T
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    go = torch.randn(T, Hq, D, generator=g)
    q1, k1, v1 = (x.clone().to(dtype).requires_grad_() for x in (q, k, v))
    out, lse = state_attention(q1, k1, v1, vis, return_lse=True, backend="triton")
    (out.float() * go).sum().backward()
    oracles.assert_attention_matches(q, k, v, go, vis, out, lse, (q1.grad, k1.grad, v1.grad), tol)
    return out


@pytest.fixture
def tiles(monkeypatch):
    def set_tiles(fwd, kv=None):
        monkeypatch.setattr(tk, "INTERPRETER_TILES", fwd)
        monkeypatch.setattr(tk, "INTERPRETER_KV_TILES", kv)
    return set_tiles


@interpreted
def test_spec_exercises_full_partial_and_ragged_tiles():
    vis = tiled_spec()
    bm = vis.block_map(16, 16)
    last_kb = (vis.T - 1) // 16
    assert bm.full_idx.numel() >= 4 and bm.partial_idx.numel() >= 8
    assert vis.T % 16 != 0 and int(bm.full_idx[-1]) == last_kb  # a full tile in the ragged last key block
    assert not vis.dense()[66].any()  # a row with no visible key


@interpreted
@pytest.mark.parametrize("fwd,kv", [((16, 16), None), ((16, 32), (32, 16)), ((32, 16), (16, 32))])
def test_tile_shapes_against_oracle(tiles, fwd, kv):
    """Full tiles (unmasked loop), partial tiles, the ragged full tile (masked loop), rows >= T, an empty row;
    asymmetric tiles, and dK/dV tiles that differ from the forward's (their own, transposed, block map)."""
    tiles(fwd, kv)
    out = check(tiled_spec(), Hq=2, Hkv=1)
    assert (out[66] == 0).all()


@interpreted
@pytest.mark.parametrize("Hq,Hkv", [(6, 2), (3, 1)])
def test_gqa_groups(tiles, Hq, Hkv):
    tiles((16, 16))
    check(tiled_spec(49, 30), Hq=Hq, Hkv=Hkv)


@interpreted
def test_head_dim_128(tiles):
    tiles((16, 16))
    check(tiled_spec(33, 18), Hq=2, Hkv=1, D=128)


@interpreted
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_half_precision_tiles(tiles, dtype, tol):
    tiles((16, 16))
    check(tiled_spec(49, 30), Hq=2, Hkv=1, D=64, dtype=dtype, tol=tol)


@interpreted
def test_more_than_four_intervals_per_row(tiles):
    """Rows with 5 intervals: the first 4 are held in registers, the rest read per tile."""
    tiles((16, 16))
    rows = [[(0, p + 1)] if p < 20 else [(0, 2), (4, 6), (8, 10), (12, 14), (16, p + 1)] for p in range(40)]
    vis = _vis(rows)
    assert vis.K == 5
    check(vis, Hq=2, Hkv=1)


@interpreted
def test_strided_inputs_match_contiguous(tiles):
    """q/k/v as views of one fused [T, Hq + 2 Hkv, D] projection: strides are passed, nothing is copied."""
    tiles((16, 16))
    vis = tiled_spec(40, 20)
    T, Hq, Hkv, D = vis.T, 2, 1, 32
    qkv = torch.randn(T, Hq + 2 * Hkv, D)
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    assert not q.is_contiguous()
    a, la = tk.forward(q, k, v, vis, 0.2, 16, 16)
    b, lb = tk.forward(q.contiguous(), k.contiguous(), v.contiguous(), vis, 0.2, 16, 16)
    assert torch.equal(a, b) and torch.equal(la, lb)
    do = torch.randn(T, Hq, D)
    ga = tk.backward(do, q, k, v, a, la, vis, 0.2, 16, 16, True)
    gb = tk.backward(do, q.contiguous(), k.contiguous(), v.contiguous(), b, lb, vis, 0.2, 16, 16, True)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


@interpreted
def test_backward_is_deterministic():
    vis = tiled_spec(40, 20)
    q, k, v = torch.randn(40, 2, 32), torch.randn(40, 1, 32), torch.randn(40, 1, 32)
    out, lse = tk.forward(q, k, v, vis, 0.2, 16, 16)
    do = torch.randn_like(out)
    runs = [tk.backward(do, q, k, v, out, lse, vis, 0.2, 16, 16, det) for det in (True, False)]
    for r in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(runs[0], r))


@interpreted
def test_kv_flag():
    k, v = torch.randn(70, 2, 32), torch.randn(70, 2, 32)
    assert tk._kv_flag(k, v).item() == 0
    for t, val in ((k, math.nan), (v, math.inf), (k, -math.inf)):
        t2 = t.clone()
        t2[69, 1, 31] = val
        args = (t2, v) if t is k else (k, t2)
        assert tk._kv_flag(*args).item() == 1


@interpreted
@pytest.mark.parametrize("where", ["full", "partial"])
def test_non_finite_kv_in_full_and_partial_tiles(tiles, where):
    """NaN in K / inf in V at one key: exactly the rows that see it output NaN (their LSE stays the reference's),
    every other row is bitwise unchanged, in value and in its dQ; dK/dV of clean keys only see clean rows."""
    tiles((16, 16))
    vis = tiled_spec(65, 40)
    T = vis.T
    dense = vis.dense()
    col = 3 if where == "full" else 42  # key 3 lies in full tiles of trajectory A; 42 in B's prompt (partial)
    bm = vis.block_map(16, 16)
    kind = bm.full_idx if where == "full" else bm.partial_idx
    assert col // 16 in kind.tolist()
    q, k, v = torch.randn(T, 2, 32), torch.randn(T, 1, 32), torch.randn(T, 1, 32)
    k2, v2 = k.clone(), v.clone()
    k2[col, 0, 5] = math.nan
    v2[col, 0, 7] = math.inf
    sees = dense[:, col]
    blind = ~sees
    outs, grads = [], []
    for kk, vv in ((k, v), (k2, v2)):
        qq = qq0 = q.clone().requires_grad_()
        o, lse = state_attention(qq, kk, vv, vis, return_lse=True, backend="triton")
        o[blind].sum().backward()
        outs.append((o.detach(), lse))
        grads.append(qq0.grad)
    assert torch.equal(outs[0][0][blind], outs[1][0][blind])
    assert torch.isnan(outs[1][0][sees]).all()
    _, ref_lse = state_attention(q, k2, v2, vis, return_lse=True, backend="reference")
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(outs[1][1]), fin)
    assert (outs[1][1][fin] - ref_lse[fin]).abs().max() < 1e-5
    assert torch.equal(grads[0][blind], grads[1][blind])
    assert torch.isfinite(grads[1]).all()


@interpreted
def test_interface():
    assert tk.available("cpu")
    assert not tk.available("cuda")  # the kernels were decorated for the interpreter
    q = torch.randn(4, 2, 64)
    assert tk.tile_sizes(q) == tk.INTERPRETER_TILES
    with pytest.raises(TypeError, match="float64"):
        tk.forward(q.double(), q.double(), q.double(), tiled_spec(4, 4), 0.1, 16, 16)
    with pytest.raises(ValueError, match="head dim"):
        tk.forward(q[..., :48], q[..., :48], q[..., :48], tiled_spec(4, 4), 0.1, 16, 16)


def test_shipped_configs_are_consistent():
    for D in tk.HEAD_DIMS:
        for dtype in tk.DTYPES:
            cfg = tk.config_for(D, dtype)
            for t in (cfg.BM, cfg.BN, cfg.BM_kv, cfg.BN_kv):
                assert t >= 16 and t & (t - 1) == 0
            for launch in (cfg.fwd, cfg.dq, cfg.dkdv, cfg.fwd_nan, cfg.dq_nan, cfg.dkdv_nan, cfg.pre):
                assert launch.num_warps in (1, 2, 4, 8, 16) and 1 <= launch.num_stages <= 5
    assert set(report.SA_MAIN_CONFIGS) <= set(report.sa_shipped_configs())


# ---------------------------------------------------------------------------------------------------------------
# GPU readiness without a GPU: compile for sm_80 and sm_90a
# ---------------------------------------------------------------------------------------------------------------

def _check_rows(rows, kernels, combos, no_spill: bool):
    print("\n" + report.format_report(rows))
    got = {(r["kernel"], r["D"], r["dtype"], r["arch"]) for r in rows}
    want = {(k, D, dt, a) for k in kernels for D, dt in combos for a in ("sm_80", "sm_90a")}
    assert got == want
    for r in rows:
        assert 0 < r["registers"] <= 255
        assert r["smem"] <= SMEM_LIMIT[r["arch"]], r
    if no_spill:
        spills = [r for r in rows if r["stack"] or r["local"]]
        assert not spills, "register spills:\n" + report.format_report(spills)


def test_main_configs_compile_for_sm80_and_sm90a_without_spills():
    """fwd / dK-dV / dQ (the path every training step runs) for fp16 and bf16 at D = 64 and 128."""
    rows = compile_rows("state_attention", [])
    _check_rows(rows, report.SA_MAIN_KERNELS, report.SA_MAIN_CONFIGS, no_spill=True)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEM1_FAST_TEST_TRITON_COMPILE", "") != "all",
                    reason="set MEM1_FAST_TEST_TRITON_COMPILE=all (every shipped config and kernel; minutes)")
def test_every_shipped_config_compiles():
    rows = compile_rows("state_attention", ["--all"])
    _check_rows(rows, list(report.SA_KERNELS), report.sa_shipped_configs(), no_spill=False)
    main = [r for r in rows if (r["D"], r["dtype"]) in report.SA_MAIN_CONFIGS and r["kernel"] in report.SA_MAIN_KERNELS]
    assert not [r for r in main if r["stack"] or r["local"]]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEM1_FAST_TEST_TRITON_COMPILE", "") != "all",
                    reason="set MEM1_FAST_TEST_TRITON_COMPILE=all (autotuning candidates; minutes)")
def test_autotune_candidates_compile():
    """MEM1_FAST_TRITON_AUTOTUNE=1 times TUNE_LAUNCHES on GPU: each must compile within the register / shared-memory
    limits (4-warp candidates may spill: the tuner then finds them slow, nothing breaks)."""
    rows = compile_rows("state_attention", ["--tune"])
    got = {(r["kernel"], r["D"], r["dtype"], r["arch"], r["num_warps"], r["num_stages"]) for r in rows}
    want = {(k, D, dt, a, t.num_warps, t.num_stages) for k in report.SA_MAIN_KERNELS for D, dt in report.SA_MAIN_CONFIGS
            for a in ("sm_80", "sm_90a") for t in tk.TUNE_LAUNCHES}
    assert got == want
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["smem"] <= SMEM_LIMIT[r["arch"]], r


# ---------------------------------------------------------------------------------------------------------------
# On a CUDA device
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not tk.available("cuda"), reason="compiled Triton kernels on a CUDA device (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2), (torch.float32, 1e-4)])
def test_cuda_against_reference(D, dtype, tol):
    from test_state_attention import pack_traj

    from mem1_fast.consolidation import pack

    vis = pack([pack_traj(200, 150), pack_traj(37, 300), pack_traj(5, 9)], "recompute")[0].visibility.to("cuda")
    T = vis.T
    q, k, v = (torch.randn(T, h, D, device="cuda") for h in (8, 2, 2))
    go = torch.randn(T, 8, D, device="cuda")
    q1, k1, v1 = (x.to(dtype).requires_grad_() for x in (q, k, v))
    out = state_attention(q1, k1, v1, vis, backend="triton")
    (out.float() * go).sum().backward()
    q2, k2, v2 = (x.double().requires_grad_() for x in (q, k, v))
    ref = state_attention(q2, k2, v2, vis, backend="reference")
    (ref * go.double()).sum().backward()
    for a, b in [(out, ref), (q1.grad, q2.grad), (k1.grad, k2.grad), (v1.grad, v2.grad)]:
        assert (a.double() - b).abs().max().item() <= tol
    # bitwise run-to-run determinism of the backward
    grads = []
    for _ in range(2):
        for x in (q1, k1, v1):
            x.grad = None
        (state_attention(q1, k1, v1, vis, backend="triton", deterministic=True).float() * go).sum().backward()
        grads.append([x.grad.clone() for x in (q1, k1, v1)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
