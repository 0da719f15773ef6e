// mem1_fast/visibility.h -- index logic of interval visibility specs, shared by the CPU (C++) and CUDA code.
//
// A visibility spec (docs/design.md §4) gives, for every query row p of a packed batch of T tokens, K half-open key
// intervals [lo[p,k], hi[p,k]) in packed coordinates (row-major int32 arrays [T, K]). Row p may read column c iff
// c lies in one of its intervals. Contract: 0 <= lo <= hi <= p + 1; an empty interval has lo == hi (its value is
// otherwise irrelevant); the non-empty intervals of a row are sorted and disjoint.
//
// Tiles: query block qb covers rows [qb*BM, min((qb+1)*BM, T)), key block kb covers columns
// [kb*BN, min((kb+1)*BN, T)). A tile is FULL when every (row, col) of the clipped tile is visible, PARTIAL when
// some but not all are, EMPTY when none is.
//
// Plain C++ (no torch, no CUDA headers): every function is `MEM1_HD`, i.e. __host__ __device__ under nvcc.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define MEM1_HD __host__ __device__ __forceinline__
#else
#define MEM1_HD inline
#endif

namespace mem1_fast {
namespace vis {

// Tile classification codes (also the values stored by the CUDA classify kernel).
enum TileKind : int32_t { kTileEmpty = 0, kTilePartial = 1, kTileFull = 2 };

MEM1_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
MEM1_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ceil(a / b) for a >= 0, b > 0.
MEM1_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of blocks of size B covering T tokens (nQ = num_blocks(T, BM), nK = num_blocks(T, BN)).
MEM1_HD int64_t num_blocks(int64_t T, int64_t B) { return ceil_div(T, B); }

// First token of block b, and one past its last token, clipped to T.
MEM1_HD int64_t block_begin(int64_t b, int64_t B) { return b * B; }
MEM1_HD int64_t block_end(int64_t b, int64_t B, int64_t T) { return min64((b + 1) * B, T); }

// Number of tokens of block b once clipped to T (B for every block but possibly the last one).
MEM1_HD int64_t block_len(int64_t b, int64_t B, int64_t T) { return block_end(b, B, T) - block_begin(b, B); }

// rows x cols of tile (qb, kb), clipped to T.
MEM1_HD int64_t tile_area(int64_t qb, int64_t kb, int64_t BM, int64_t BN, int64_t T) {
  return block_len(qb, BM, T) * block_len(kb, BN, T);
}

// Block index of a token, x / B for x >= 0, as a shift when B is a power of two (64-bit division costs tens of
// cycles on CPUs and is a software routine on GPUs). Build once, use per interval.
struct BlockDiv {
  int64_t B;
  int shift;  // log2(B) when B is a power of two, else -1
  MEM1_HD explicit BlockDiv(int64_t b) : B(b), shift(-1) {
    if (b > 0 && (b & (b - 1)) == 0) {
      shift = 0;
      while ((int64_t(1) << shift) < b) ++shift;
    }
  }
  MEM1_HD int64_t operator()(int64_t x) const { return shift >= 0 ? (x >> shift) : x / B; }
};

// Key blocks touched by the non-empty interval [lo, hi): first = lo / BN, last = (hi - 1) / BN (inclusive).
// Returns false (and leaves first/last untouched) when the interval is empty.
MEM1_HD bool interval_block_range(int64_t lo, int64_t hi, const BlockDiv& bn, int64_t* first, int64_t* last) {
  if (hi <= lo) return false;
  *first = bn(lo);
  *last = bn(hi - 1);
  return true;
}
MEM1_HD bool interval_block_range(int64_t lo, int64_t hi, int64_t BN, int64_t* first, int64_t* last) {
  return interval_block_range(lo, hi, BlockDiv(BN), first, last);
}

// Number of columns of key block kb (clipped to T) inside [lo, hi); 0 when they do not meet.
MEM1_HD int64_t interval_block_overlap(int64_t lo, int64_t hi, int64_t kb, int64_t BN, int64_t T) {
  const int64_t a = max64(lo, block_begin(kb, BN));
  const int64_t b = min64(min64(hi, T), block_end(kb, BN, T));
  return b > a ? b - a : 0;
}

// Classify a tile from its number of visible (row, col) pairs and its (clipped) area.
MEM1_HD int32_t classify_tile(int64_t count, int64_t area) {
  return count <= 0 ? kTileEmpty : (count >= area ? kTileFull : kTilePartial);
}

// Is column `col` visible from the row whose K intervals start at lo_row / hi_row?
MEM1_HD bool visible_row(const int32_t* lo_row, const int32_t* hi_row, int64_t K, int64_t col) {
  for (int64_t k = 0; k < K; ++k) {
    if (lo_row[k] <= col && col < hi_row[k]) return true;
  }
  return false;
}

// Is (row, col) visible under the spec lo / hi (row-major [T, K])? For in-register masking of PARTIAL tiles.
MEM1_HD bool visible(const int32_t* lo, const int32_t* hi, int64_t K, int64_t row, int64_t col) {
  return visible_row(lo + row * K, hi + row * K, K, col);
}

// Validation of one row (used by both backends). Returns 0 when row p's intervals follow the contract, else the
// violated rule (and the offending k in *bad_k): 1 lo < 0, 2 lo > hi, 3 hi > p + 1, 4 non-empty intervals not
// sorted/disjoint (interval k starts before the end of the previous non-empty one).
enum RowError : int32_t {
  kRowOk = 0,
  kRowNegativeLo = 1,
  kRowLoAboveHi = 2,
  kRowHiAboveRow = 3,
  kRowUnsorted = 4,
};

MEM1_HD int32_t check_row(const int32_t* lo_row, const int32_t* hi_row, int64_t K, int64_t p, int64_t* bad_k) {
  int64_t prev_hi = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t l = lo_row[k], h = hi_row[k];
    int32_t err = kRowOk;
    if (l < 0) {
      err = kRowNegativeLo;
    } else if (l > h) {
      err = kRowLoAboveHi;
    } else if (h > p + 1) {
      err = kRowHiAboveRow;
    } else if (h > l) {
      if (l < prev_hi) err = kRowUnsorted;
      prev_hi = h;
    }
    if (err != kRowOk) {
      *bad_k = k;
      return err;
    }
  }
  return kRowOk;
}

}  // namespace vis
}  // namespace mem1_fast
