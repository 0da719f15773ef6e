"""paged_attention against an fp64 oracle that never sees a block table: every sequence's tokens are kept as a
plain list (position -> k, v) beside the pool, and the oracle is a softmax over the tokens a row may see."""
import math
import random

import pytest
import torch

from mem1_fast.ops.paged_attention import BACKENDS, available_backends, paged_attention
from mem1_fast.rollout.kv_pool import BlockPool, SequenceKV


def build(seed, block_size, Hkv=2, D=16, n_seqs=3, turns=5):
    """Sequences written turn by turn through SequenceKV (a group forked after its question, retain's eviction),
    K/V random per token; returns the caches, tables, and each sequence's live tokens in slot order."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    pool = BlockPool(256, block_size)
    k_cache = torch.full((256, block_size, Hkv, D), float("nan"), dtype=torch.float64)  # unwritten memory
    v_cache = k_cache.clone()
    logical = []  # per sequence: {position: (k, v)}

    def write(table, model, n, turn, pos0):
        where, copies = table.append(list(range(pos0, pos0 + n)), turn)
        for src, dst in copies:
            k_cache[dst], v_cache[dst] = k_cache[src], v_cache[src]
        for i, (b, off) in enumerate(where):
            k, v = torch.randn(Hkv, D, generator=gen, dtype=torch.float64), torch.randn(Hkv, D, generator=gen,
                                                                                       dtype=torch.float64)
            k_cache[b, off], v_cache[b, off] = k, v
            model[pos0 + i] = (k, v)

    q_table, q_model = SequenceKV(pool), {}
    write(q_table, q_model, rng.randint(1, 11), -1, 0)
    seqs = [(q_table.fork(), dict(q_model)) for _ in range(n_seqs)]
    q_table.free()
    for t, (table, model) in enumerate(seqs):
        pos = max(model) + 1
        for turn in range(rng.randint(1, turns)):
            dropped = [p for p, tt in zip(table.position, table.turn) if p >= 0 and 0 <= tt < turn - 1]
            table.evict(lambda tt: 0 <= tt < turn - 1)
            for p in dropped:
                del model[p]
            n = rng.randint(1, 2 * block_size + 1)
            write(table, model, n, turn, pos)
            pos += n
        logical.append(model)
    width = max(len(t.blocks) for t, _ in seqs)
    table = torch.full((len(seqs), width), -1, dtype=torch.int32)
    for b, (t, _) in enumerate(seqs):
        table[b, :len(t.blocks)] = torch.tensor(t.blocks, dtype=torch.int32)
    return k_cache, v_cache, table, seqs, logical


def rows_for(seqs, rng, K=4):
    """Query rows: for each sequence, three rows each seeing the live slots up to a random cut (the first row of
    sequence 0 sees none), as intervals of live runs (evicted slots inside live blocks are left out), capped at K intervals."""
    seq, lo, hi, seen = [], [], [], []
    for b, (table, _) in enumerate(seqs):
        live = [s for s, p in enumerate(table.position) if p >= 0]
        for r in range(3):
            cut = 0 if b == r == 0 else rng.randint(1, len(live))  # one row that sees nothing
            vis = live[:cut]
            runs = []
            for s in vis:
                if runs and runs[-1][1] == s:
                    runs[-1][1] = s + 1
                else:
                    runs.append([s, s + 1])
            runs = runs[-K:]
            vis = [s for a, e in runs for s in range(a, e)]
            runs += [[0, 0]] * (K - len(runs))
            seq.append(b)
            lo.append([a for a, _ in runs])
            hi.append([e for _, e in runs])
            seen.append([table.position[s] for s in vis])
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return i32(seq), i32(lo), i32(hi), seen


def oracle(q, logical, seq, seen, scale, g):
    out = torch.zeros_like(q)
    for t in range(q.shape[0]):
        if not seen[t]:
            continue
        model = logical[int(seq[t])]
        k = torch.stack([model[p][0] for p in seen[t]]).repeat_interleave(g, 1)  # [n, Hq, D]
        v = torch.stack([model[p][1] for p in seen[t]]).repeat_interleave(g, 1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[t], k) * scale, -1)
        out[t] = torch.einsum("hn,nhd->hd", w, v)
    return out


def _need(backend):
    if backend not in available_backends("cpu"):
        pytest.skip(f"the {backend} backend does not run on this machine's CPU (triton: TRITON_INTERPRET=1; cpp: the "
                    "C++ extension)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed,block_size", [(0, 1), (1, 4), (2, 16), (3, 5)])
def test_matches_the_oracle(backend, seed, block_size):
    _need(backend)
    k_cache, v_cache, table, seqs, logical = build(seed, block_size)
    rng = random.Random(100 + seed)
    seq, lo, hi, seen = rows_for(seqs, rng)
    Hq = 4
    q = torch.randn(len(seq), Hq, k_cache.shape[3], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    scale = 1 / math.sqrt(q.shape[-1])
    want = oracle(q, logical, seq, seen, scale, Hq // k_cache.shape[2])
    got = paged_attention(q, k_cache, v_cache, table, seq, lo, hi, backend=backend)
    assert torch.isfinite(got).all()  # unwritten (NaN) slots never leak
    assert (got - want).abs().max() < 1e-12
    got32 = paged_attention(q.float(), k_cache.float(), v_cache.float(), table, seq, lo, hi, backend=backend)
    assert (got32.double() - want).abs().max() < 1e-5
    assert any(seen) and not all(seen)  # rows that see something, and rows that see nothing (output 0)
    for t, s in enumerate(seen):
        if not s:
            assert got[t].abs().max() == 0
    # negative control: the same caches read through tables whose blocks are rotated by one (slot s read from
    # the wrong block), never-written slots zeroed so the difference is a number
    bad = table.clone()
    for r in range(bad.shape[0]):
        n = int((bad[r] >= 0).sum())
        bad[r, :n] = bad[r, :n].roll(1)
    wrong = paged_attention(q, k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0), bad, seq, lo, hi, backend=backend)
    assert (wrong - want).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_the_reference(backend, dtype):
    """fp16 / bf16 caches: fp32 accumulation, so every backend is within the inputs' rounding of the fp64 oracle."""
    _need(backend)
    k_cache, v_cache, table, seqs, logical = build(7, 16)
    seq, lo, hi, seen = rows_for(seqs, random.Random(7))
    q = torch.randn(len(seq), 4, k_cache.shape[3], dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    kc, vc = k_cache.nan_to_num(0.0).to(dtype), v_cache.nan_to_num(0.0).to(dtype)
    want = paged_attention(q.to(dtype).double(), kc.double(), vc.double(), table, seq, lo, hi, backend="reference")
    got = paged_attention(q.to(dtype), kc, vc, table, seq, lo, hi, backend=backend)
    assert got.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3  # one rounding of the output
    assert (got.double() - want).abs().max() < tol


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_triton_split_k_merges_exactly(splits):
    """Split-K: every split count gives the oracle's output (splits that see nothing merge as zero weight)."""
    _need("triton")
    from mem1_fast.triton_kernels import paged_attention as tk
    k_cache, v_cache, table, seqs, logical = build(11, 4, turns=8)
    seq, lo, hi, seen = rows_for(seqs, random.Random(11))
    q = torch.randn(len(seq), 4, k_cache.shape[3], dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    scale = 1 / math.sqrt(q.shape[-1])
    want = oracle(q, logical, seq, seen, scale, 2)
    got = tk.forward(q, k_cache, v_cache, table, seq, lo, hi, scale, splits=splits)
    assert torch.isfinite(got).all() and (got - want).abs().max() < 1e-12


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_index_errors(backend):
    """The CPU kernel checks every index it reads, the reference checks them up front: bad tables raise, they
    never read out of bounds."""
    _need(backend)
    q, kc = torch.zeros(2, 4, 8), torch.zeros(4, 2, 2, 8)
    table, seq = torch.tensor([[0, 1]], dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    lo, hi = torch.zeros(2, 1, dtype=torch.int32), torch.tensor([[2], [5]], dtype=torch.int32)
    err = (ValueError, RuntimeError)
    with pytest.raises(err, match="past"):  # slot 4 lies in a third block the table does not have
        paged_attention(q, kc, kc, table, seq, lo, hi, backend=backend)
    with pytest.raises(err, match="seq"):
        paged_attention(q, kc, kc, table, seq + 1, lo, hi[:, :] * 0 + 2, backend=backend)
    with pytest.raises(err, match="block"):  # a block id the cache does not have
        paged_attention(q, kc, kc, table + 4, seq, lo, hi * 0 + 2, backend=backend)
    with pytest.raises(err, match="lo <= hi|interval"):
        paged_attention(q, kc, kc, table, seq, lo + 3, hi * 0 + 2, backend=backend)


def test_errors():
    q, kc = torch.zeros(2, 4, 8), torch.zeros(4, 2, 2, 8)
    table, seq = torch.tensor([[0, 1]], dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    lo, hi = torch.zeros(2, 1, dtype=torch.int32), torch.tensor([[2], [5]], dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        paged_attention(q, kc, kc, table.long(), seq, lo, hi)
    with pytest.raises(ValueError, match="query heads"):
        paged_attention(torch.zeros(2, 3, 8), kc, kc, table, seq, lo, hi)
    with pytest.raises(ValueError, match="contiguous"):
        paged_attention(q, kc.transpose(0, 1), kc.transpose(0, 1), table, seq, lo, hi)


def test_triton_kernels_compile_for_sm80_and_sm90a_without_spills():
    """GPU readiness without a GPU: the paged decode and combine kernels of every shipped configuration (fp16 / bf16 /
    fp32, D = 64 / 128, GQA groups 1 / 4 / 8) compile for sm_80 and sm_90a, with no register spill and within the
    shared memory of an A100 / H100 (tools/triton_report.py, un-interpreted, in subprocesses)."""
    from triton_compile import SMEM_LIMIT, compile_rows, report

    rows = compile_rows("paged_attention", [])
    print("\n" + report.format_report(rows))
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in ("paged", "combine") for a in SMEM_LIMIT}
    assert len(rows) == 2 * 3 * 2 * (3 + 1)
    for r in rows:
        assert r["stack"] == 0 and r["local"] == 0, f"spill: {r}"
        assert 0 < r["registers"] <= 255 and r["smem"] <= SMEM_LIMIT[r["arch"]], r


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_triton_on_cuda_matches_the_oracle(dtype, splits):
    """On a GPU (benchmarks/gpu_check.sh runs the cuda-marked tests with compiled Triton): the default backend of a
    CUDA tensor is the Triton kernel, and it agrees with the fp64 oracle within the dtype's rounding."""
    from mem1_fast.ops.paged_attention import _backends
    from mem1_fast.triton_kernels import paged_attention as tk
    k_cache, v_cache, table, seqs, logical = build(13, 16, turns=8)
    seq, lo, hi, seen = rows_for(seqs, random.Random(13))
    q = torch.randn(len(seq), 4, k_cache.shape[3], dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    scale = 1 / math.sqrt(q.shape[-1])
    want = oracle(q, logical, seq, seen, scale, 2)
    dev = [x.cuda() for x in (table, seq, lo, hi)]
    qc, kc, vc = (x.nan_to_num(0.0).to(dtype).cuda() for x in (q, k_cache, v_cache))
    assert _backends.default(qc) == "triton"
    if dtype != torch.float32:  # the oracle of the rounded inputs: what fp32 accumulation should give
        want = paged_attention(qc.double().cpu(), kc.double().cpu(), vc.double().cpu(), table, seq, lo, hi,
                               backend="reference")
    got = tk.forward(qc, kc, vc, *dev, scale, splits=splits)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: one rounding of the output
    assert (got.double().cpu() - want).abs().max() < tol
