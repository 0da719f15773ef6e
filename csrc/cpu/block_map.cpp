// mem1_fast::block_map -- CPU implementation.
//
// Builds the CSR block map (partial and full key blocks per query block) of an interval visibility spec without
// ever allocating anything of size T x T or nQ x nK. Per query block, the key-block range [kmin, kmax] touched by
// its rows' non-empty intervals gets two small arrays:
//   edge[kb]  visible columns contributed at the first and last key block of each interval (partial overlaps),
//   mid[kb]   a difference array: +1 at first+1 and -1 at last for every interval spanning 3+ key blocks, so that
//             its prefix sum is the number of rows covering key block kb entirely (BN columns each).
// count(qb, kb) = edge[kb] + BN * prefix(mid)[kb]: O(1) per interval + O(range) per query block.
// Two passes parallelized over query blocks (count nnz, prefix-sum, fill).
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "mem1_fast/visibility.h"

namespace mem1_fast {
namespace {

using vis::block_begin;
using vis::block_end;

// Per-thread scratch reused across query blocks.
struct Scratch {
  std::vector<int64_t> edge;
  std::vector<int64_t> mid;
};

struct Spec {
  const int32_t* lo;
  const int32_t* hi;
  int64_t T, K, BM, BN;
  vis::BlockDiv bn;  // key block of a column
};

// Visit the non-empty tiles of query block qb in ascending key-block order: fn(kb, kind).
template <typename Fn>
void for_each_tile(const Spec& s, int64_t qb, Scratch& scratch, Fn&& fn) {
  const int64_t r0 = block_begin(qb, s.BM);
  const int64_t r1 = block_end(qb, s.BM, s.T);

  // Key-block range of this query block's non-empty intervals: [min lo / BN, (max hi - 1) / BN].
  int64_t lo_min = std::numeric_limits<int64_t>::max();
  int64_t hi_max = -1;
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t* lo = s.lo + r * s.K;
    const int32_t* hi = s.hi + r * s.K;
    for (int64_t k = 0; k < s.K; ++k) {
      if (hi[k] > lo[k]) {
        lo_min = lo[k] < lo_min ? lo[k] : lo_min;
        hi_max = hi[k] > hi_max ? hi[k] : hi_max;
      }
    }
  }
  if (hi_max < 0) return;  // no visible key in the whole query block
  const int64_t kmin = s.bn(lo_min);
  const int64_t kmax = s.bn(hi_max - 1);
  const int64_t L = kmax - kmin + 1;

  scratch.edge.assign(static_cast<size_t>(L), 0);
  scratch.mid.assign(static_cast<size_t>(L) + 1, 0);
  int64_t* edge = scratch.edge.data() - kmin;  // indexed by absolute key block
  int64_t* mid = scratch.mid.data() - kmin;

  for (int64_t r = r0; r < r1; ++r) {
    const int32_t* lo = s.lo + r * s.K;
    const int32_t* hi = s.hi + r * s.K;
    for (int64_t k = 0; k < s.K; ++k) {
      int64_t first, last;
      if (!vis::interval_block_range(lo[k], hi[k], s.bn, &first, &last)) continue;
      if (first == last) {
        edge[first] += static_cast<int64_t>(hi[k]) - lo[k];
        continue;
      }
      edge[first] += vis::interval_block_overlap(lo[k], hi[k], first, s.BN, s.T);
      edge[last] += vis::interval_block_overlap(lo[k], hi[k], last, s.BN, s.T);
      if (last > first + 1) {  // blocks first+1 .. last-1 entirely covered (never the clipped last block)
        mid[first + 1] += 1;
        mid[last] -= 1;
      }
    }
  }

  int64_t run = 0;
  for (int64_t kb = kmin; kb <= kmax; ++kb) {
    run += mid[kb];
    const int64_t count = edge[kb] + run * s.BN;
    const int32_t kind = vis::classify_tile(count, vis::tile_area(qb, kb, s.BM, s.BN, s.T));
    if (kind != vis::kTileEmpty) fn(kb, kind);
  }
}

const char* row_error_text(int32_t err) {
  switch (err) {
    case vis::kRowNegativeLo:
      return "lo < 0";
    case vis::kRowLoAboveHi:
      return "lo > hi";
    case vis::kRowHiAboveRow:
      return "hi > p + 1 (a row may only see keys <= p)";
    case vis::kRowUnsorted:
      return "non-empty intervals of a row must be sorted and disjoint (lo[p,k] < hi of an earlier interval)";
    default:
      return "invalid interval";
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_map_cpu(
    const at::Tensor& lo_in, const at::Tensor& hi_in, int64_t BM, int64_t BN) {
  TORCH_CHECK(lo_in.scalar_type() == at::kInt, "mem1_fast::block_map: lo must be int32, got ", lo_in.scalar_type());
  TORCH_CHECK(hi_in.scalar_type() == at::kInt, "mem1_fast::block_map: hi must be int32, got ", hi_in.scalar_type());
  TORCH_CHECK(lo_in.dim() == 2, "mem1_fast::block_map: lo must be 2-D [T, K], got shape ", lo_in.sizes());
  TORCH_CHECK(hi_in.dim() == 2, "mem1_fast::block_map: hi must be 2-D [T, K], got shape ", hi_in.sizes());
  TORCH_CHECK(lo_in.sizes() == hi_in.sizes(), "mem1_fast::block_map: lo and hi must have the same shape, got ",
              lo_in.sizes(), " and ", hi_in.sizes());
  TORCH_CHECK(lo_in.device().is_cpu() && hi_in.device().is_cpu(),
              "mem1_fast::block_map: the CPU implementation needs CPU tensors, got ", lo_in.device(), " and ",
              hi_in.device());
  TORCH_CHECK(BM > 0 && BN > 0, "mem1_fast::block_map: BM and BN must be > 0, got BM=", BM, ", BN=", BN);

  const at::Tensor lo_t = lo_in.contiguous();
  const at::Tensor hi_t = hi_in.contiguous();
  const int64_t T = lo_t.size(0);
  const int64_t K = lo_t.size(1);
  TORCH_CHECK(T < std::numeric_limits<int32_t>::max(), "mem1_fast::block_map: T=", T, " does not fit int32 indices");
  const Spec s{lo_t.data_ptr<int32_t>(), hi_t.data_ptr<int32_t>(), T, K, BM, BN, vis::BlockDiv(BN)};

  // Validation (serial, O(T*K); reports the first offending row).
  for (int64_t p = 0; p < T; ++p) {
    int64_t k = 0;
    const int32_t err = vis::check_row(s.lo + p * K, s.hi + p * K, K, p, &k);
    TORCH_CHECK(err == vis::kRowOk, "mem1_fast::block_map: invalid interval at row p=", p, ", k=", k, ": [lo=",
                s.lo[p * K + k], ", hi=", s.hi[p * K + k], "): ", row_error_text(err));
  }

  const int64_t nQ = vis::num_blocks(T, BM);
  const auto opts = at::TensorOptions().dtype(at::kInt).device(at::kCPU);
  std::vector<int64_t> nP(static_cast<size_t>(nQ), 0), nF(static_cast<size_t>(nQ), 0);

  // Pass 1: nnz per query block.
  at::parallel_for(0, nQ, 1, [&](int64_t b, int64_t e) {
    Scratch scratch;
    for (int64_t qb = b; qb < e; ++qb) {
      int64_t p = 0, f = 0;
      for_each_tile(s, qb, scratch, [&](int64_t, int32_t kind) { (kind == vis::kTileFull ? f : p) += 1; });
      nP[qb] = p;
      nF[qb] = f;
    }
  });

  // Prefix sums -> CSR pointers.
  at::Tensor partial_ptr = at::empty({nQ + 1}, opts);
  at::Tensor full_ptr = at::empty({nQ + 1}, opts);
  int32_t* pp = partial_ptr.data_ptr<int32_t>();
  int32_t* fp = full_ptr.data_ptr<int32_t>();
  int64_t accP = 0, accF = 0;
  pp[0] = 0;
  fp[0] = 0;
  for (int64_t qb = 0; qb < nQ; ++qb) {
    accP += nP[qb];
    accF += nF[qb];
    TORCH_CHECK(accP <= std::numeric_limits<int32_t>::max() && accF <= std::numeric_limits<int32_t>::max(),
                "mem1_fast::block_map: more than 2^31-1 tiles; use larger BM/BN");
    pp[qb + 1] = static_cast<int32_t>(accP);
    fp[qb + 1] = static_cast<int32_t>(accF);
  }

  at::Tensor partial_idx = at::empty({accP}, opts);
  at::Tensor full_idx = at::empty({accF}, opts);
  int32_t* pi = partial_idx.data_ptr<int32_t>();
  int32_t* fi = full_idx.data_ptr<int32_t>();

  // Pass 2: fill (key blocks come out ascending).
  at::parallel_for(0, nQ, 1, [&](int64_t b, int64_t e) {
    Scratch scratch;
    for (int64_t qb = b; qb < e; ++qb) {
      int32_t* outP = pi + pp[qb];
      int32_t* outF = fi + fp[qb];
      for_each_tile(s, qb, scratch, [&](int64_t kb, int32_t kind) {
        if (kind == vis::kTileFull) {
          *outF++ = static_cast<int32_t>(kb);
        } else {
          *outP++ = static_cast<int32_t>(kb);
        }
      });
    }
  });

  return std::make_tuple(partial_ptr, partial_idx, full_ptr, full_idx);
}

// The schema lives in csrc/bindings.cpp (the single TORCH_LIBRARY(mem1_fast, m) of the extension).
TORCH_LIBRARY_IMPL(mem1_fast, CPU, m) { m.impl("block_map", &block_map_cpu); }

}  // namespace mem1_fast
