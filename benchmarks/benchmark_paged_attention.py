"""paged_attention, one decode step of a batch: the kernel reading K/V through block tables in place, against what a
user of a contiguous-KV attention has: K/V already contiguous per sequence ([B, Hkv, S, D], padded: no paging at
all) with batched matmuls (einsum, GQA without copies: the strongest baseline) or SDPA (`enable_gqa`), and the
matmuls after gathering each sequence's live K/V out of the pool.

64 sequences, 8 query / 4 key-value heads, D = 64, fp32, 2 threads; each sequence's live slots are a question of
512 tokens plus the last turn of 512-1024 (MEM1's retained state, action and observation), with a dead partial block
between them (eviction leaves them). The CUDA rows (Triton kernel against the same gather + SDPA) run where a GPU is.
"""
import math
import random

import pytest
import torch

from conftest import best_of, record
from mem1_fast.ops.paged_attention import available_backends, paged_attention

B, HQ, HKV, D, BS = 64, 8, 4, 64, 16


def decode_batch(device: str, seed: int = 0):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    runs, tables, nblocks = [], [], 0
    for _ in range(B):
        q_len, turn = 512, rng.randint(512, 1024)
        gap = rng.randint(1, BS - 1)  # dead slots of a block that still holds live ones
        live = [(0, q_len), (q_len + gap, q_len + gap + turn)]
        n = -(-(q_len + gap + turn) // BS)
        tables.append(list(range(nblocks, nblocks + n)))
        nblocks += n
        runs.append(live)
    random.Random(seed + 1).shuffle(order := list(range(nblocks)))  # blocks scattered over the pool
    width = max(len(t) for t in tables)
    table = torch.full((B, width), -1, dtype=torch.int32)
    for b, t in enumerate(tables):
        table[b, :len(t)] = torch.tensor([order[x] for x in t], dtype=torch.int32)
    k_cache = torch.randn(nblocks, BS, HKV, D, generator=gen)
    v_cache = torch.randn(nblocks, BS, HKV, D, generator=gen)
    lo = torch.tensor([[a for a, _ in r] for r in runs], dtype=torch.int32)
    hi = torch.tensor([[e for _, e in r] for r in runs], dtype=torch.int32)
    q = torch.randn(B, HQ, D, generator=gen)
    seq = torch.arange(B, dtype=torch.int32)
    return [x.to(device) for x in (q, k_cache, v_cache, table, seq, lo, hi)]


def live_slots(lo, hi):
    """Each sequence's live slot indices, padded to the longest ([B, S]), and the key-padding mask."""
    counts = (hi - lo).sum(1)
    S = int(counts.max())
    slots = torch.zeros(B, S, dtype=torch.long, device=lo.device)
    for b in range(B):
        s = torch.cat([torch.arange(int(a), int(e), device=lo.device) for a, e in zip(lo[b], hi[b]) if e > a])
        slots[b, :len(s)] = s
    return slots, torch.arange(S, device=lo.device)[None] < counts[:, None]


def gather(k_cache, v_cache, table, slots):
    """The live K/V of each sequence out of the pool, contiguous: [B, Hkv, S, D]."""
    blocks = table.long().gather(1, slots // BS)
    k, v = k_cache[blocks, slots % BS], v_cache[blocks, slots % BS]  # [B, S, Hkv, D]
    return k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()


def sdpa(q, k, v, mask):
    """SDPA over contiguous K/V [B, Hkv, S, D] with a key-padding mask and `enable_gqa` (no K/V copies)."""
    return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None],
                                                            enable_gqa=True)[:, :, 0]


def einsum_gqa(q, k, v, mask):
    """Batched matmuls over contiguous K/V [B, Hkv, S, D], GQA without repeating K/V (the fastest plain-PyTorch
    decode measured here)."""
    g, scale = HQ // HKV, 1 / math.sqrt(D)
    s = torch.einsum("bkgd,bksd->bkgs", q.view(B, HKV, g, D), k) * scale
    p = s.masked_fill(~mask[:, None, None], -math.inf).softmax(-1)
    return torch.einsum("bkgs,bksd->bkgd", p, v).reshape(B, HQ, D)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_paged_decode(benchmark, device):
    args = decode_batch(device)
    q, k_cache, v_cache, table, seq, lo, hi = args
    scale = 1 / math.sqrt(D)
    slots, mask = live_slots(lo, hi)  # the bookkeeping, untimed
    k, v = gather(k_cache, v_cache, table, slots)
    want = einsum_gqa(q, k, v, mask)
    group = f"paged_attention decode {device}: {B} sequences x ~1,300 live slots, {HQ}/{HKV} heads, D {D}, fp32"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn):
        def run():
            fn()
            sync()
        return best_of(run, n=5, warmup=1)

    # the strongest baseline: K/V already contiguous per sequence (no paging at all), batched matmuls
    record(group, "contiguous K/V, einsum GQA (baseline)", timed(lambda: einsum_gqa(q, k, v, mask)), baseline=True)
    record(group, "contiguous K/V, SDPA", timed(lambda: sdpa(q, k, v, mask)))
    record(group, "gather from the pool + einsum GQA",
           timed(lambda: einsum_gqa(q, *gather(k_cache, v_cache, table, slots), mask)))
    # (on CPU the Triton kernel would run interpreted: a correctness tool, not a contender)
    kernels = [b for b in available_backends(device) if b != "reference" and not (b == "triton" and device == "cpu")]
    for name in kernels + ["reference"]:
        out = paged_attention(*args, scale=scale, backend=name)
        err = float((out - want).abs().max())
        assert err < 1e-4, (name, err)
        record(group, name, timed(lambda: paged_attention(*args, scale=scale, backend=name)), max_err=f"{err:.1e}")
    best = kernels[0] if kernels else "reference"
    benchmark.pedantic(lambda: (paged_attention(*args, scale=scale, backend=best), sync()), rounds=3, iterations=1)
