"""Triton backend of `state_attention` (DESIGN §4-§5): FlashAttention-2 style kernels over a block map.

Called by `mem1_fast.ops.state_attention` through

    available(device) -> bool
    tile_sizes(q) -> (BM, BN)
    forward(q, k, v, vis, scale, BM, BN) -> (out [T, Hq, D] q.dtype, lse fp32 [Hq, T] natural log)
    backward(dout, q, k, v, out, lse, vis, scale, BM, BN, deterministic) -> (dq, dk, dv)

Kernels (packed varlen layout [T, H, D] with explicit token/head strides, last dim contiguous; GQA: query head h
reads key/value head h // G, K/V are never repeated in memory):

* `_fwd_kernel`, one program per (query block, query head). Walks the key tiles the block map lists for its query
  block: *full* tiles first with no mask (the one exception is a full tile in the ragged last key block, whose
  columns >= T need masking: it joins the masked loop), then *partial* tiles masked in registers from the interval
  spec (row p sees the union over k of [lo[p,k], hi[p,k])). Online softmax in base 2 (log2(e) folded into the
  scale), fp32 accumulation, LSE saved (natural log, -inf for a row with no visible key, whose output is 0).
* `_bwd_preprocess_kernel`, per (row block, query head): delta = rowsum(dO * O) and lse2 = lse * log2(e); a row
  that takes no part in the backward (no visible key, or an output poisoned by a non-finite K/V value, see below)
  gets lse2 = +inf and delta = 0, so its probabilities recompute to exactly 0 and its gradients are 0.
* `_bwd_dkdv_kernel`, per (key block, kv head): walks the query blocks of the transposed block map, looping over
  the G query heads of the GQA group inside the program, dK/dV accumulated in registers: no atomics, fixed order.
* `_bwd_dq_kernel`, per (query block, query head): same tile walk as the forward, dQ accumulated in registers.

The backward has no atomics and a fixed reduction order, so it is deterministic: the `deterministic` argument is
always honoured. (On GPU, `deterministic=True` also pins the default launch configuration instead of the autotuned
one, so that results are bitwise reproducible across processes too.)

Non-finite K/V: the loaded K and V tiles are zeroed where non-finite (so `0 * NaN` in a matmul cannot reach rows
that cannot see that key), and a per-row flag records whether a *visible* key held one; those rows output NaN
(their LSE is computed from the zeroed values, as the reference does). Their gradients are 0, as the reference's.

fp16 / bf16 / fp32 inputs, fp32 accumulation; fp32 inputs use IEEE fp32 dot products on GPU (not tf32) so the
backend computes the same function as the reference. Under the interpreter (TRITON_INTERPRET=1, CPU tensors) bf16
is computed in fp32 after the load (the interpreter's bf16 arithmetic is broken), and a fixed small tile is used.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

# The decorators below read TRITON_INTERPRET when this module is imported; that, not the current environment,
# decides whether these kernels run interpreted (CPU tensors) or compiled (CUDA tensors).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
HEAD_DIMS = (32, 64, 128)
INTERPRETER_TILES = (16, 16)


# -----------------------------------------------------------------------------------------------------------------
# Launch configurations
# -----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Config:
    """Tiles shared by the three kernels (the block map is built for (BM, BN)) and per-kernel launch candidates.
    The first candidate of each list is the default (and the only one used when autotuning is off)."""

    BM: int
    BN: int
    fwd: tuple[Launch, ...]
    dq: tuple[Launch, ...]
    dkdv: tuple[Launch, ...]
    pre: Launch = Launch(4, 1)


def _L(*pairs):
    return tuple(Launch(w, s) for w, s in pairs)


# (head dim, "half" for fp16/bf16 | "fp32") -> Config. Chosen so that every kernel compiles for sm_80 and sm_90a
# without register spills (tests/test_state_attention_triton.py prints the ptxas figures); the alternatives are
# the usual FlashAttention-2 Triton choices, picked among by the autotuner on GPU.
CONFIGS: dict[tuple[int, str], Config] = {
    (32, "half"): Config(128, 64, fwd=_L((4, 3), (4, 2)), dq=_L((4, 2), (8, 2)), dkdv=_L((4, 2), (8, 2))),
    (64, "half"): Config(128, 64, fwd=_L((4, 3), (8, 3)), dq=_L((8, 2), (4, 2)), dkdv=_L((8, 2), (4, 2))),
    (128, "half"): Config(128, 64, fwd=_L((8, 3), (8, 2)), dq=_L((8, 2), (8, 1)), dkdv=_L((8, 2), (8, 1))),
    (32, "fp32"): Config(64, 64, fwd=_L((4, 2)), dq=_L((4, 2)), dkdv=_L((4, 2))),
    (64, "fp32"): Config(64, 64, fwd=_L((4, 2)), dq=_L((8, 2)), dkdv=_L((8, 2))),
    (128, "fp32"): Config(64, 32, fwd=_L((8, 2)), dq=_L((8, 2)), dkdv=_L((8, 2))),
}


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def config_for(D: int, dtype: torch.dtype) -> Config:
    if D not in HEAD_DIMS:
        raise ValueError(f"triton state_attention: head dim {D} not supported (supported: {HEAD_DIMS})")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton state_attention: dtype {dtype} not supported (fp16, bf16, fp32); "
                        "use backend='reference' for float64")
    return CONFIGS[(D, _dtype_class(dtype))]


def _autotune_enabled() -> bool:
    return not INTERPRETED and os.environ.get("MEM1_FAST_TRITON_AUTOTUNE", "1") not in ("0", "")


# -----------------------------------------------------------------------------------------------------------------
# Device helpers
# -----------------------------------------------------------------------------------------------------------------

@triton.jit
def _interval_mask(LO, HI, rows, row_ok, cols, NK: tl.constexpr):
    """[len(rows), len(cols)] bool: row p sees column c iff lo[p, k] <= c < hi[p, k] for some k."""
    vis = (rows[:, None] < 0) & (cols[None, :] < 0)
    for kk in tl.static_range(NK):
        lo = tl.load(LO + rows * NK + kk, mask=row_ok, other=0)
        hi = tl.load(HI + rows * NK + kk, mask=row_ok, other=0)
        vis = vis | ((cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]))
    return vis


@triton.jit
def _interval_mask_t(LO, HI, cols, rows, row_ok, NK: tl.constexpr):
    """The same mask transposed: [len(cols), len(rows)] (keys on axis 0), for the dK/dV pass."""
    vis = (cols[:, None] < 0) & (rows[None, :] < 0)
    for kk in tl.static_range(NK):
        lo = tl.load(LO + rows * NK + kk, mask=row_ok, other=0)
        hi = tl.load(HI + rows * NK + kk, mask=row_ok, other=0)
        vis = vis | ((cols[:, None] >= lo[None, :]) & (cols[:, None] < hi[None, :]))
    return vis


@triton.jit
def _load_rows(P, offs, ok, offs_d, stride_t, CD: tl.constexpr):
    """Rows `offs` of a [T, D] slice (head already applied to P), zero past T, converted to the compute dtype."""
    x = tl.load(P + offs[:, None].to(tl.int64) * stride_t + offs_d[None, :], mask=ok[:, None], other=0.0)
    return x.to(CD)


@triton.jit
def _finite(x):
    return tl.abs(x) < float("inf")


# -----------------------------------------------------------------------------------------------------------------
# Forward
# -----------------------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_tile(acc, l_i, m_i, bad, q, Kh, Vh, LO, HI, kb, offs_m, m_ok, offs_d, T, stride_kt, stride_vt, qk_scale,
              BN: tl.constexpr, NK: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr):
    offs_n = kb * BN + tl.arange(0, BN)
    n_ok = offs_n < T
    k = _load_rows(Kh, offs_n, n_ok, offs_d, stride_kt, CD)
    v = _load_rows(Vh, offs_n, n_ok, offs_d, stride_vt, CD)
    k_fin = _finite(k)
    v_fin = _finite(v)
    col_bad = tl.max(tl.where(k_fin & v_fin, 0, 1), axis=1)  # [BN]: key holds a non-finite K or V value
    k = tl.where(k_fin, k, 0.0)
    v = tl.where(v_fin, v, 0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # log2 domain
    if MASKED:
        vis = _interval_mask(LO, HI, offs_m, m_ok, offs_n, NK)
        s = tl.where(vis, s, float("-inf"))
        bad = tl.maximum(bad, tl.max(tl.where(vis, col_bad[None, :], 0), axis=1))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet: keep p = 0, no NaN
    else:
        bad = tl.maximum(bad, tl.max(col_bad, axis=0))  # every row of a full tile sees every column
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(CD), v, input_precision=PREC)
    return acc, l_i, m_new, bad


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, LO, HI, PP, PI, FP, FI,
                T, G, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                qk_scale,
                D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NK: tl.constexpr, CD: tl.constexpr,
                PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // G
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < T
    offs_d = tl.arange(0, D)
    q = _load_rows(Q + h * stride_qh, offs_m, m_ok, offs_d, stride_qt, CD)
    Kh = K + hk * stride_kh
    Vh = V + hk * stride_vh

    m_i = tl.zeros([BM], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    bad = tl.zeros([BM], dtype=tl.int32)

    f0 = tl.load(FP + pid_m)
    f1 = tl.load(FP + pid_m + 1)
    p0 = tl.load(PP + pid_m)
    p1 = tl.load(PP + pid_m + 1)
    # A full tile in the ragged last key block has columns >= T: it is processed by the masked loop.
    last = tl.load(FI + f1 - 1, mask=f1 > f0, other=0)
    ragged = ((f1 > f0) & ((last + 1) * BN > T)).to(tl.int32)
    f_end = f1 - ragged
    for i in range(f0, f_end):
        kb = tl.load(FI + i)
        acc, l_i, m_i, bad = _fwd_tile(acc, l_i, m_i, bad, q, Kh, Vh, LO, HI, kb, offs_m, m_ok, offs_d, T,
                                       stride_kt, stride_vt, qk_scale, BN, NK, CD, PREC, False)
    for i in range(p0, p1 + ragged):
        kb = tl.where(i < p1, tl.load(PI + i, mask=i < p1, other=0), last)
        acc, l_i, m_i, bad = _fwd_tile(acc, l_i, m_i, bad, q, Kh, Vh, LO, HI, kb, offs_m, m_ok, offs_d, T,
                                       stride_kt, stride_vt, qk_scale, BN, NK, CD, PREC, True)

    l_ok = l_i > 0.0
    l_safe = tl.where(l_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    out = tl.where(bad[:, None] > 0, float("nan"), out)
    lse = tl.where(l_ok, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = O + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None])
    tl.store(LSE + h.to(tl.int64) * T + offs_m, lse, mask=m_ok)


# -----------------------------------------------------------------------------------------------------------------
# Backward
# -----------------------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_preprocess_kernel(O, DO, LSE, LSE2, DELTA, T, stride_ot, stride_oh, stride_dot, stride_doh,
                           D: tl.constexpr, BLK: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs = pid * BLK + tl.arange(0, BLK)
    ok = offs < T
    offs_d = tl.arange(0, D)
    o = _load_rows(O + h * stride_oh, offs, ok, offs_d, stride_ot, tl.float32)
    do = _load_rows(DO + h * stride_doh, offs, ok, offs_d, stride_dot, tl.float32)
    dead = tl.max(tl.where(_finite(o), 0, 1), axis=1) > 0  # output poisoned by a visible non-finite K/V value
    delta = tl.sum(o * do, axis=1)
    base = h.to(tl.int64) * T
    lse = tl.load(LSE + base + offs, mask=ok, other=float("-inf"))
    out_of_play = dead | (lse == float("-inf"))
    tl.store(LSE2 + base + offs, tl.where(out_of_play, float("inf"), lse * 1.4426950408889634), mask=ok)
    tl.store(DELTA + base + offs, tl.where(out_of_play, 0.0, delta), mask=ok)


@triton.jit
def _load_kv_sanitized(Kh, Vh, offs_n, n_ok, offs_d, stride_kt, stride_vt, CD: tl.constexpr):
    k = _load_rows(Kh, offs_n, n_ok, offs_d, stride_kt, CD)
    v = _load_rows(Vh, offs_n, n_ok, offs_d, stride_vt, CD)
    return tl.where(_finite(k), k, 0.0), tl.where(_finite(v), v, 0.0)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, Kh, Vh, LO, HI, kb, offs_m, m_ok, offs_d, T, stride_kt, stride_vt, qk_scale,
             BN: tl.constexpr, NK: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr):
    offs_n = kb * BN + tl.arange(0, BN)
    n_ok = offs_n < T
    k, v = _load_kv_sanitized(Kh, Vh, offs_n, n_ok, offs_d, stride_kt, stride_vt, CD)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(_interval_mask(LO, HI, offs_m, m_ok, offs_n, NK), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(CD), k, input_precision=PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE2, DELTA, LO, HI, PP, PI, FP, FI,
                   T, G, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dqt, stride_dqh, qk_scale, scale,
                   D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NK: tl.constexpr, CD: tl.constexpr,
                   PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // G
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < T
    offs_d = tl.arange(0, D)
    q = _load_rows(Q + h * stride_qh, offs_m, m_ok, offs_d, stride_qt, CD)
    do = _load_rows(DO + h * stride_doh, offs_m, m_ok, offs_d, stride_dot, CD)
    base = h.to(tl.int64) * T
    lse2 = tl.load(LSE2 + base + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + base + offs_m, mask=m_ok, other=0.0)
    Kh = K + hk * stride_kh
    Vh = V + hk * stride_vh
    dq = tl.zeros([BM, D], dtype=tl.float32)

    f0 = tl.load(FP + pid_m)
    f1 = tl.load(FP + pid_m + 1)
    p0 = tl.load(PP + pid_m)
    p1 = tl.load(PP + pid_m + 1)
    last = tl.load(FI + f1 - 1, mask=f1 > f0, other=0)
    ragged = ((f1 > f0) & ((last + 1) * BN > T)).to(tl.int32)
    f_end = f1 - ragged
    for i in range(f0, f_end):
        kb = tl.load(FI + i)
        dq = _dq_tile(dq, q, do, lse2, delta, Kh, Vh, LO, HI, kb, offs_m, m_ok, offs_d, T, stride_kt, stride_vt,
                      qk_scale, BN, NK, CD, PREC, False)
    for i in range(p0, p1 + ragged):
        kb = tl.where(i < p1, tl.load(PI + i, mask=i < p1, other=0), last)
        dq = _dq_tile(dq, q, do, lse2, delta, Kh, Vh, LO, HI, kb, offs_m, m_ok, offs_d, T, stride_kt, stride_vt,
                      qk_scale, BN, NK, CD, PREC, True)
    dq_ptrs = DQ + h * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _dkdv_tile(dk, dv, k, v, Qh, DOh, LSE2h, DELTAh, LO, HI, mb, offs_n, offs_d, T, stride_qt, stride_dot, qk_scale,
               BM: tl.constexpr, NK: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr):
    offs_m = mb * BM + tl.arange(0, BM)
    m_ok = offs_m < T
    q = _load_rows(Qh, offs_m, m_ok, offs_d, stride_qt, CD)
    do = _load_rows(DOh, offs_m, m_ok, offs_d, stride_dot, CD)
    lse2 = tl.load(LSE2h + offs_m, mask=m_ok, other=float("inf"))  # rows >= T: p = 0, no mask needed
    delta = tl.load(DELTAh + offs_m, mask=m_ok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [BN, BM]
    p_t = tl.math.exp2(s_t - lse2[None, :])
    if MASKED:
        p_t = tl.where(_interval_mask_t(LO, HI, offs_n, offs_m, m_ok, NK), p_t, 0.0)
    dv += tl.dot(p_t.to(CD), do, input_precision=PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(CD), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE2, DELTA, LO, HI, PP, PI, FP, FI,
                     T, G, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                     stride_dkt, stride_dkh, stride_dvt, stride_dvh, qk_scale, scale,
                     D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NK: tl.constexpr, CD: tl.constexpr,
                     PREC: tl.constexpr):
    """PP/PI/FP/FI: the *transposed* block map (per key block, the query blocks)."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < T
    offs_d = tl.arange(0, D)
    k, v = _load_kv_sanitized(K + hk * stride_kh, V + hk * stride_vh, offs_n, n_ok, offs_d, stride_kt, stride_vt,
                              CD)
    dk = tl.zeros([BN, D], dtype=tl.float32)
    dv = tl.zeros([BN, D], dtype=tl.float32)
    f0 = tl.load(FP + pid_n)
    f1 = tl.load(FP + pid_n + 1)
    p0 = tl.load(PP + pid_n)
    p1 = tl.load(PP + pid_n + 1)
    for g in range(0, G):  # the query heads of this kv head's group, in a fixed order: no atomics
        h = hk * G + g
        Qh = Q + h * stride_qh
        DOh = DO + h * stride_doh
        base = h.to(tl.int64) * T
        for i in range(f0, f1):
            mb = tl.load(FI + i)
            dk, dv = _dkdv_tile(dk, dv, k, v, Qh, DOh, LSE2 + base, DELTA + base, LO, HI, mb, offs_n, offs_d, T,
                                stride_qt, stride_dot, qk_scale, BM, NK, CD, PREC, False)
        for i in range(p0, p1):
            mb = tl.load(PI + i)
            dk, dv = _dkdv_tile(dk, dv, k, v, Qh, DOh, LSE2 + base, DELTA + base, LO, HI, mb, offs_n, offs_d, T,
                                stride_qt, stride_dot, qk_scale, BM, NK, CD, PREC, True)
    row = offs_n[:, None].to(tl.int64)
    tl.store(DK + hk * stride_dkh + row * stride_dkt + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=n_ok[:, None])
    tl.store(DV + hk * stride_dvh + row * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=n_ok[:, None])


# -----------------------------------------------------------------------------------------------------------------
# Autotuned launchers (GPU): only num_warps / num_stages vary, the tiles are fixed by the block map.
# -----------------------------------------------------------------------------------------------------------------

def _candidates(kernel: str) -> list[triton.Config]:
    """Every launch candidate of `kernel` over all configs; the pre_hook-free autotuner prunes to the ones of the
    current (D, dtype class) through `_prune`."""
    seen, out = set(), []
    for (D, cls), cfg in CONFIGS.items():
        for launch in getattr(cfg, kernel):
            key = (D, cls, launch)
            if key not in seen:
                seen.add(key)
                out.append(triton.Config({}, num_warps=launch.num_warps, num_stages=launch.num_stages,
                                         pre_hook=None))
                out[-1].mem1_key = key  # which (D, class) it belongs to
    return out


def _prune_for(kernel: str):
    def prune(configs, named_args, **kwargs):
        D = named_args["D"] if "D" in named_args else kwargs["D"]
        cls = "fp32" if named_args["Q"].dtype == torch.float32 else "half"
        keep = [c for c in configs if c.mem1_key[:2] == (D, cls)]
        return keep or configs[:1]
    return prune


def _autotuned(fn, kernel: str):
    if INTERPRETED:
        return None
    return triton.autotune(configs=_candidates(kernel), key=["D", "BM", "BN", "NK"],
                           prune_configs_by={"early_config_prune": _prune_for(kernel)})(fn)


_FWD_TUNED = _autotuned(_fwd_kernel, "fwd")
_DQ_TUNED = _autotuned(_bwd_dq_kernel, "dq")
_DKDV_TUNED = _autotuned(_bwd_dkdv_kernel, "dkdv")


def _launch(fn, tuned, grid, args, launch: Launch, autotune: bool):
    if autotune and tuned is not None:
        tuned[grid](*args)
    else:
        fn[grid](*args, num_warps=launch.num_warps, num_stages=launch.num_stages)


# -----------------------------------------------------------------------------------------------------------------
# The backend interface
# -----------------------------------------------------------------------------------------------------------------

def available(device: str) -> bool:
    dev = torch.device(device).type
    if dev == "cpu":
        return INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1"
    if dev == "cuda":
        if INTERPRETED or not torch.cuda.is_available():
            return False
        try:
            return triton.runtime.driver.active.get_current_target().backend == "cuda"
        except Exception:
            return False
    return False


def tile_sizes(q: torch.Tensor) -> tuple[int, int]:
    if INTERPRETED:
        return INTERPRETER_TILES
    cfg = config_for(q.shape[-1], q.dtype)
    return cfg.BM, cfg.BN


def _compute_dtype(dtype: torch.dtype):
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16:
        return tl.float32 if INTERPRETED else tl.bfloat16
    return tl.float32


def _launch_config(q: torch.Tensor, BM: int, BN: int) -> Config:
    """The launch candidates for these tiles: the shipped config when the tiles are its, else a safe default."""
    if INTERPRETED:
        return Config(BM, BN, fwd=_L((4, 1)), dq=_L((4, 1)), dkdv=_L((4, 1)))
    cfg = config_for(q.shape[-1], q.dtype)
    if (cfg.BM, cfg.BN) == (BM, BN):
        return cfg
    return Config(BM, BN, fwd=_L((4, 2)), dq=_L((4, 2)), dkdv=_L((4, 2)))


def _check(q, k, v, BM, BN):
    T, Hq, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"triton state_attention: head dim {D} not supported (supported: {HEAD_DIMS})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton state_attention: dtype {q.dtype} not supported (fp16, bf16, fp32); "
                        "use backend='reference' for float64")
    for t in (BM, BN):
        if t < 16 or t & (t - 1):
            raise ValueError(f"triton state_attention: tile sizes must be powers of two >= 16, got {BM}x{BN}")


def _transposed(vis, bm):
    """The transposed block map (dK/dV pass), cached beside the block map on the Visibility: built once per batch."""
    cache = getattr(vis, "_block_maps", None)
    if cache is None:
        return bm.transpose()
    key = ("transposed", bm.BM, bm.BN)
    hit = cache.get(key)
    if hit is None or hit[0] is not bm:
        hit = cache[key] = (bm, bm.transpose())
    return hit[1]


def _lastdim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # only fp32 x fp32 dots read it


def forward(q, k, v, vis, scale, BM, BN):
    _check(q, k, v, BM, BN)
    q, k, v = (_lastdim_contiguous(x) for x in (q, k, v))
    T, Hq, D = q.shape
    G = Hq // k.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(Hq, T, dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    bm = vis.block_map(BM, BN)
    lo, hi = vis.lo.contiguous(), vis.hi.contiguous()
    cfg = _launch_config(q, BM, BN)
    args = (q, k, v, out, lse, lo, hi, bm.partial_ptr, bm.partial_idx, bm.full_ptr, bm.full_idx,
            T, G, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), float(scale) * LOG2E,
            D, BM, BN, lo.shape[1], _compute_dtype(q.dtype), _prec(q.dtype))
    _launch(_fwd_kernel, _FWD_TUNED, (bm.num_q_blocks, Hq), args, cfg.fwd[0], _autotune_enabled())
    return out, lse


def backward(dout, q, k, v, out, lse, vis, scale, BM, BN, deterministic):
    """Deterministic always (no atomics, fixed order); `deterministic=True` also skips autotuning on GPU."""
    _check(q, k, v, BM, BN)
    q, k, v, out, dout = (_lastdim_contiguous(x) for x in (q, k, v, out, dout))
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if T == 0:
        return dq, dk, dv
    bm = vis.block_map(BM, BN)
    bmt = _transposed(vis, bm)
    lo, hi = vis.lo.contiguous(), vis.hi.contiguous()
    lse = lse.contiguous()
    lse2 = torch.empty(Hq, T, dtype=torch.float32, device=q.device)
    delta = torch.empty(Hq, T, dtype=torch.float32, device=q.device)
    cfg = _launch_config(q, BM, BN)
    blk = 16 if INTERPRETED else 64
    _bwd_preprocess_kernel[(triton.cdiv(T, blk), Hq)](
        out, dout, lse, lse2, delta, T, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), D, blk,
        num_warps=cfg.pre.num_warps, num_stages=cfg.pre.num_stages)
    cd, prec, NK = _compute_dtype(q.dtype), _prec(q.dtype), lo.shape[1]
    qk_scale = float(scale) * LOG2E
    autotune = _autotune_enabled() and not deterministic
    _launch(_bwd_dkdv_kernel, _DKDV_TUNED, (bmt.num_q_blocks, Hkv),
            (q, k, v, dout, dk, dv, lse2, delta, lo, hi, bmt.partial_ptr, bmt.partial_idx, bmt.full_ptr,
             bmt.full_idx, T, G, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
             dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
             qk_scale, float(scale), D, BM, BN, NK, cd, prec),
            cfg.dkdv[0], autotune)
    _launch(_bwd_dq_kernel, _DQ_TUNED, (bm.num_q_blocks, Hq),
            (q, k, v, dout, dq, lse2, delta, lo, hi, bm.partial_ptr, bm.partial_idx, bm.full_ptr, bm.full_idx,
             T, G, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
             dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), qk_scale, float(scale),
             D, BM, BN, NK, cd, prec),
            cfg.dq[0], autotune)
    return dq, dk, dv
