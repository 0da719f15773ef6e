"""Triton backend of `state_attention` (docs/design.md §4-§5): FlashAttention-2 style kernels over a block map.

Called by `mem1_fast.ops.state_attention` through

    available(device) -> bool
    tile_sizes(q) -> (BM, BN)
    forward(q, k, v, vis, scale, BM, BN) -> (out [T, Hq, D] q.dtype, lse fp32 [Hq, T] natural log)
    backward(dout, q, k, v, out, lse, vis, scale, BM, BN, deterministic) -> (dq, dk, dv)

Kernels (packed varlen layout [T, H, D], token/head strides passed explicitly, last dim contiguous; GQA: query
head h reads key/value head h // G, K/V are never repeated in memory; D in {32, 64, 128} is a constexpr):

* `_fwd_kernel`, one program per (query block, query head). Walks only the key tiles the block map lists for its
  query block: *full* tiles first, with no mask work (the one exception, a full tile in the ragged last key block,
  whose columns >= T need masking, joins the masked loop), then *partial* tiles, masked in registers from the
  interval spec (row p sees the union over j of [lo[p,j], hi[p,j]); the bounds of the block's rows are loaded
  once, up to 4 intervals held in registers). Online softmax in base 2 (log2(e) folded into the scale), fp32
  accumulation, LSE saved (natural log; -inf for a row with no visible key, whose output is 0).
* `_bwd_preprocess_kernel`, per (row block, query head): delta = rowsum(dO * O) and lse2 = lse * log2(e); a row
  that takes no part in the backward (no visible key, or an output poisoned by a non-finite K/V value) gets
  lse2 = +inf and delta = 0, so its probabilities recompute to exactly 0 and its gradients are 0.
* `_bwd_dkdv_kernel`, per (key block, kv head): walks the query blocks of the *transposed* block map, looping over
  the G query heads of the GQA group inside the program; dK/dV accumulate in registers: no atomics.
* `_bwd_dq_kernel`, per (query block, query head): the forward's tile walk, dQ accumulated in registers.

The backward has no atomics and sums in a fixed order: it is deterministic (bitwise run to run), so the
`deterministic` argument is always honoured. The launch configuration is fixed per (head dim, dtype); autotuning of
num_warps / num_stages on GPU is opt-in (MEM1_FAST_TRITON_AUTOTUNE=1, see TUNE_LAUNCHES).

Non-finite K/V. A row must not be affected by a NaN/inf in a key it cannot see, yet `0 * NaN` in P @ V would
spread it to every row of the tile. `_kv_nonfinite_kernel` sets a device flag when K or V holds a non-finite value;
each attention kernel exists in two variants (constexpr SANITIZE) and both are launched: the one that does not
match the flag exits at once (no host synchronization). The SANITIZE=False variant is plain FlashAttention-2. The
SANITIZE=True variant zeroes non-finite values of the loaded K/V tiles and keeps a per-row flag "saw a visible
non-finite key" whose rows output NaN, exactly as the reference (their LSE comes from the zeroed values, their
gradients are 0). It costs registers (spills on some configs: see the compile report) and only runs when the
inputs are already broken.

fp16 / bf16 / fp32 inputs, fp32 accumulation; fp32 inputs use IEEE fp32 dot products on GPU (not tf32) so the
backend computes the same function as the reference. Under the interpreter (TRITON_INTERPRET=1, CPU tensors) bf16
is computed in fp32 after the load (the interpreter's bf16 arithmetic is broken) and fixed small tiles are used.

GPU readiness without a GPU: `python tools/triton_report.py state_attention [--all]` compiles the kernels of the
shipped configs for sm_80 / sm_90a and prints registers / spill (stack) bytes / shared memory (run it with
TRITON_INTERPRET unset: the decorators read it at import).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, available  # noqa: F401 (available: the backend interface)
from ._common import MAX as _MAX
from ._common import SUM as _SUM


LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
HEAD_DIMS = (32, 64, 128)
INTERPRETER_TILES = (64, 64)  # fixed tiles under the interpreter (forward, dQ and dK/dV alike); tests patch smaller
INTERPRETER_KV_TILES = None  # (BM_kv, BN_kv) of the dK/dV pass under the interpreter; None: the (BM, BN) given



# -----------------------------------------------------------------------------------------------------------------
# Launch configurations
# -----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Config:
    """Tiles and launch parameters of one (head dim, dtype class).

    (BM, BN): query block x key tile of the forward and dQ kernels: the block map the front builds via
    `tile_sizes`. (BM_kv, BN_kv): query step x key block of the dK/dV kernel; its block map is built once per
    batch as well (cached on the Visibility, like the first) and transposed. The *_nan launches are those of the
    variants that run when K/V hold a non-finite value (they sanitize the K/V tiles in registers).
    """

    BM: int
    BN: int
    BM_kv: int
    BN_kv: int
    fwd: Launch
    dq: Launch
    dkdv: Launch
    fwd_nan: Launch
    dq_nan: Launch
    dkdv_nan: Launch
    pre: Launch = Launch(4, 1)


def _cfg(tiles, kv_tiles, fwd, dq, dkdv, fwd_nan, dq_nan, dkdv_nan) -> Config:
    return Config(*tiles, *kv_tiles, *(Launch(*x) for x in (fwd, dq, dkdv, fwd_nan, dq_nan, dkdv_nan)))


# (head dim, "half" = fp16/bf16 | "fp32") -> Config. Picked without a GPU to time them (none was available): the
# FlashAttention-2 Triton shapes (forward/dQ 128 x 64 tiles; dK/dV key blocks of 128 stepping 32 queries, 64 x 64
# at D = 128), with tiles / num_warps / num_stages chosen from the compiler's figures so that no kernel of the fast
# path spills on sm_80 nor on sm_90a (tests/test_state_attention_triton.py compiles them and prints the table).
# fp32 runs IEEE fp32 dots (no tensor cores): smaller tiles. The *_nan variants (non-finite K/V only) spill on
# some configs; they are correct, just slower. Autotuning is opt-in (below): the shipped launches are the ones held
# to zero spills, and a benchmark cannot tell which of the two variants of a kernel does the work.
CONFIGS: dict[tuple[int, str], Config] = {
    (32, "half"): _cfg((128, 64), (32, 128), fwd=(4, 3), dq=(4, 2), dkdv=(4, 2),
                       fwd_nan=(8, 2), dq_nan=(8, 2), dkdv_nan=(8, 2)),
    (64, "half"): _cfg((128, 64), (32, 128), fwd=(4, 3), dq=(8, 2), dkdv=(8, 2),
                       fwd_nan=(8, 2), dq_nan=(8, 2), dkdv_nan=(8, 2)),
    (128, "half"): _cfg((128, 64), (64, 64), fwd=(8, 3), dq=(8, 2), dkdv=(8, 2),
                        fwd_nan=(8, 2), dq_nan=(8, 2), dkdv_nan=(8, 2)),
    (32, "fp32"): _cfg((64, 32), (32, 64), fwd=(4, 2), dq=(4, 2), dkdv=(4, 2),
                       fwd_nan=(4, 2), dq_nan=(4, 2), dkdv_nan=(4, 2)),
    (64, "fp32"): _cfg((32, 32), (32, 32), fwd=(4, 2), dq=(4, 2), dkdv=(8, 2),
                       fwd_nan=(4, 2), dq_nan=(4, 2), dkdv_nan=(8, 2)),
    (128, "fp32"): _cfg((32, 16), (32, 32), fwd=(4, 2), dq=(4, 2), dkdv=(8, 2),
                        fwd_nan=(4, 2), dq_nan=(4, 2), dkdv_nan=(8, 2)),
}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Opt-in autotuning on GPU (MEM1_FAST_TRITON_AUTOTUNE=1): the fast variant of each kernel times TUNE_LAUNCHES once
# per (kernel, D, tiles, intervals, dtypes) in the process and keeps the fastest. Only num_warps / num_stages vary:
# the tiles are those of the block map the front built, so the tile walk and its summation order stay the same.
# Off by default: the shipped launches are the ones the compile checks hold to zero spills, and a first call that
# times 4 launches per kernel is a surprise in a trainer. `tools/triton_report.py state_attention --tune` compiles
# the candidates.
AUTOTUNE = os.environ.get("MEM1_FAST_TRITON_AUTOTUNE", "0") == "1"
TUNE_LAUNCHES = tuple(Launch(w, s) for w in (4, 8) for s in (2, 3))
_TUNED: dict = {}


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def config_for(D: int, dtype: torch.dtype) -> Config:
    if D not in HEAD_DIMS:
        raise ValueError(f"triton state_attention: head dim {D} not supported (supported: {HEAD_DIMS})")
    if dtype not in DTYPES:
        raise TypeError(f"triton state_attention: dtype {dtype} not supported (fp16, bf16, fp32); "
                        "use backend='reference' for float64")
    return CONFIGS[(D, _dtype_class(dtype))]


# -----------------------------------------------------------------------------------------------------------------
# Kernels. Helpers are inlined by hand except the per-tile functions: every device-function call is costly under
# the interpreter (it re-patches triton.language), which would dominate the CPU tests; compiled, it is all inlined.
# -----------------------------------------------------------------------------------------------------------------

@triton.jit
def _kv_nonfinite_kernel(K, V, KVBAD, T, stride_kt, stride_kh, stride_vt, stride_vh, D: tl.constexpr,
                         BLK: tl.constexpr):
    """KVBAD[0] = 1 when K or V holds a non-finite value anywhere (0 otherwise; it must be zeroed before)."""
    offs = tl.program_id(0) * BLK + tl.arange(0, BLK)
    hk = tl.program_id(1)
    ok = offs[:, None] < T
    rows = offs[:, None].to(tl.int64)
    dcol = tl.arange(0, D)[None, :]
    k = tl.load(K + hk * stride_kh + rows * stride_kt + dcol, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(V + hk * stride_vh + rows * stride_vt + dcol, mask=ok, other=0.0).to(tl.float32)
    fin = (tl.abs(k) < float("inf")) & (tl.abs(v) < float("inf"))
    bad = tl.reduce(tl.reduce(tl.where(fin, 0, 1), 1, _MAX), 0, _MAX)
    if bad != 0:
        tl.atomic_max(KVBAD, 1)  # idempotent: the flag's value does not depend on the order


@triton.jit
def _fwd_tile(acc, l_i, m_i, bad, q, kd, vd, LO, HI, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, kb, offs_m, m_ok, T,
              stride_kt, stride_vt, qk_scale,
              BN: tl.constexpr, NK: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr,
              SANITIZE: tl.constexpr):
    offs_n = kb * BN + tl.arange(0, BN)
    n_ok = offs_n[:, None] < T
    rows = offs_n[:, None].to(tl.int64)
    k = tl.load(kd + rows * stride_kt, mask=n_ok, other=0.0).to(CD)
    v = tl.load(vd + rows * stride_vt, mask=n_ok, other=0.0).to(CD)
    if SANITIZE:
        k_fin = tl.abs(k) < float("inf")
        v_fin = tl.abs(v) < float("inf")
        col_bad = tl.reduce(tl.where(k_fin & v_fin, 0, 1), 1, _MAX)  # [BN]: key holds a non-finite K/V value
        k = tl.where(k_fin, k, 0.0)
        v = tl.where(v_fin, v, 0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # log2 domain
    if MASKED:
        # row p sees column c iff lo[p, j] <= c < hi[p, j] for some j: the interval spec, in registers
        c = offs_n[None, :]
        vis = (c >= lo0) & (c < hi0)
        if NK > 1:
            vis = vis | ((c >= lo1) & (c < hi1))
        if NK > 2:
            vis = vis | ((c >= lo2) & (c < hi2))
        if NK > 3:
            vis = vis | ((c >= lo3) & (c < hi3))
        for j in tl.static_range(4, NK):  # more than 4 intervals per row: the rest are read here
            lo = tl.load(LO + offs_m * NK + j, mask=m_ok, other=0)[:, None]
            hi = tl.load(HI + offs_m * NK + j, mask=m_ok, other=0)[:, None]
            vis = vis | ((c >= lo) & (c < hi))
        s = tl.where(vis, s, float("-inf"))
        if SANITIZE:
            bad = tl.maximum(bad, tl.reduce(tl.where(vis, col_bad[None, :], 0), 1, _MAX))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet: p = 0, no NaN
    else:
        if SANITIZE:
            bad = tl.maximum(bad, tl.reduce(col_bad, 0, _MAX))  # every row of a full tile sees every column
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_use = m_new
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
    acc = acc * alpha[:, None] + tl.dot(p.to(CD), v, input_precision=PREC)
    return acc, l_i, m_new, bad


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, LO, HI, PP, PI, FP, FI, KVBAD,
                T, G, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                qk_scale,
                D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NK: tl.constexpr, CD: tl.constexpr,
                PREC: tl.constexpr, SANITIZE: tl.constexpr):
    if (tl.load(KVBAD) != 0) != SANITIZE:  # the other variant of this kernel does the work
        return
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // G
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < T
    dcol = tl.arange(0, D)[None, :]
    q = tl.load(Q + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qt + dcol, mask=m_ok[:, None],
                other=0.0).to(CD)
    kd = K + hk * stride_kh + dcol
    vd = V + hk * stride_vh + dcol
    # interval bounds of this block's rows, [BM, 1], loaded once for all its tiles (slots >= NK are unused)
    lo0 = tl.load(LO + offs_m * NK, mask=m_ok, other=0)[:, None]
    hi0 = tl.load(HI + offs_m * NK, mask=m_ok, other=0)[:, None]
    lo1, hi1, lo2, hi2, lo3, hi3 = lo0, hi0, lo0, hi0, lo0, hi0
    if NK > 1:
        lo1 = tl.load(LO + offs_m * NK + 1, mask=m_ok, other=0)[:, None]
        hi1 = tl.load(HI + offs_m * NK + 1, mask=m_ok, other=0)[:, None]
    if NK > 2:
        lo2 = tl.load(LO + offs_m * NK + 2, mask=m_ok, other=0)[:, None]
        hi2 = tl.load(HI + offs_m * NK + 2, mask=m_ok, other=0)[:, None]
    if NK > 3:
        lo3 = tl.load(LO + offs_m * NK + 3, mask=m_ok, other=0)[:, None]
        hi3 = tl.load(HI + offs_m * NK + 3, mask=m_ok, other=0)[:, None]

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.full([BM], 0, tl.float32)
    acc = tl.full([BM, D], 0, tl.float32)
    bad = tl.full([BM], 0, tl.int32)

    f0 = tl.load(FP + pid_m)
    f1 = tl.load(FP + pid_m + 1)
    p0 = tl.load(PP + pid_m)
    p1 = tl.load(PP + pid_m + 1)
    # A full tile in the ragged last key block has columns >= T: it joins the masked loop (the interval mask
    # excludes them, since hi <= p + 1 <= T).
    last = tl.load(FI + f1 - 1, mask=f1 > f0, other=0)
    ragged = ((f1 > f0) & ((last + 1) * BN > T)).to(tl.int32)
    f_end = f1 - ragged
    for i in range(f0, f_end):  # full tiles: no mask work
        kb = tl.load(FI + i)
        acc, l_i, m_i, bad = _fwd_tile(acc, l_i, m_i, bad, q, kd, vd, LO, HI, lo0, hi0, lo1, hi1, lo2, hi2, lo3,
                                       hi3, kb, offs_m, m_ok, T, stride_kt, stride_vt, qk_scale, BN, NK, CD, PREC,
                                       False, SANITIZE)
    for i in range(p0, p1 + ragged):  # partial tiles (+ the ragged full one): masked in registers
        kb = tl.where(i < p1, tl.load(PI + i, mask=i < p1, other=0), last)
        acc, l_i, m_i, bad = _fwd_tile(acc, l_i, m_i, bad, q, kd, vd, LO, HI, lo0, hi0, lo1, hi1, lo2, hi2, lo3,
                                       hi3, kb, offs_m, m_ok, T, stride_kt, stride_vt, qk_scale, BN, NK, CD, PREC,
                                       True, SANITIZE)

    l_ok = l_i > 0.0
    l_safe = tl.where(l_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    if SANITIZE:
        out = tl.where(bad[:, None] > 0, float("nan"), out)  # a visible key held a non-finite K/V value
    lse = tl.where(l_ok, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(O + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ot + dcol, out.to(O.dtype.element_ty),
             mask=m_ok[:, None])
    tl.store(LSE + h.to(tl.int64) * T + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_preprocess_kernel(O, DO, LSE, LSE2, DELTA, T, stride_ot, stride_oh, stride_dot, stride_doh,
                           D: tl.constexpr, BLK: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs = pid * BLK + tl.arange(0, BLK)
    ok = offs < T
    rows = offs[:, None].to(tl.int64)
    dcol = tl.arange(0, D)[None, :]
    o = tl.load(O + h * stride_oh + rows * stride_ot + dcol, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + h * stride_doh + rows * stride_dot + dcol, mask=ok[:, None], other=0.0).to(tl.float32)
    # an output poisoned by a visible non-finite K/V value takes no part in the backward
    dead = tl.reduce(tl.where(tl.abs(o) < float("inf"), 0, 1), 1, _MAX) > 0
    delta = tl.reduce(o * do, 1, _SUM)
    base = h.to(tl.int64) * T
    lse = tl.load(LSE + base + offs, mask=ok, other=float("-inf"))
    out_of_play = dead | (lse == float("-inf"))
    tl.store(LSE2 + base + offs, tl.where(out_of_play, float("inf"), lse * 1.4426950408889634), mask=ok)
    tl.store(DELTA + base + offs, tl.where(out_of_play, 0.0, delta), mask=ok)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, kd, vd, LO, HI, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, kb, offs_m, m_ok, T,
             stride_kt, stride_vt, qk_scale,
             BN: tl.constexpr, NK: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr,
             SANITIZE: tl.constexpr):
    offs_n = kb * BN + tl.arange(0, BN)
    n_ok = offs_n[:, None] < T
    rows = offs_n[:, None].to(tl.int64)
    k = tl.load(kd + rows * stride_kt, mask=n_ok, other=0.0).to(CD)
    v = tl.load(vd + rows * stride_vt, mask=n_ok, other=0.0).to(CD)
    if SANITIZE:
        k = tl.where(tl.abs(k) < float("inf"), k, 0.0)
        v = tl.where(tl.abs(v) < float("inf"), v, 0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.math.exp2(s - lse2)  # lse2 [BM, 1]; +inf for rows out of play: p = 0
    if MASKED:
        c = offs_n[None, :]
        vis = (c >= lo0) & (c < hi0)
        if NK > 1:
            vis = vis | ((c >= lo1) & (c < hi1))
        if NK > 2:
            vis = vis | ((c >= lo2) & (c < hi2))
        if NK > 3:
            vis = vis | ((c >= lo3) & (c < hi3))
        for j in tl.static_range(4, NK):
            lo = tl.load(LO + offs_m * NK + j, mask=m_ok, other=0)[:, None]
            hi = tl.load(HI + offs_m * NK + j, mask=m_ok, other=0)[:, None]
            vis = vis | ((c >= lo) & (c < hi))
        p = tl.where(vis, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta)
    dq += tl.dot(ds.to(CD), k, input_precision=PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE2, DELTA, LO, HI, PP, PI, FP, FI, KVBAD,
                   T, G, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dqt, stride_dqh, qk_scale, scale,
                   D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NK: tl.constexpr, CD: tl.constexpr,
                   PREC: tl.constexpr, SANITIZE: tl.constexpr):
    if (tl.load(KVBAD) != 0) != SANITIZE:
        return
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // G
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < T
    rows = offs_m[:, None].to(tl.int64)
    dcol = tl.arange(0, D)[None, :]
    q = tl.load(Q + h * stride_qh + rows * stride_qt + dcol, mask=m_ok[:, None], other=0.0).to(CD)
    do = tl.load(DO + h * stride_doh + rows * stride_dot + dcol, mask=m_ok[:, None], other=0.0).to(CD)
    base = h.to(tl.int64) * T
    lse2 = tl.load(LSE2 + base + offs_m, mask=m_ok, other=float("inf"))[:, None]
    delta = tl.load(DELTA + base + offs_m, mask=m_ok, other=0.0)[:, None]
    kd = K + hk * stride_kh + dcol
    vd = V + hk * stride_vh + dcol
    lo0 = tl.load(LO + offs_m * NK, mask=m_ok, other=0)[:, None]
    hi0 = tl.load(HI + offs_m * NK, mask=m_ok, other=0)[:, None]
    lo1, hi1, lo2, hi2, lo3, hi3 = lo0, hi0, lo0, hi0, lo0, hi0
    if NK > 1:
        lo1 = tl.load(LO + offs_m * NK + 1, mask=m_ok, other=0)[:, None]
        hi1 = tl.load(HI + offs_m * NK + 1, mask=m_ok, other=0)[:, None]
    if NK > 2:
        lo2 = tl.load(LO + offs_m * NK + 2, mask=m_ok, other=0)[:, None]
        hi2 = tl.load(HI + offs_m * NK + 2, mask=m_ok, other=0)[:, None]
    if NK > 3:
        lo3 = tl.load(LO + offs_m * NK + 3, mask=m_ok, other=0)[:, None]
        hi3 = tl.load(HI + offs_m * NK + 3, mask=m_ok, other=0)[:, None]
    dq = tl.full([BM, D], 0, tl.float32)

    f0 = tl.load(FP + pid_m)
    f1 = tl.load(FP + pid_m + 1)
    p0 = tl.load(PP + pid_m)
    p1 = tl.load(PP + pid_m + 1)
    last = tl.load(FI + f1 - 1, mask=f1 > f0, other=0)
    ragged = ((f1 > f0) & ((last + 1) * BN > T)).to(tl.int32)
    f_end = f1 - ragged
    for i in range(f0, f_end):
        kb = tl.load(FI + i)
        dq = _dq_tile(dq, q, do, lse2, delta, kd, vd, LO, HI, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, kb, offs_m,
                      m_ok, T, stride_kt, stride_vt, qk_scale, BN, NK, CD, PREC, False, SANITIZE)
    for i in range(p0, p1 + ragged):
        kb = tl.where(i < p1, tl.load(PI + i, mask=i < p1, other=0), last)
        dq = _dq_tile(dq, q, do, lse2, delta, kd, vd, LO, HI, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, kb, offs_m,
                      m_ok, T, stride_kt, stride_vt, qk_scale, BN, NK, CD, PREC, True, SANITIZE)
    tl.store(DQ + h * stride_dqh + rows * stride_dqt + dcol, (dq * scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None])


@triton.jit
def _dkdv_tile(dk, dv, k, v, qd, dod, LSE2h, DELTAh, LO, HI, mb, offs_n, T, stride_qt, stride_dot, qk_scale,
               BM: tl.constexpr, NK: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr):
    offs_m = mb * BM + tl.arange(0, BM)
    m_ok = offs_m < T
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(qd + rows * stride_qt, mask=m_ok[:, None], other=0.0).to(CD)
    do = tl.load(dod + rows * stride_dot, mask=m_ok[:, None], other=0.0).to(CD)
    lse2 = tl.load(LSE2h + offs_m, mask=m_ok, other=float("inf"))[None, :]  # rows >= T: p = 0, no mask needed
    delta = tl.load(DELTAh + offs_m, mask=m_ok, other=0.0)[None, :]
    s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [BN, BM]
    p_t = tl.math.exp2(s_t - lse2)
    if MASKED:
        c = offs_n[:, None]
        vis = (c < 0) & (offs_m[None, :] < 0)
        for j in tl.static_range(NK):
            lo = tl.load(LO + offs_m * NK + j, mask=m_ok, other=0)[None, :]
            hi = tl.load(HI + offs_m * NK + j, mask=m_ok, other=0)[None, :]
            vis = vis | ((c >= lo) & (c < hi))
        p_t = tl.where(vis, p_t, 0.0)
    dv += tl.dot(p_t.to(CD), do, input_precision=PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
    ds_t = p_t * (dp_t - delta)
    dk += tl.dot(ds_t.to(CD), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE2, DELTA, LO, HI, PP, PI, FP, FI, KVBAD,
                     T, G, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                     stride_dkt, stride_dkh, stride_dvt, stride_dvh, qk_scale, scale,
                     D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NK: tl.constexpr, CD: tl.constexpr,
                     PREC: tl.constexpr, SANITIZE: tl.constexpr):
    """PP/PI/FP/FI: the *transposed* block map (per key block, its query blocks)."""
    if (tl.load(KVBAD) != 0) != SANITIZE:
        return
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n[:, None] < T
    rows = offs_n[:, None].to(tl.int64)
    dcol = tl.arange(0, D)[None, :]
    k = tl.load(K + hk * stride_kh + rows * stride_kt + dcol, mask=n_ok, other=0.0).to(CD)
    v = tl.load(V + hk * stride_vh + rows * stride_vt + dcol, mask=n_ok, other=0.0).to(CD)
    if SANITIZE:  # K/V stay in registers for the whole program here: sanitizing costs nothing per tile
        k = tl.where(tl.abs(k) < float("inf"), k, 0.0)
        v = tl.where(tl.abs(v) < float("inf"), v, 0.0)
    dk = tl.full([BN, D], 0, tl.float32)
    dv = tl.full([BN, D], 0, tl.float32)
    f0 = tl.load(FP + pid_n)
    f1 = tl.load(FP + pid_n + 1)
    p0 = tl.load(PP + pid_n)
    p1 = tl.load(PP + pid_n + 1)
    for g in range(G):  # the query heads of this kv head's group, in a fixed order: no atomics
        h = hk * G + g
        qd = Q + h * stride_qh + dcol
        dod = DO + h * stride_doh + dcol
        base = h.to(tl.int64) * T
        for i in range(f0, f1):
            mb = tl.load(FI + i)
            dk, dv = _dkdv_tile(dk, dv, k, v, qd, dod, LSE2 + base, DELTA + base, LO, HI, mb, offs_n, T,
                                stride_qt, stride_dot, qk_scale, BM, NK, CD, PREC, False)
        for i in range(p0, p1):
            mb = tl.load(PI + i)
            dk, dv = _dkdv_tile(dk, dv, k, v, qd, dod, LSE2 + base, DELTA + base, LO, HI, mb, offs_n, T,
                                stride_qt, stride_dot, qk_scale, BM, NK, CD, PREC, True)
    tl.store(DK + hk * stride_dkh + rows * stride_dkt + dcol, (dk * scale).to(DK.dtype.element_ty), mask=n_ok)
    tl.store(DV + hk * stride_dvh + rows * stride_dvt + dcol, dv.to(DV.dtype.element_ty), mask=n_ok)


# -----------------------------------------------------------------------------------------------------------------
# The backend interface
# -----------------------------------------------------------------------------------------------------------------

def tile_sizes(q: torch.Tensor) -> tuple[int, int]:
    """(BM, BN) of the forward and dQ kernels: the block map the front builds (and caches on the Visibility)."""
    if INTERPRETED:
        return INTERPRETER_TILES
    cfg = config_for(q.shape[-1], q.dtype)
    return cfg.BM, cfg.BN


def _config(q: torch.Tensor, BM: int, BN: int) -> Config:
    """Launch parameters for these tiles: the shipped config when (BM, BN) are its tiles, else a generic one."""
    if INTERPRETED:
        one = Launch(4, 1)
        kv = INTERPRETER_KV_TILES or (BM, BN)
        return Config(BM, BN, kv[0], kv[1], one, one, one, one, one, one)
    cfg = config_for(q.shape[-1], q.dtype)
    if (cfg.BM, cfg.BN) == (BM, BN):
        return cfg
    w = Launch(8 if max(BM, BN) >= 128 else 4, 1)
    return Config(BM, BN, BM, BN, w, w, w, w, w, w)


def _check(q, BM, BN):
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        raise ValueError(f"triton state_attention: head dim {D} not supported (supported: {HEAD_DIMS})")
    if q.dtype not in DTYPES:
        raise TypeError(f"triton state_attention: dtype {q.dtype} not supported (fp16, bf16, fp32); "
                        "use backend='reference' for float64")
    for t in (BM, BN):
        if t < 16 or t & (t - 1):
            raise ValueError(f"triton state_attention: tile sizes must be powers of two >= 16, got {BM}x{BN}")


def _lastdim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _compute_dtype(dtype: torch.dtype):
    if dtype == torch.bfloat16 and INTERPRETED:
        return tl.float32  # the interpreter's bf16 arithmetic is broken: compute in fp32 after the load
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # only fp32 x fp32 dots read it


def _kv_flag(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """int32 [1] on k's device: 1 when K or V holds a non-finite value. Computed on the device, read only by the
    kernels (no host synchronization): both variants of each kernel are launched and one of them exits at once."""
    T, Hkv, D = k.shape
    flag = torch.zeros(1, dtype=torch.int32, device=k.device)
    blk = 64
    _kv_nonfinite_kernel[(triton.cdiv(T, blk), Hkv)](k, v, flag, T, k.stride(0), k.stride(1), v.stride(0),
                                                     v.stride(1), D, blk, num_warps=4)
    return flag


def _tuned(kernel):
    if kernel not in _TUNED:
        cfgs = [triton.Config({}, num_warps=t.num_warps, num_stages=t.num_stages) for t in TUNE_LAUNCHES]
        _TUNED[kernel] = triton.autotune(cfgs, key=["D", "BM", "BN", "NK"])(kernel)
    return _TUNED[kernel]


def _launch_variants(kernel, grid, args, fast: Launch, nan: Launch):
    if AUTOTUNE and not INTERPRETED:
        _tuned(kernel)[grid](*args, False)
    else:
        kernel[grid](*args, False, num_warps=fast.num_warps, num_stages=fast.num_stages)
    kernel[grid](*args, True, num_warps=nan.num_warps, num_stages=nan.num_stages)


def forward(q, k, v, vis, scale, BM, BN):
    _check(q, BM, BN)
    q, k, v = (_lastdim_contiguous(x) for x in (q, k, v))
    T, Hq, D = q.shape
    G = Hq // k.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(Hq, T, dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    cfg = _config(q, BM, BN)
    bm = vis.block_map(BM, BN)
    lo, hi = vis.lo.contiguous(), vis.hi.contiguous()
    flag = _kv_flag(k, v)
    args = (q, k, v, out, lse, lo, hi, bm.partial_ptr, bm.partial_idx, bm.full_ptr, bm.full_idx, flag,
            T, G, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), float(scale) * LOG2E,
            D, BM, BN, lo.shape[1], _compute_dtype(q.dtype), _prec(q.dtype))
    _launch_variants(_fwd_kernel, (bm.num_q_blocks, Hq), args, cfg.fwd, cfg.fwd_nan)
    return out, lse


def backward(dout, q, k, v, out, lse, vis, scale, BM, BN, deterministic):
    """Always deterministic, whatever `deterministic` says: no atomics, every sum in a fixed order (dK/dV
    accumulate over the GQA group's query heads inside one program)."""
    _check(q, BM, BN)
    q, k, v, out, dout = (_lastdim_contiguous(x) for x in (q, k, v, out, dout))
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if T == 0:
        return dq, dk, dv
    cfg = _config(q, BM, BN)
    lo, hi = vis.lo.contiguous(), vis.hi.contiguous()
    NK, cd, prec = lo.shape[1], _compute_dtype(q.dtype), _prec(q.dtype)
    qk_scale = float(scale) * LOG2E
    lse = lse.contiguous()
    lse2 = torch.empty(Hq, T, dtype=torch.float32, device=q.device)
    delta = torch.empty(Hq, T, dtype=torch.float32, device=q.device)
    blk = 64
    _bwd_preprocess_kernel[(triton.cdiv(T, blk), Hq)](
        out, dout, lse, lse2, delta, T, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), D, blk,
        num_warps=cfg.pre.num_warps, num_stages=cfg.pre.num_stages)
    flag = _kv_flag(k, v)
    bkv = vis.transposed_block_map(cfg.BM_kv, cfg.BN_kv)  # per key block: its query blocks
    _launch_variants(_bwd_dkdv_kernel, (bkv.num_q_blocks, Hkv),
                     (q, k, v, dout, dk, dv, lse2, delta, lo, hi, bkv.partial_ptr, bkv.partial_idx, bkv.full_ptr,
                      bkv.full_idx, flag, T, G, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                      v.stride(1), dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0),
                      dv.stride(1), qk_scale, float(scale), D, cfg.BM_kv, cfg.BN_kv, NK, cd, prec),
                     cfg.dkdv, cfg.dkdv_nan)
    bm = vis.block_map(BM, BN)
    _launch_variants(_bwd_dq_kernel, (bm.num_q_blocks, Hq),
                     (q, k, v, dout, dq, lse2, delta, lo, hi, bm.partial_ptr, bm.partial_idx, bm.full_ptr,
                      bm.full_idx, flag, T, G, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                      v.stride(1), dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), qk_scale,
                      float(scale), D, BM, BN, NK, cd, prec),
                     cfg.dq, cfg.dq_nan)
    return dq, dk, dv
