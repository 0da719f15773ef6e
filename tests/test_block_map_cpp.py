"""torch.ops.mem1_fast.block_map (C++ CPU op) against a dense oracle written here.

The oracle builds the T x T boolean mask of an interval spec in numpy (small T only), counts the visible pairs of
every (BM, BN) tile and classifies them; the op must return exactly the same CSR lists.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from mem1_fast import _ext

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

try:
    _ext.load()
    _SKIP = None
except RuntimeError as e:  # no C++ toolchain
    _SKIP = str(e).splitlines()[0]

pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"C++ extension unavailable: {_SKIP}")

TILES = [16, 32, 64, 128]


def block_map(lo, hi, BM, BN):
    return torch.ops.mem1_fast.block_map(lo, hi, BM, BN)


# ----------------------------------------------------------------------------------------------------------------
# oracle


def dense_mask(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    T, K = lo.shape
    m = np.zeros((T, T), dtype=bool)
    for p in range(T):
        for k in range(K):
            m[p, lo[p, k] : hi[p, k]] = True
    return m


def oracle_rows(mask_rows: np.ndarray, r0: int, BM: int, BN: int, T: int):
    """Partial / full key blocks of the query blocks whose rows are mask_rows (rows r0.., a multiple of BM)."""
    nrows = mask_rows.shape[0]
    nQ, nK = -(-nrows // BM), -(-T // BN)
    padded = np.zeros((nQ * BM, nK * BN), dtype=np.int32)
    padded[:nrows, :T] = mask_rows
    counts = padded.reshape(nQ, BM, nK, BN).sum(axis=(1, 3))
    rows = np.minimum((np.arange(nQ) + 1) * BM, nrows) - np.arange(nQ) * BM
    cols = np.minimum((np.arange(nK) + 1) * BN, T) - np.arange(nK) * BN
    area = rows[:, None] * cols[None, :]
    partial = [np.nonzero((counts[q] > 0) & (counts[q] < area[q]))[0].tolist() for q in range(nQ)]
    full = [np.nonzero(counts[q] == area[q])[0].tolist() for q in range(nQ)]
    assert (counts <= area).all()
    return partial, full


def oracle(lo: np.ndarray, hi: np.ndarray, BM: int, BN: int):
    T = lo.shape[0]
    return oracle_rows(dense_mask(lo, hi), 0, BM, BN, T)


def csr_lists(ptr: torch.Tensor, idx: torch.Tensor) -> list[list[int]]:
    ptr, idx = ptr.tolist(), idx.tolist()
    return [idx[ptr[q] : ptr[q + 1]] for q in range(len(ptr) - 1)]


def check(lo: np.ndarray, hi: np.ndarray, BM: int, BN: int):
    T = lo.shape[0]
    out = block_map(torch.from_numpy(lo), torch.from_numpy(hi), BM, BN)
    pptr, pidx, fptr, fidx = out
    nQ = -(-T // BM)
    for t in out:
        assert t.dtype == torch.int32 and t.dim() == 1
    assert pptr.shape == (nQ + 1,) and fptr.shape == (nQ + 1,)
    assert pptr[0] == 0 and fptr[0] == 0
    assert pptr[-1] == pidx.numel() and fptr[-1] == fidx.numel()
    want_p, want_f = oracle(lo, hi, BM, BN)
    assert csr_lists(pptr, pidx) == want_p
    assert csr_lists(fptr, fidx) == want_f
    return out


# ----------------------------------------------------------------------------------------------------------------
# spec generators (all produce valid specs: 0 <= lo <= hi <= p+1, non-empty intervals sorted and disjoint)


def _place_empty(rng, lo, hi, p, k):
    v = int(rng.integers(0, p + 2))
    lo[p, k] = hi[p, k] = v


def random_spec(rng, T: int, K: int, p_empty_row: float = 0.1, p_empty_iv: float = 0.2):
    """Per row, 2K sorted cut points in [0, p+1] -> K sorted disjoint (possibly touching or empty) intervals."""
    lo = np.zeros((T, K), np.int32)
    hi = np.zeros((T, K), np.int32)
    for p in range(T):
        if rng.random() < p_empty_row:
            for k in range(K):
                _place_empty(rng, lo, hi, p, k)
            continue
        cuts = np.sort(rng.integers(0, p + 2, size=2 * K))
        for k in range(K):
            lo[p, k], hi[p, k] = cuts[2 * k], cuts[2 * k + 1]
            if rng.random() < p_empty_iv:
                _place_empty(rng, lo, hi, p, k)
    return lo, hi


def structured_spec(rng, T: int, K: int):
    """Packed trajectories: prefix q (causal), then segments that see [ts, ts+|q|) + an optional earlier segment
    (K=3) + [seg_start, p+1). Gives FULL tiles as well as PARTIAL ones."""
    lo = np.zeros((T, K), np.int32)
    hi = np.zeros((T, K), np.int32)
    ts = 0
    while ts < T:
        L = int(rng.integers(1, max(2, T // 2) + 1))
        te = min(T, ts + L)
        q = int(rng.integers(0, te - ts + 1))
        bounds = [ts + q]
        while bounds[-1] < te:
            bounds.append(min(te, bounds[-1] + int(rng.integers(1, 80))))
        for p in range(ts, te):
            ivs = []
            if p < ts + q:
                ivs = [(ts, p + 1)]
            else:
                j = max(i for i in range(len(bounds) - 1) if bounds[i] <= p)
                seg = bounds[j]
                if q > 0:
                    ivs.append((ts, ts + q))
                if K >= 3 and j > 0:
                    ivs.append((bounds[j - 1], seg))  # previous segment (touches the current one)
                ivs.append((seg, p + 1))
            ivs = ivs[-K:]  # K=1: only the current segment
            for k in range(K):
                if k < len(ivs):
                    lo[p, k], hi[p, k] = ivs[k]
                else:
                    _place_empty(rng, lo, hi, p, k)
            if rng.random() < 0.02:  # a row with no visible key at all
                for k in range(K):
                    _place_empty(rng, lo, hi, p, k)
        ts = te
    return lo, hi


def window_spec(T: int, W: int):
    lo = np.maximum(np.arange(T) - W + 1, 0).astype(np.int32)[:, None]
    hi = (np.arange(T) + 1).astype(np.int32)[:, None]
    return lo, hi


# ----------------------------------------------------------------------------------------------------------------
# property-based


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 200),
    K=st.integers(1, 3),
    BM=st.sampled_from(TILES),
    BN=st.sampled_from(TILES),
    kind=st.sampled_from(["random", "structured"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_block_map_matches_dense_oracle(T, K, BM, BN, kind, seed):
    rng = np.random.default_rng(seed)
    lo, hi = random_spec(rng, T, K) if kind == "random" else structured_spec(rng, T, K)
    check(lo, hi, BM, BN)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 200), W=st.integers(1, 200), BM=st.sampled_from(TILES), BN=st.sampled_from(TILES))
def test_sliding_window_matches_oracle(T, W, BM, BN):
    check(*window_spec(T, W), BM, BN)


# ----------------------------------------------------------------------------------------------------------------
# fixed cases


def test_causal_small_exact():
    T = 10
    lo = np.zeros((T, 1), np.int32)
    hi = np.arange(1, T + 1, dtype=np.int32)[:, None]
    pptr, pidx, fptr, fidx = check(lo, hi, 4, 4)
    assert csr_lists(pptr, pidx) == [[0], [1], [2]]
    assert csr_lists(fptr, fidx) == [[], [0], [0, 1]]


@pytest.mark.parametrize("BM,BN", [(16, 16), (16, 64), (128, 32), (64, 128), (32, 16)])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 100, 129, 200])
def test_causal_all_tiles(T, BM, BN):
    lo = np.zeros((T, 1), np.int32)
    hi = np.arange(1, T + 1, dtype=np.int32)[:, None]
    check(lo, hi, BM, BN)


@pytest.mark.parametrize("T", [1, 37, 200])
def test_no_visible_key_anywhere(T):
    lo = np.zeros((T, 2), np.int32)
    hi = np.zeros((T, 2), np.int32)
    pptr, pidx, fptr, fidx = check(lo, hi, 16, 32)
    assert pidx.numel() == 0 and fidx.numel() == 0
    assert pptr.tolist() == [0] * (-(-T // 16) + 1)


def test_empty_intervals_anywhere_and_touching():
    # row p sees [0, a) u [a, p+1) (touching, sorted) with empty intervals placed before, between and after
    T = 70
    lo = np.zeros((T, 3), np.int32)
    hi = np.zeros((T, 3), np.int32)
    for p in range(T):
        a = p // 2
        lo[p] = [0, p + 1, a]
        hi[p] = [a, p + 1, p + 1]  # middle one empty at p+1; non-empty [0,a) then [a,p+1)
    check(lo, hi, 16, 16)
    # equivalent to plain causal
    c = block_map(torch.from_numpy(lo), torch.from_numpy(hi), 16, 16)
    d = block_map(torch.zeros(T, 1, dtype=torch.int32), torch.arange(1, T + 1, dtype=torch.int32)[:, None], 16, 16)
    for x, y in zip(c, d):
        assert torch.equal(x, y)


def test_full_tile_from_several_intervals():
    # rows 16..31 see [0, 8) u [8, 16) u [16, p+1): tile (1, 0) is FULL although no single interval covers it
    T = 32
    lo = np.zeros((T, 3), np.int32)
    hi = np.zeros((T, 3), np.int32)
    for p in range(T):
        if p < 16:
            lo[p], hi[p] = [0, p + 1, p + 1], [p + 1, p + 1, p + 1]
        else:
            lo[p], hi[p] = [0, 8, 16], [8, 16, p + 1]
    pptr, pidx, fptr, fidx = check(lo, hi, 16, 16)
    assert csr_lists(fptr, fidx) == [[], [0]]
    assert csr_lists(pptr, pidx) == [[0], [1]]


def test_non_contiguous_inputs():
    rng = np.random.default_rng(0)
    lo, hi = structured_spec(rng, 150, 2)
    both = torch.from_numpy(np.stack([lo, hi], axis=2).reshape(150, 4).copy())
    lo_t, hi_t = both[:, 0::2], both[:, 1::2]
    assert not lo_t.is_contiguous()
    got = block_map(lo_t, hi_t, 32, 16)
    want = block_map(torch.from_numpy(lo), torch.from_numpy(hi), 32, 16)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


def test_zero_length_and_zero_K():
    out = block_map(torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, 2, dtype=torch.int32), 16, 16)
    assert [t.tolist() for t in out] == [[0], [], [0], []]
    out = block_map(torch.zeros(5, 0, dtype=torch.int32), torch.zeros(5, 0, dtype=torch.int32), 16, 16)
    assert [t.tolist() for t in out] == [[0, 0], [], [0, 0], []]


# ----------------------------------------------------------------------------------------------------------------
# invalid inputs


def _causal(T=8):
    return torch.zeros(T, 1, dtype=torch.int32), torch.arange(1, T + 1, dtype=torch.int32)[:, None]


def test_rejects_lo_above_hi():
    lo, hi = _causal()
    lo[3, 0] = 3
    hi[3, 0] = 2
    with pytest.raises(RuntimeError, match=r"p=3.*lo > hi"):
        block_map(lo, hi, 16, 16)


def test_rejects_hi_above_row():
    lo, hi = _causal()
    hi[5, 0] = 7
    with pytest.raises(RuntimeError, match=r"p=5.*hi > p \+ 1"):
        block_map(lo, hi, 16, 16)


def test_rejects_negative_lo():
    lo, hi = _causal()
    lo[2, 0] = -1
    with pytest.raises(RuntimeError, match=r"p=2.*lo < 0"):
        block_map(lo, hi, 16, 16)


def test_rejects_overlapping_or_unsorted_intervals():
    lo = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 4]], dtype=torch.int32)  # [0, p+1) + an empty interval
    hi = torch.tensor([[1, 1], [2, 2], [3, 3], [4, 4]], dtype=torch.int32)
    block_map(lo, hi, 16, 16)
    lo[3] = torch.tensor([0, 1])  # [0,4) and [1,4) overlap
    with pytest.raises(RuntimeError, match=r"p=3.*sorted and disjoint"):
        block_map(lo, hi, 16, 16)
    lo[3], hi[3] = torch.tensor([2, 0]), torch.tensor([4, 1])  # disjoint but unsorted
    with pytest.raises(RuntimeError, match=r"sorted and disjoint"):
        block_map(lo, hi, 16, 16)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.float32])
def test_rejects_wrong_dtype(dtype):
    lo, hi = _causal()
    with pytest.raises(RuntimeError, match=r"lo must be int32"):
        block_map(lo.to(dtype), hi, 16, 16)
    with pytest.raises(RuntimeError, match=r"hi must be int32"):
        block_map(lo, hi.to(dtype), 16, 16)


def test_rejects_wrong_shape():
    lo, hi = _causal()
    with pytest.raises(RuntimeError, match=r"lo must be 2-D"):
        block_map(lo[:, 0], hi, 16, 16)
    with pytest.raises(RuntimeError, match=r"hi must be 2-D"):
        block_map(lo, hi[None], 16, 16)
    with pytest.raises(RuntimeError, match=r"same shape"):
        block_map(lo[:7], hi, 16, 16)
    with pytest.raises(RuntimeError, match=r"same shape"):
        block_map(torch.cat([lo, lo], 1), hi, 16, 16)


@pytest.mark.parametrize("BM,BN", [(0, 16), (16, 0), (-16, 16)])
def test_rejects_bad_tile_sizes(BM, BN):
    lo, hi = _causal()
    with pytest.raises(RuntimeError, match=r"BM and BN must be > 0"):
        block_map(lo, hi, BM, BN)


# ----------------------------------------------------------------------------------------------------------------
# large T: memory O(T*K + output), time well under a second


def trajectory_spec(T: int, traj: int = 4096, prompt: int = 512, seg: int = 1024):
    """Each row sees [traj_start, traj_start+512) u [window_start, p+1) (prompt rows: causal in the prompt)."""
    p = np.arange(T, dtype=np.int64)
    ts = (p // traj) * traj
    off = p - ts
    in_prompt = off < prompt
    ws = ts + prompt + ((off - prompt) // seg) * seg
    lo = np.zeros((T, 2), np.int32)
    hi = np.zeros((T, 2), np.int32)
    lo[:, 0] = ts
    hi[:, 0] = np.where(in_prompt, p + 1, np.minimum(ts + prompt, T))
    lo[:, 1] = np.where(in_prompt, p + 1, ws)
    hi[:, 1] = p + 1
    return lo, hi


@pytest.mark.parametrize("BM,BN", [(64, 64), (128, 64)])
def test_large_T_small_output_and_fast(BM, BN):
    T = 200_000
    lo, hi = trajectory_spec(T)
    lo_t, hi_t = torch.from_numpy(lo), torch.from_numpy(hi)
    block_map(lo_t, hi_t, BM, BN)  # warm-up
    t0 = time.perf_counter()
    pptr, pidx, fptr, fidx = block_map(lo_t, hi_t, BM, BN)
    dt = time.perf_counter() - t0
    nQ, nK = -(-T // BM), -(-T // BN)
    nnz = pidx.numel() + fidx.numel()
    print(f"\nblock_map T={T} BM={BM} BN={BN}: {dt * 1e3:.2f} ms, partial={pidx.numel()} full={fidx.numel()} "
          f"(nQ*nK={nQ * nK})")
    assert dt < 2.0
    # Each query block sees at most (512 + 1024 + BM) / BN + 3 key blocks of its trajectory (x2 if it straddles two).
    assert nnz <= nQ * 2 * ((512 + 1024 + BM) // BN + 3)
    assert nnz < nQ * nK / 50
    # CSR sanity
    for ptr, idx in ((pptr, pidx), (fptr, fidx)):
        assert (ptr[1:] >= ptr[:-1]).all() and ptr[-1] == idx.numel()
        assert ((idx >= 0) & (idx < nK)).all()
    # exact check of a sample of query blocks against the oracle on those rows only ([BM*n, T] masks, not T x T)
    P, F = csr_lists(pptr, pidx), csr_lists(fptr, fidx)
    rng = np.random.default_rng(1)
    for qb in [0, 1, 7, 8, nQ - 1, *rng.integers(0, nQ, size=6).tolist()]:
        r0, r1 = qb * BM, min((qb + 1) * BM, T)
        rows = np.zeros((r1 - r0, T), dtype=bool)
        for i, p in enumerate(range(r0, r1)):
            for k in range(2):
                rows[i, lo[p, k] : hi[p, k]] = True
        want_p, want_f = oracle_rows(rows, r0, BM, BN, T)
        assert P[qb] == want_p[0] and F[qb] == want_f[0], qb
