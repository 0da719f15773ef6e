"""paged_attention: attention of new tokens over a paged KV cache (the paged engine's decode and observation prefill).

    out = paged_attention(q, k_cache, v_cache, block_table, seq, lo, hi, scale=None)   # [T, Hq, D]

q: [T, Hq, D], the query rows of any number of sequences (one decode token each, or an observation's tokens), with
their keys already written to the cache. k_cache, v_cache: [num_blocks, block_size, Hkv, D], one layer's storage
of a `rollout.kv_pool.BlockPool`, RoPE already applied to K. block_table: int32 [B, max_blocks], row b the blocks of
sequence b in slot order (-1 past its end). seq: int32 [T], the sequence of each row. lo, hi: int32 [T, K], the
intervals of slots row t sees, in Visibility's form (slot s of a sequence is offset s % block_size of block
block_table[b, s // block_size]); evicted slots that still sit in a live block are simply left out of the
intervals. A row that sees no slot outputs 0.

Backends: "cpp" (csrc/cpu/paged_attention.cpp, the CPU default), "triton" (triton_kernels/paged_attention.py, the
GPU default: paged decode with split-K over the slots, GQA) and "reference" (plain PyTorch below: each row gathers
only the slot span its own intervals cover). The kernels read K/V through the table in place and check every index
they read; the reference checks the index values here first (reductions over lo/hi the kernels need not pay).
"""
from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch

from ._dispatch import Backends

REFERENCE_CHUNK = 256  # query rows per gather of the reference: bounds its memory to chunk x span per head


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    seq: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: float | None = None,
                    backend: str | None = None) -> torch.Tensor:
    _check_shapes(q, k_cache, v_cache, block_table, seq, lo, hi)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    impl = _backends.module(_backends.pick(backend, q))
    return impl.forward(q, k_cache, v_cache, block_table, seq, lo, hi, scale)


def _check_shapes(q, k_cache, v_cache, block_table, seq, lo, hi):
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"paged_attention: q must be [T, Hq, D] and k_cache, v_cache one shape [blocks, block_size, "
                         f"Hkv, D], got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    T, Hq, D = q.shape
    if k_cache.shape[3] != D or Hq % k_cache.shape[2]:
        raise ValueError(f"paged_attention: head dim {D} and {Hq} query heads do not fit a cache of "
                         f"{k_cache.shape[2]} key/value heads of dim {k_cache.shape[3]}")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"paged_attention: q and the caches must share a dtype, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    for name, x in (("block_table", block_table), ("seq", seq), ("lo", lo), ("hi", hi)):
        if x.dtype != torch.int32:
            raise ValueError(f"paged_attention: {name} must be int32, got {x.dtype}")
    if block_table.dim() != 2 or seq.shape != (T,) or lo.dim() != 2 or lo.shape != hi.shape or lo.shape[0] != T:
        raise ValueError(f"paged_attention: block_table must be [B, max_blocks], seq [T={T}], lo and hi [T, K], got "
                         f"{tuple(block_table.shape)}, {tuple(seq.shape)}, {tuple(lo.shape)}, {tuple(hi.shape)}")
    if not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("paged_attention: k_cache and v_cache must be contiguous (a pool's storage)")
    devs = {x.device for x in (q, k_cache, v_cache, block_table, seq, lo, hi)}
    if len(devs) > 1:
        raise ValueError(f"paged_attention: every input must be on one device, got {sorted(map(str, devs))}")


def _check_indices(q, k_cache, block_table, seq, lo, hi):
    T = q.shape[0]
    if T and (int(seq.min()) < 0 or int(seq.max()) >= block_table.shape[0]):
        raise ValueError(f"paged_attention: seq must index the {block_table.shape[0]} rows of block_table")
    if T and bool((lo > hi).any() | (lo < 0).any()):
        raise ValueError("paged_attention: every interval needs 0 <= lo <= hi")
    if bool((block_table >= k_cache.shape[0]).any()):
        raise ValueError(f"paged_attention: block_table names a block the cache does not have (it has "
                         f"{k_cache.shape[0]})")
    # every slot an interval covers must lie in a block the table holds
    bs = k_cache.shape[1]
    held = (block_table >= 0).sum(1).to(torch.int32) * bs  # slots held per sequence (tables are dense from 0)
    nonempty = hi > lo
    if T and bool((nonempty & (hi > held[seq.long()][:, None])).any()):
        raise ValueError("paged_attention: an interval reaches past the blocks its sequence's table holds")


def paged_attention_reference(q, k_cache, v_cache, block_table, seq, lo, hi, scale: float,
                              chunk: int = REFERENCE_CHUNK):
    """Chunks of rows, each row gathering the slot span its own intervals cover (never a whole sequence's cache
    nor the pool), masked; softmax in fp32 (fp64 for fp64 inputs). One batched gather per chunk: no loop over
    sequences."""
    T, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    g = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros(T, Hq, D)
    lo64, hi64 = lo.long(), hi.long()
    ne = hi64 > lo64
    big = torch.iinfo(torch.int64).max
    s0 = torch.where(ne, lo64, big).amin(1)  # [T] first slot a row sees (big: none)
    s1 = torch.where(ne, hi64, 0).amax(1)
    for c0 in range(0, T, chunk):
        rows = torch.arange(c0, min(c0 + chunk, T), device=q.device)
        live = s1[rows] > 0
        rows = rows[live]
        if rows.numel() == 0:
            continue
        a, e = s0[rows], s1[rows]
        S = int((e - a).max())
        slots = a[:, None] + torch.arange(S, device=q.device)  # [r, S]
        mask = ((slots[:, None, :] >= lo64[rows][:, :, None]) & (slots[:, None, :] < hi64[rows][:, :, None])).any(1)
        slots = torch.where(mask, slots, 0)  # unseen positions read slot 0 (any valid slot), then are masked out
        blocks = block_table[seq[rows].long()[:, None], slots // bs].long()
        ks = k_cache[blocks, slots % bs].to(acc)  # [r, S, Hkv, D]
        vs = v_cache[blocks, slots % bs].to(acc)
        # slots no row sees may hold anything (never-written memory): 0 * NaN would spread it
        ks = torch.where(mask[:, :, None, None], ks, 0.0)
        vs = torch.where(mask[:, :, None, None], vs, 0.0)
        qr = q[rows].to(acc).view(-1, Hkv, g, D)  # GQA: query head h reads key/value head h // g
        scores = torch.einsum("rkgd,rskd->rkgs", qr, ks) * scale
        scores = scores.masked_fill(~mask[:, None, None, :], -math.inf)
        p = torch.softmax(scores, -1)  # every row here sees at least one slot
        out[rows] = torch.einsum("rkgs,rskd->rkgd", p, vs).reshape(-1, Hq, D).to(q.dtype)
    return out


@runtime_checkable
class Backend(Protocol):
    """A paged_attention backend module (tests/test_backends.py checks every registered one against it)."""

    def available(self, device: str) -> bool: ...
    def forward(self, q, k_cache, v_cache, block_table, seq, lo, hi, scale) -> torch.Tensor: ...


class _Reference:
    available = staticmethod(lambda device: True)

    @staticmethod
    def forward(q, k_cache, v_cache, block_table, seq, lo, hi, scale):
        _check_indices(q, k_cache, block_table, seq, lo, hi)  # the kernels check the indices they read
        return paged_attention_reference(q, k_cache, v_cache, block_table, seq, lo, hi, scale)


_backends = Backends("paged_attention", {"cpp": "._cpp_paged_attention",
                                         "triton": "mem1_fast.triton_kernels.paged_attention", "reference": _Reference},
                     env="MEM1_FAST_PAGED_BACKEND", prefer={"cpu": ("cpp",), "cuda": ("triton",)})
BACKENDS = _backends.names
available_backends = _backends.available
backend_module = _backends.module
