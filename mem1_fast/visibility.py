"""The visibility policy as data: for every token p of a packed batch, up to K half-open key intervals [lo, hi).

This is the *policy* (which token sees which). Kernels are the *mechanism*: they read a block map built from it
and never learn which consolidation mode produced it, so a new consolidation rule needs no kernel change.

Memory is O(T*K); nothing here ever builds a T x T tensor except `dense()`, which exists for tests.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary


class VisibilityError(ValueError):
    """An interval spec that breaks the contract of docs/design.md §4."""


@dataclass(frozen=True)
class BlockMap:
    """Tiles of a (BM x BN)-tiled attention that hold at least one visible pair, in CSR form per query block.

    `full_*` tiles are entirely visible (no masking work); `partial_*` tiles need the per-element mask. Key-block
    indices ascend within each query block. Empty tiles are absent.
    """

    BM: int
    BN: int
    T: int
    partial_ptr: torch.Tensor  # int32 [nQ+1]
    partial_idx: torch.Tensor  # int32 [nnz_partial]
    full_ptr: torch.Tensor  # int32 [nQ+1]
    full_idx: torch.Tensor  # int32 [nnz_full]

    @property
    def num_q_blocks(self) -> int:
        return self.partial_ptr.numel() - 1

    @property
    def num_k_blocks(self) -> int:
        return -(-self.T // self.BN)

    def tile_area(self) -> int:
        """Number of (row, col) pairs the kernels touch: the clipped area of every listed tile."""
        rows = _block_sizes(self.T, self.BM).long()
        cols = _block_sizes(self.T, self.BN).long()
        area = 0
        for ptr, idx in ((self.partial_ptr, self.partial_idx), (self.full_ptr, self.full_idx)):
            per_q = torch.diff(ptr.long())
            area += int((torch.repeat_interleave(rows, per_q) * cols[idx.long()]).sum())
        return area

    def transpose(self) -> "BlockMap":
        """The same tiles indexed by key block (for the dK/dV pass): ptr over key blocks, idx = query blocks."""
        return BlockMap(self.BN, self.BM, self.T, *_csr_transpose(self.partial_ptr, self.partial_idx,
                                                                  self.num_k_blocks),
                        *_csr_transpose(self.full_ptr, self.full_idx, self.num_k_blocks))


@dataclass
class Visibility:
    """Interval spec of a packed batch. `lo`, `hi`: int32 [T, K]; `cu_seqlens`: int32 [B+1] trajectory bounds.

    Row p sees key c iff lo[p,k] <= c < hi[p,k] for some k. Canonical form (enforced by `validate`): per row,
    non-empty intervals first, sorted, disjoint and not touching; empty slots are (0, 0); hi <= p + 1; no interval
    leaves its trajectory.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    cu_seqlens: torch.Tensor | None = None

    @property
    def T(self) -> int:
        return self.lo.shape[0]

    @property
    def K(self) -> int:
        return self.lo.shape[1]

    def to(self, device) -> "Visibility":
        cu = None if self.cu_seqlens is None else self.cu_seqlens.to(device)
        return Visibility(self.lo.to(device), self.hi.to(device), cu)

    def validate(self) -> "Visibility":
        lo, hi = self.lo, self.hi
        if lo.dim() != 2 or lo.shape != hi.shape:
            raise VisibilityError(f"lo and hi must be [T, K] of one shape, got {tuple(lo.shape)} and {tuple(hi.shape)}")
        if lo.dtype != torch.int32 or hi.dtype != torch.int32:
            raise VisibilityError(f"lo and hi must be int32, got {lo.dtype} and {hi.dtype}")
        T, K = lo.shape
        lo64, hi64 = lo.long(), hi.long()
        p = torch.arange(T, device=lo.device)[:, None]
        _fail_at(lo64 < 0, "negative interval start (lo < 0)", lo, hi)
        _fail_at(lo64 > hi64, "interval with lo > hi", lo, hi)
        _fail_at(hi64 > p + 1, "interval reaches past its own row (hi > p + 1: attention must stay causal)", lo, hi)
        empty = lo64 == hi64
        _fail_at(empty & (lo64 != 0), "empty interval not stored as (0, 0)", lo, hi)
        if K > 1:
            # non-empty slots first, then sorted, disjoint and not touching (touching ones must be merged)
            _fail_at(empty[:, :-1] & ~empty[:, 1:], "empty interval slot before a non-empty one", lo, hi)
            both = ~empty[:, :-1] & ~empty[:, 1:]
            _fail_at(both & (lo64[:, 1:] <= hi64[:, :-1]),
                     "overlapping, touching or unsorted intervals in one row", lo, hi)
        if self.cu_seqlens is not None:
            cu = self.cu_seqlens.long()
            if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != T or bool((cu[1:] < cu[:-1]).any()):
                raise VisibilityError(f"cu_seqlens must rise from 0 to T={T}, got {cu.tolist()[:8]}...")
            seq = torch.bucketize(torch.arange(T, device=cu.device), cu[1:], right=True)
            start = cu[seq][:, None]
            _fail_at(~empty & (lo64 < start), "interval crosses into another trajectory", lo, hi)
        return self

    def block_map(self, BM: int, BN: int, backend: str | None = None) -> BlockMap:
        """Block map for tiles (BM, BN), built once and cached: every layer of a forward reuses it."""
        maps = block_map_cache(self.lo, self.hi)
        if (BM, BN) not in maps:
            maps[(BM, BN)] = build_block_map(self.lo, self.hi, BM, BN, backend)
        return maps[(BM, BN)]

    def transposed_block_map(self, BM: int, BN: int) -> BlockMap:
        """`block_map(BM, BN)` indexed by key block (the backward's dK/dV pass), cached beside it."""
        maps = block_map_cache(self.lo, self.hi)
        if ("transposed", BM, BN) not in maps:
            maps[("transposed", BM, BN)] = self.block_map(BM, BN).transpose()
        return maps[("transposed", BM, BN)]

    def dense(self) -> torch.Tensor:
        """[T, T] bool mask, True = visible. For tests and small examples only."""
        T = self.T
        cols = torch.arange(T, device=self.lo.device)
        lo, hi = self.lo.long()[:, :, None], self.hi.long()[:, :, None]
        return ((cols >= lo) & (cols < hi)).any(1)

    def visible_pairs(self) -> int:
        return int((self.hi.long() - self.lo.long()).sum())


# Block maps are cached per (lo, hi) pair of tensors, not per Visibility object: the registered ops
# (torch.ops.mem1_fast.state_attention) receive lo and hi as tensors, and every layer of a forward -- eager or
# compiled -- passes the same two, so the map is built once per batch either way. The key is held weakly (a map
# lives as long as its lo); an in-place change of lo or hi (their version counters) invalidates the entry.
_BLOCK_MAPS = WeakIdKeyDictionary()


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and cannot change outside inference mode)
        return -1


def block_map_cache(lo: torch.Tensor, hi: torch.Tensor) -> dict:
    """The dict of block maps built for this (lo, hi): {(BM, BN): BlockMap, ("transposed", BM, BN): BlockMap}."""
    entry = _BLOCK_MAPS.get(lo)
    stamp = (_version(lo), _version(hi))
    if entry is None or entry[0]() is not hi or entry[1] != stamp:
        entry = (weakref.ref(hi), stamp, {})
        _BLOCK_MAPS[lo] = entry
    return entry[2]


def _fail_at(bad: torch.Tensor, what: str, lo, hi):
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise VisibilityError(f"{what}: row {r} has intervals lo={lo[r].tolist()} hi={hi[r].tolist()}")


def canonical(lo: torch.Tensor, hi: torch.Tensor, K: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row's intervals, merge overlapping or touching ones, move empties to the end as (0, 0)."""
    lo, hi = lo.long(), hi.long()
    T, K0 = lo.shape
    empty = hi <= lo
    key = torch.where(empty, torch.full_like(lo, torch.iinfo(torch.int64).max), lo)
    order = key.argsort(dim=1, stable=True)
    lo, hi, empty = lo.gather(1, order), hi.gather(1, order), empty.gather(1, order)
    out_lo, out_hi = lo.clone(), hi.clone()
    keep = ~empty
    for k in range(1, K0):  # merge slot k into the last kept slot before it when they overlap or touch
        prev = torch.where(keep[:, :k], torch.arange(k), -1).amax(1).clamp(min=0)[:, None]
        prev_hi = out_hi.gather(1, prev)[:, 0]
        join = keep[:, k] & keep.gather(1, prev)[:, 0] & (lo[:, k] <= prev_hi)
        out_hi.scatter_(1, prev, torch.where(join, torch.maximum(prev_hi, hi[:, k]), prev_hi)[:, None])
        keep[:, k] &= ~join
    # compact kept slots to the front
    order = (~keep).long().argsort(dim=1, stable=True)
    out_lo, out_hi, keep = out_lo.gather(1, order), out_hi.gather(1, order), keep.gather(1, order)
    out_lo = torch.where(keep, out_lo, 0)
    out_hi = torch.where(keep, out_hi, 0)
    K = K0 if K is None else K
    if K < K0:
        if bool(keep[:, K:].any()):
            raise VisibilityError(f"a row needs more than K={K} intervals")
        out_lo, out_hi = out_lo[:, :K], out_hi[:, :K]
    return out_lo.to(torch.int32).contiguous(), out_hi.to(torch.int32).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Block map construction
# ---------------------------------------------------------------------------------------------------------------

def _block_sizes(T: int, B: int) -> torch.Tensor:
    n = -(-T // B)
    return (torch.arange(n) * B + B).clamp(max=T) - torch.arange(n) * B


def build_block_map(lo: torch.Tensor, hi: torch.Tensor, BM: int, BN: int, backend: str | None = None) -> BlockMap:
    """Classify tiles as full / partial / empty from the intervals, without any T x T (or nQ x nK) tensor.

    backend: "cpp" (the C++ op, default when built), "torch" (vectorized torch ops), or None (auto).
    """
    if BM <= 0 or BN <= 0:
        raise VisibilityError(f"tile sizes must be positive, got BM={BM} BN={BN}")
    T = lo.shape[0]
    if backend in (None, "cpp") and lo.device.type == "cpu":
        from . import _ext
        if backend == "cpp" or _ext.available():
            _ext.load()
            out = torch.ops.mem1_fast.block_map(lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous(),
                                                BM, BN)
            return BlockMap(BM, BN, T, *out)
    return BlockMap(BM, BN, T, *_block_map_torch(lo, hi, BM, BN))


def _block_map_torch(lo: torch.Tensor, hi: torch.Tensor, BM: int, BN: int):
    """Vectorized build. Per query block, counts over its key-block range [first, last] via points + a difference
    array: an interval adds its overlap to its first and last key block and BN to every block in between."""
    dev = lo.device
    T, K = lo.shape
    nQ = -(-T // BM)
    lo64, hi64 = lo.long().reshape(-1), hi.long().reshape(-1)
    qb = (torch.arange(T, device=dev) // BM).repeat_interleave(K)
    ne = hi64 > lo64
    qb, lo64, hi64 = qb[ne], lo64[ne], hi64[ne]
    f, l = lo64 // BN, (hi64 - 1) // BN
    big = torch.iinfo(torch.int64).max
    rmin = torch.full((nQ,), big, device=dev).scatter_reduce(0, qb, f, "amin")
    rmax = torch.full((nQ,), -1, device=dev, dtype=torch.long).scatter_reduce(0, qb, l, "amax")
    size = torch.where(rmax >= 0, rmax - rmin + 1, 0)
    off = torch.cumsum(size, 0) - size
    total = int(size.sum())
    base = off[qb] - rmin[qb]
    points = torch.zeros(total + 1, dtype=torch.long, device=dev)
    diff = torch.zeros(total + 1, dtype=torch.long, device=dev)
    single = f == l
    points.index_add_(0, (base + f)[single], (hi64 - lo64)[single])
    m = ~single
    points.index_add_(0, (base + f)[m], ((f + 1) * BN - lo64)[m])
    points.index_add_(0, (base + l)[m], (hi64 - l * BN)[m])
    mid = m & (l - f >= 2)
    ones = torch.full((int(mid.sum()),), BN, dtype=torch.long, device=dev)
    diff.index_add_(0, (base + f + 1)[mid], ones)
    diff.index_add_(0, (base + l)[mid], -ones)
    counts = points[:total] + torch.cumsum(diff, 0)[:total]
    # which (qb, kb) each entry is, and the clipped tile area
    eq = torch.repeat_interleave(torch.arange(nQ, device=dev), size)
    ek = rmin[eq] + (torch.arange(total, device=dev) - off[eq])
    rows = (torch.clamp((eq + 1) * BM, max=T) - eq * BM)
    cols = (torch.clamp((ek + 1) * BN, max=T) - ek * BN)
    full = counts == rows * cols
    part = (counts > 0) & ~full

    def csr(sel):
        ptr = torch.zeros(nQ + 1, dtype=torch.int32, device=dev)
        ptr[1:] = torch.cumsum(torch.bincount(eq[sel], minlength=nQ), 0).to(torch.int32)
        return ptr, ek[sel].to(torch.int32)

    return (*csr(part), *csr(full))


def _csr_transpose(ptr: torch.Tensor, idx: torch.Tensor, n_cols: int):
    rows = torch.repeat_interleave(torch.arange(ptr.numel() - 1, device=ptr.device), torch.diff(ptr.long()))
    cols = idx.long()
    order = torch.argsort(cols * (ptr.numel()) + rows)
    new_ptr = torch.zeros(n_cols + 1, dtype=torch.int32, device=ptr.device)
    new_ptr[1:] = torch.cumsum(torch.bincount(cols, minlength=n_cols), 0).to(torch.int32)
    return new_ptr, rows[order].to(torch.int32)
