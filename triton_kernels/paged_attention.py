"""Triton backend of paged_attention (mem1_fast/ops/paged_attention.py): paged decode over block tables.

    available(device) -> bool
    forward(q, k_cache, v_cache, block_table, seq, lo, hi, scale) -> out [T, Hq, D] in q's dtype

Grid (row, key/value head, split). A program loads the G = Hq / Hkv query heads of its group once (GQA: every key
and value it reads serves all of them), walks its share of the row's slot span in tiles of `block_n(G, D)` slots,
looks each slot's block up in the row's sequence's table (slot s: offset s % BS of block table[seq, s / BS]) and
reads K/V in place, masked to the row's intervals, with an online softmax in fp32 (fp64 for fp64). Split-K: the
span is cut into `splits` contiguous shares so that long contexts at small batch still fill the GPU; each share
writes its (max, sum, unnormalised output) and `_combine_kernel` merges them in a fixed order (deterministic, no
atomics).
The number of splits comes from the shapes alone (the table's width bounds the span), so launching needs no sync.

Slots outside a row's intervals are never loaded (masked loads), so never-written or evicted memory cannot leak;
the index values are not checked here (a device-side check would need a sync): the front's reference path and the
CPU kernel check them, and the engine builds them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, MAX, SUM, available  # noqa: F401 (available: the backend interface)

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TILE_ELEMENTS = 4096  # the scores' broadcast product [BLOCK_G, BLOCK_N, BLOCK_D] per tile: 32 fp32 per thread at
# 4 warps, no spill in any shipped configuration (tools/triton_report.py); twice that spilled at G = 8, D = 128
MIN_SPLIT_SLOTS = 256  # no split covers fewer slots than this: the combine must stay cheap against the work


@triton.jit
def _paged_kernel(Q, KC, VC, TAB, SEQ, LO, HI, PO, PM, PL, scale, Hkv, BS, MAXB, K, split_slots, n_splits,
                  G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    b = tl.load(SEQ + t).to(tl.int64)
    # the row's slot span: the hull of its non-empty intervals
    s0 = tl.load(LO + t * K) * 0 + 2147483647
    s1 = s0 * 0
    for k in range(K):
        a = tl.load(LO + t * K + k)
        e = tl.load(HI + t * K + k)
        s0 = tl.where(e > a, tl.minimum(s0, a), s0)
        s1 = tl.where(e > a, tl.maximum(s1, e), s1)
    s0 = tl.minimum(s0, s1)  # a row that sees nothing: the empty span [0, 0)
    start = s0 + sp * split_slots
    end = tl.minimum(start + split_slots, s1)

    og = tl.arange(0, BLOCK_G)
    od = tl.arange(0, BLOCK_D)
    gm = og < G
    dm = od < D
    heads = h * G + og
    q = tl.load(Q + (t * Hkv * G + heads)[:, None] * D + od[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    q = q.to(ACC) * scale
    m = tl.full([BLOCK_G], float("-inf"), ACC)
    lsum = tl.zeros([BLOCK_G], ACC)
    acc = tl.zeros([BLOCK_G, BLOCK_D], ACC)
    for n0 in range(start, end, BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)
        vis = slots < 0  # all False
        for k in range(K):
            a = tl.load(LO + t * K + k)
            e = tl.load(HI + t * K + k)
            vis = vis | ((slots >= a) & (slots < e))
        blk = tl.load(TAB + b * MAXB + slots // BS, mask=vis, other=0).to(tl.int64)
        row = (blk * BS + slots % BS) * Hkv + h
        kv_mask = vis[:, None] & dm[None, :]
        kk = tl.load(KC + row[:, None] * D + od[None, :], mask=kv_mask, other=0.0).to(ACC)
        vv = tl.load(VC + row[:, None] * D + od[None, :], mask=kv_mask, other=0.0).to(ACC)
        s = tl.reduce(q[:, None, :] * kk[None, :, :], 2, SUM)  # [BLOCK_G, BLOCK_N]
        s = tl.where(vis[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(s, 1, MAX))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with nothing seen so far: no -inf - -inf
        p = tl.exp(s - base[:, None])
        alpha = tl.exp(m - base)
        lsum = lsum * alpha + tl.reduce(p, 1, SUM)
        acc = acc * alpha[:, None] + tl.reduce(p[:, :, None] * vv[None, :, :], 1, SUM)
        m = m_new
    part = (t * Hkv * G + heads) * n_splits + sp  # [BLOCK_G]
    tl.store(PM + part, m, mask=gm)
    tl.store(PL + part, lsum, mask=gm)
    tl.store(PO + part[:, None] * D + od[None, :], acc, mask=gm[:, None] & dm[None, :])


@triton.jit
def _combine_kernel(PO, PM, PL, OUT, n_splits, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (row, query head): out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s, 0 if nothing seen."""
    r = tl.program_id(0)
    os_ = tl.arange(0, BLOCK_S)
    od = tl.arange(0, BLOCK_D)
    sm = os_ < n_splits
    m = tl.load(PM + r * n_splits + os_, mask=sm, other=float("-inf"))
    lsum = tl.load(PL + r * n_splits + os_, mask=sm, other=0.0)
    o = tl.load(PO + (r * n_splits + os_)[:, None] * D + od[None, :], mask=sm[:, None] & (od < D)[None, :],
                other=0.0)
    mx = tl.reduce(m, 0, MAX)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - tl.where(mx == float("-inf"), 0.0, mx)))
    den = tl.reduce(w * lsum, 0, SUM)
    num = tl.reduce(w[:, None] * o, 0, SUM)
    out = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(OUT + r * D + od, out.to(OUT.dtype.element_ty), mask=od < D)


def block_n(G: int, D: int) -> int:
    """Slots per tile for G query heads per group and head dim D: the broadcast product within TILE_ELEMENTS."""
    bg, bd = triton.next_power_of_2(G), triton.next_power_of_2(D)
    return max(8, min(64, TILE_ELEMENTS // (bg * bd)))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so tests cover the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(T: int, Hkv: int, max_slots: int, device: torch.device) -> int:
    """Splits per (row, head): enough programs for two waves over the SMs, none covering < MIN_SPLIT_SLOTS."""
    want = max(1, -(-2 * _num_sms(device) // max(1, T * Hkv)))
    return max(1, min(want, -(-max_slots // MIN_SPLIT_SLOTS)))


def forward(q, k_cache, v_cache, block_table, seq, lo, hi, scale: float, splits: int | None = None):
    T, Hq, D = q.shape
    NB, BS, Hkv, _ = k_cache.shape
    out = torch.empty_like(q)
    if T == 0:
        return out
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n = splits or num_splits(T, Hkv, block_table.shape[1] * BS, q.device)
    split_slots = -(-block_table.shape[1] * BS // n)
    G = Hq // Hkv
    bn = block_n(G, D)
    split_slots = -(-split_slots // bn) * bn
    po = torch.empty(T, Hq, n, D, dtype=acc, device=q.device)
    pm = torch.empty(T, Hq, n, dtype=acc, device=q.device)
    pl = torch.empty(T, Hq, n, dtype=acc, device=q.device)
    qc = q.contiguous()
    _paged_kernel[(T, Hkv, n)](
        qc, k_cache, v_cache, block_table.contiguous(), seq.contiguous(), lo.contiguous(), hi.contiguous(), po, pm,
        pl, float(scale), Hkv, BS, block_table.shape[1], lo.shape[1], split_slots, n, G=G, D=D,
        BLOCK_G=triton.next_power_of_2(G), BLOCK_D=triton.next_power_of_2(D), BLOCK_N=bn,
        ACC=tl.float64 if acc == torch.float64 else tl.float32)
    _combine_kernel[(T * Hq,)](po, pm, pl, out, n, D=D, BLOCK_S=triton.next_power_of_2(n),
                               BLOCK_D=triton.next_power_of_2(D))
    return out
