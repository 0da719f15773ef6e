"""C++ CPU backend of state_attention (csrc/cpu/state_attention.cpp): what the generic oracle tests in
test_state_attention.py do not reach.

* every compiled kernel body that runs on this CPU (generic, AVX2, AVX-512; `isa` argument of the ops) against the
  fp64 oracle, forward and all three gradients, with GQA and head dims that are not multiples of the vector width;
* tile sizes that are not multiples of the vector width or of each other, T not a multiple of the tiles;
* bit-identical results across runs, thread counts, the two backward schedules and `deterministic`;
* fp64 inputs, non-contiguous inputs, large logits (online-softmax rescaling), whole query blocks with no visible key;
* non-finite K/V: forward and every gradient equal to the reference backend's;
* the ops' input checks, and the tile-area target on a MEM1-shaped batch.
"""
from __future__ import annotations

import math
import random
import zlib

import pytest
import torch

import oracles
from mem1_fast import _ext
from mem1_fast.consolidation import pack
from mem1_fast.trajectory import Trajectory
from mem1_fast.visibility import Visibility

_cpp = pytest.importorskip("mem1_fast.ops._cpp_state_attention")
pytestmark = pytest.mark.skipif(not _cpp.available("cpu"), reason="C++ extension with state_attention unavailable")

ISA_NAMES = {0: "generic", 1: "avx2", 2: "avx512"}


def _isas() -> list[int]:
    if not _cpp.available("cpu"):
        return []
    out = []
    for isa in (0, 1, 2):
        try:
            torch.ops.mem1_fast.state_attention_cpu_isa(torch.empty(0), isa)
            out.append(isa)
        except RuntimeError:
            pass
    return out


ISAS = _isas()


def traj(q_len: int, turns: list[tuple[int, int, int]]) -> Trajectory:
    tri = [("PROMPT", 0, [3] * q_len)]
    for j, (s, a, o) in enumerate(turns):
        tri += [("STATE", j, [4] * s), ("ACTION", j, [5] * a)]
        if o:
            tri.append(("OBS", j, [6] * o))
    return Trajectory.from_triples(tri)


def random_batch(seed: int, n_traj: int = 3, mode: str = "retain") -> Visibility:
    rng = random.Random(seed)
    trajs = []
    for _ in range(n_traj):
        n = rng.randint(1, 4)  # every turn but the last needs an observation
        turns = [(rng.randint(0, 30), rng.randint(1, 20), rng.randint(0 if j == n - 1 else 1, 40)) for j in range(n)]
        trajs.append(traj(rng.randint(1, 60), turns))
    return pack(trajs, mode)[0].visibility


def run_cpp(q, k, v, go, vis, BM=64, BN=64, isa=-1, scale=None, deterministic=False, schedule=-1):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, lse = _cpp.forward(q, k, v, vis, scale, BM, BN, isa=isa)
    dq, dk, dv = _cpp.backward(go, q, k, v, out, lse, vis, scale, BM, BN, deterministic, isa=isa, schedule=schedule)
    return out, lse, dq, dk, dv


def oracle(q, k, v, go, vis, scale=None):
    q2, k2, v2 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, lse = oracles.attention(q2, k2, v2, vis.dense(), scale)
    (ref * go.double()).sum().backward()
    return ref, lse, q2.grad, k2.grad, v2.grad


def assert_close_to_oracle(got, ref, tol):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        fin = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), fin), name
        err = (a.double()[fin] - b[fin]).abs().max().item() if bool(fin.any()) else 0.0
        assert err <= tol, f"{name}: max error {err:.2e} > {tol:.0e}"


def test_sources_include_the_kernel():
    names = [p.name for p in _ext.cpu_sources()]
    assert "state_attention.cpp" in names


@pytest.mark.parametrize("mode", ["retain", "recompute", "paper"])
@pytest.mark.parametrize("heads,D", [((4, 2), 64), ((2, 2), 32), ((6, 2), 128), ((3, 1), 40), ((2, 1), 80)])
def test_every_isa_matches_oracle(mode, heads, D):
    vis = random_batch(zlib.crc32(repr((mode, heads, D)).encode()) % 1000, n_traj=2, mode=mode)
    T = vis.T
    Hq, Hkv = heads
    q, k, v, go = torch.randn(T, Hq, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D), torch.randn(T, Hq, D)
    ref = oracle(q, k, v, go, vis)
    for isa in ISAS:
        assert torch.ops.mem1_fast.state_attention_cpu_isa(q, isa) == ISA_NAMES[isa]
        got = run_cpp(q, k, v, go, vis, isa=isa, schedule=0)
        assert_close_to_oracle(got, ref, 1e-4)
        # the fused backward schedule gives the two-pass one's gradients bit for bit
        fused = run_cpp(q, k, v, go, vis, isa=isa, schedule=1)
        for a, b in zip(got, fused):
            assert torch.equal(a, b)


@pytest.mark.parametrize("BM,BN", [(16, 16), (48, 80), (100, 37), (128, 32), (1, 7), (64, 256)])
def test_odd_tile_sizes(BM, BN):
    vis = random_batch(BM * 1000 + BN, n_traj=2, mode="recompute")
    T = vis.T
    q, k, v, go = torch.randn(T, 4, 64), torch.randn(T, 2, 64), torch.randn(T, 2, 64), torch.randn(T, 4, 64)
    ref = oracle(q, k, v, go, vis)
    for isa in ISAS:
        assert_close_to_oracle(run_cpp(q, k, v, go, vis, BM, BN, isa=isa), ref, 1e-4)


@pytest.mark.parametrize("Hkv", [1, 2, 3])
def test_bit_identical_across_runs_threads_schedules_and_flag(Hkv):
    vis = random_batch(7, n_traj=6)
    T = vis.T
    q, k, v, go = torch.randn(T, 6, 64), torch.randn(T, Hkv, 64), torch.randn(T, Hkv, 64), torch.randn(T, 6, 64)
    base = run_cpp(q, k, v, go, vis, 32, 32)
    threads = torch.get_num_threads()
    try:
        for n, det, sched in ((1, False, -1), (threads, True, -1), (max(2, threads), False, 0), (2, False, 1),
                              (3, False, -1)):
            torch.set_num_threads(n)
            again = run_cpp(q, k, v, go, vis, 32, 32, deterministic=det, schedule=sched)
            for a, b in zip(base, again):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


def test_large_problem_runs_threaded_and_matches_oracle():
    """Big enough to pass the serial cut-off (kSerialWork), so the threaded schedule is the one checked."""
    vis = pack([traj(100, [(30, 10, 60)] * 3), traj(50, [(20, 5, 40)] * 2)], "retain")[0].visibility
    T = vis.T
    q, k, v, go = torch.randn(T, 4, 64), torch.randn(T, 2, 64), torch.randn(T, 2, 64), torch.randn(T, 4, 64)
    assert_close_to_oracle(run_cpp(q, k, v, go, vis), oracle(q, k, v, go, vis), 1e-4)


def test_float64_inputs_stay_float64():
    vis = random_batch(3)
    T = vis.T
    q, k, v, go = (torch.randn(T, h, 32, dtype=torch.float64) for h in (4, 2, 2, 4))
    got = run_cpp(q, k, v, go, vis)
    assert all(x.dtype == torch.float64 for x in (got[0], got[2], got[3], got[4]))
    # the LSE is float32 by contract and P is recomputed from it: ~1e-7 relative
    assert_close_to_oracle(got, oracle(q, k, v, go, vis), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_half_outputs(dtype):
    vis = random_batch(5)
    T = vis.T
    q, k, v, go = (torch.randn(T, h, 64).to(dtype) for h in (4, 2, 2, 4))
    out, lse, dq, dk, dv = run_cpp(q, k, v, go, vis)
    assert (out.dtype, dq.dtype, dk.dtype, dv.dtype, lse.dtype) == (dtype,) * 4 + (torch.float32,)
    # the kernel computes in fp32 on the rounded inputs: compare with the oracle on those same inputs
    ref = oracle(q, k, v, go, vis)
    tol = 1e-2 if dtype == torch.float16 else 6e-2
    assert_close_to_oracle((out, lse, dq, dk, dv), ref, tol)


def test_non_contiguous_inputs():
    vis = random_batch(11)
    T = vis.T
    big = torch.randn(T, 8, 96)
    q = big[:, :4, :64]
    k = big[:, 4:6, 32:96]
    v = torch.randn(2, 64, T).permute(2, 0, 1)
    go = torch.randn(T, 64, 4).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or go.is_contiguous())
    assert_close_to_oracle(run_cpp(q, k, v, go, vis), oracle(q, k, v, go, vis), 1e-4)


def test_negative_and_tiny_scales():
    vis = random_batch(23)
    T = vis.T
    q, k, v, go = torch.randn(T, 4, 32), torch.randn(T, 2, 32), torch.randn(T, 2, 32), torch.randn(T, 4, 32)
    for scale in (-0.3, 1e-30):
        ref = oracle(q, k, v, go, vis, scale)
        for sched in (0, 1):
            assert_close_to_oracle(run_cpp(q, k, v, go, vis, scale=scale, schedule=sched), ref, 1e-4)


def test_large_logits():
    """Scores of a few hundred: the running max changes from tile to tile and the rescaling must be exact."""
    vis = random_batch(13, n_traj=2)
    T = vis.T
    q, k, v, go = torch.randn(T, 2, 32) * 8, torch.randn(T, 2, 32) * 8, torch.randn(T, 2, 32), torch.randn(T, 2, 32)
    for isa in ISAS:
        got = run_cpp(q, k, v, go, vis, 16, 16, isa=isa)
        ref = oracle(q, k, v, go, vis)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
            scale = max(1.0, b.abs().max().item())
            assert (a.double() - b).abs().max().item() <= 1e-4 * scale, name


@pytest.mark.parametrize("isa", ISAS, ids=[ISA_NAMES[i] for i in ISAS])
def test_rows_and_blocks_with_no_visible_key(isa):
    """Rows 0..99 see nothing (a whole 64-row query block and part of the next); scattered empty rows after."""
    T = 300
    lo = torch.zeros(T, 2, dtype=torch.int32)
    hi = torch.zeros(T, 2, dtype=torch.int32)
    p = torch.arange(T, dtype=torch.int32)
    live = (p >= 100) & (p % 7 != 3)
    lo[:, 0] = torch.where(live, torch.clamp(p - 90, min=0), 0)
    hi[:, 0] = torch.where(live, p + 1, 0)
    vis = Visibility(lo, hi).validate()
    q, k, v, go = torch.randn(T, 4, 32), torch.randn(T, 2, 32), torch.randn(T, 2, 32), torch.randn(T, 4, 32)
    out, lse, dq, dk, dv = got = run_cpp(q, k, v, go, vis, isa=isa)
    dead = ~live
    assert (out[dead] == 0).all() and torch.isneginf(lse[:, dead]).all() and (dq[dead] == 0).all()
    assert all(torch.isfinite(x).all() for x in (out, dq, dk, dv))
    assert_close_to_oracle(got, oracle(q, k, v, go, vis), 1e-4)


@pytest.mark.parametrize("isa", ISAS, ids=[ISA_NAMES[i] for i in ISAS])
def test_non_finite_kv_matches_reference_in_every_gradient(isa):
    """NaN / inf written into K/V: rows that cannot see them are untouched, rows that can are NaN, and all three
    gradients equal the reference backend's (which zeroes the poisoned rows' contributions)."""
    from mem1_fast.ops.state_attention import state_attention

    t = Trajectory.from_triples([("PROMPT", 0, [3] * 5), ("STATE", 0, [4] * 40), ("OBS", 0, [6] * 30),
                                 ("STATE", 1, [4] * 50), ("OBS", 1, [6] * 20), ("ACTION", 2, [5] * 60)])
    vis = pack([t, traj(7, [(9, 3, 11)])], "recompute")[0].visibility
    T = vis.T
    q, k, v, go = torch.randn(T, 4, 32), torch.randn(T, 2, 32), torch.randn(T, 2, 32), torch.randn(T, 4, 32)
    k[10, 0, 3] = math.nan
    v[12, 1, :] = math.inf
    k[T - 3, 1, 0] = -math.inf  # last trajectory
    out, lse, dq, dk, dv = run_cpp(q, k, v, go, vis, 32, 32, isa=isa)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref = state_attention(qr, kr, vr, vis, backend="reference")
    (ref * go).sum().backward()
    sees = vis.dense()
    for kv_head, col in ((0, 10), (1, 12), (1, T - 3)):
        rows = sees[:, col]
        for h in (2 * kv_head, 2 * kv_head + 1):
            assert torch.isnan(out[rows, h]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    assert (out[fin] - ref[fin]).abs().max() <= 1e-5
    for a, b in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max() <= 1e-5


def test_op_input_checks():
    vis = random_batch(19)
    T = vis.T
    q, k, v = torch.randn(T, 4, 32), torch.randn(T, 2, 32), torch.randn(T, 2, 32)
    bm = vis.block_map(64, 64)
    maps = (bm.partial_ptr, bm.partial_idx, bm.full_ptr, bm.full_idx)
    fwd = torch.ops.mem1_fast.state_attention_fwd
    cases = [
        (lambda: fwd(q, k.double(), v, vis.lo, vis.hi, *maps, 0.1, 64, 64), "share a dtype"),
        (lambda: fwd(q[:, :3], k, v, vis.lo, vis.hi, *maps, 0.1, 64, 64), "multiple of key/value heads"),
        (lambda: fwd(q, k[:, :, :16], v[:, :, :16], vis.lo, vis.hi, *maps, 0.1, 64, 64), "must be \\[T="),
        (lambda: fwd(q.int(), k.int(), v.int(), vis.lo, vis.hi, *maps, 0.1, 64, 64), "float32, float16"),
        (lambda: fwd(q, k, v, vis.lo.long(), vis.hi, *maps, 0.1, 64, 64), "lo and hi must be int32"),
        (lambda: fwd(q, k, v, vis.lo[:-1], vis.hi[:-1], *maps, 0.1, 64, 64), "lo and hi must both be"),
        (lambda: fwd(q, k, v, vis.lo, vis.hi, bm.partial_ptr[:-1], *maps[1:], 0.1, 64, 64), "pointer must be 1-D"),
        (lambda: fwd(q, k, v, vis.lo, vis.hi, *maps, 0.1, 64, 32), "does not list tile"),
        (lambda: fwd(q, k, v, vis.lo, vis.hi + 5, *maps, 0.1, 64, 64), "invalid interval"),
        (lambda: fwd(q, k, v, vis.lo, vis.hi, *maps, math.nan, 64, 64), "scale must be finite"),
        (lambda: fwd(q, k, v, vis.lo, vis.hi, *maps, 0.1, 0, 64), "tile sizes"),
        (lambda: fwd(q, k, v, vis.lo, vis.hi, *maps, 0.1, 64, 64, 7), "isa must be"),
    ]
    for call, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            call()
    out, lse = fwd(q, k, v, vis.lo, vis.hi, *maps, 0.1, 64, 64)
    bwd = torch.ops.mem1_fast.state_attention_bwd
    with pytest.raises(RuntimeError, match="lse must be float32"):
        bwd(out, q, k, v, out, lse.double(), vis.lo, vis.hi, *maps, 0.1, 64, 64)
    with pytest.raises(RuntimeError, match="dout must be"):
        bwd(out[:-1], q, k, v, out, lse, vis.lo, vis.hi, *maps, 0.1, 64, 64)
    with pytest.raises(RuntimeError, match="does not list tile"):
        bwd(out, q, k, v, out, lse, vis.lo, vis.hi, *maps, 0.1, 64, 32)
    with pytest.raises(RuntimeError, match="schedule must be"):
        bwd(out, q, k, v, out, lse, vis.lo, vis.hi, *maps, 0.1, 64, 64, False, -1, 2)


def test_tile_area_target_on_mem1_batch():
    """Issue target: computed tile area <= 1.3x the visible area at the default tiles, on MEM1-shaped batches
    (question of 512 tokens, 16 turns of 512-1024 tokens)."""
    rng = random.Random(0)
    turns = []
    for _ in range(16):
        n, s, a = rng.randint(512, 1024), rng.randint(96, 192), rng.randint(16, 48)
        turns.append((s, a, n - s - a))
    t = traj(512, turns)
    BM, BN = _cpp.tile_sizes(torch.empty(1, 1, 64))
    for mode in ("retain", "recompute"):
        vis = pack([t], mode)[0].visibility
        ratio = vis.block_map(BM, BN).tile_area() / vis.visible_pairs()
        assert ratio <= 1.3, (mode, ratio)
