"""paged_attention: attention of new tokens over a paged KV cache (the paged engine's decode and observation prefill).

    out = paged_attention(q, k_cache, v_cache, block_table, seq, lo, hi, scale=None)   # [T, Hq, D]

q: [T, Hq, D], the query rows of any number of sequences (one decode token each, or an observation's tokens), with
their keys already written to the cache. k_cache, v_cache: [num_blocks, block_size, Hkv, D], one layer's storage
of a `rollout.kv_pool.BlockPool`, RoPE already applied to K. block_table: int32 [B, max_blocks], row b the blocks of
sequence b in slot order (-1 past its end). seq: int32 [T], the sequence of each row. lo, hi: int32 [T, K], the
intervals of slots row t sees, in Visibility's form (slot s of a sequence is offset s % block_size of block
block_table[b, s // block_size]); evicted slots that still sit in a live block are simply left out of the
intervals. A row that sees no slot outputs 0.

Backends: "reference" (plain PyTorch below: per sequence it gathers only the slot span its rows' intervals cover).
The kernel backends (a C++ one for CPUs, a Triton one for GPUs) read K/V through the table in place.
"""
from __future__ import annotations

import math

import torch

from ._dispatch import Backends


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    seq: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: float | None = None,
                    backend: str | None = None) -> torch.Tensor:
    _check_inputs(q, k_cache, v_cache, block_table, seq, lo, hi)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    name = _backends.pick(backend, q)
    if name == "reference":
        return paged_attention_reference(q, k_cache, v_cache, block_table, seq, lo, hi, scale)
    return _backends.module(name).forward(q, k_cache, v_cache, block_table, seq, lo, hi, scale)


def _check_inputs(q, k_cache, v_cache, block_table, seq, lo, hi):
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
    if T and (int(seq.min()) < 0 or int(seq.max()) >= block_table.shape[0]):
        raise ValueError(f"paged_attention: seq must index the {block_table.shape[0]} rows of block_table")
    if T and bool((lo > hi).any() | (lo < 0).any()):
        raise ValueError("paged_attention: every interval needs 0 <= lo <= hi")
    # every slot an interval covers must lie in a block the table holds
    bs = k_cache.shape[1]
    held = (block_table >= 0).sum(1).to(torch.int32) * bs  # slots held per sequence (tables are dense from 0)
    nonempty = hi > lo
    if T and bool((nonempty & (hi > held[seq.long()][:, None])).any()):
        raise ValueError("paged_attention: an interval reaches past the blocks its sequence's table holds")


def paged_attention_reference(q, k_cache, v_cache, block_table, seq, lo, hi, scale: float):
    """Per sequence: gather the slot span its rows' intervals cover (never the whole cache), mask, softmax in fp32
    (fp64 for fp64 inputs)."""
    T, Hq, D = q.shape
    bs, g = k_cache.shape[1], Hq // k_cache.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros(T, Hq, D)
    lo64, hi64, seq64 = lo.long(), hi.long(), seq.long()
    for b in torch.unique(seq64).tolist():
        rows = (seq64 == b).nonzero().squeeze(1)
        l, h = lo64[rows], hi64[rows]
        ne = h > l
        if not bool(ne.any()):
            continue
        s0, s1 = int(l[ne].min()), int(h[ne].max())
        slots = torch.arange(s0, s1, device=q.device)
        blocks = block_table[b].long()[slots // bs]
        ks = k_cache[blocks, slots % bs].to(acc).repeat_interleave(g, dim=1)  # [n, Hq, D]
        vs = v_cache[blocks, slots % bs].to(acc).repeat_interleave(g, dim=1)
        mask = ((slots >= l[:, :, None]) & (slots < h[:, :, None])).any(1)  # [rows, n]
        # slots in the span that no row sees may hold anything (never-written memory): 0 * NaN would spread it
        seen = mask.any(0)[:, None, None]
        ks, vs = torch.where(seen, ks, 0.0), torch.where(seen, vs, 0.0)
        scores = torch.einsum("rhd,nhd->hrn", q[rows].to(acc), ks) * scale
        scores = scores.masked_fill(~mask, -math.inf)
        m = scores.amax(-1, keepdim=True)
        p = torch.exp(scores - torch.where(torch.isfinite(m), m, 0.0)).masked_fill(~mask, 0.0)
        denom = p.sum(-1, keepdim=True)
        p = p / torch.where(denom > 0, denom, 1.0)  # a row that sees nothing outputs 0
        out[rows] = torch.einsum("hrn,nhd->rhd", p, vs).to(q.dtype)
    return out


class _Reference:
    available = staticmethod(lambda device: True)


_backends = Backends("paged_attention", {"reference": _Reference}, env="MEM1_FAST_PAGED_BACKEND",
                     prefer={"cpu": (), "cuda": ()})
BACKENDS = _backends.names
available_backends = _backends.available
