// mem1_fast::paged_attention -- CPU kernel of attention over a paged KV cache (mem1_fast/ops/paged_attention.py).
//
// One task per query row: slot by slot, the row's query heads read the slot's keys and values of every head while
// they are in cache (the Hq/Hkv query heads of a group share each read: GQA). K/V are read in place through the
// row's sequence's block table -- slot s is offset s % BS of block table[seq, s / BS] -- over the slots of the
// row's intervals only: nothing is gathered, and slots outside them (never-written or evicted memory) are never
// touched.
//
//   pass 1  the scores of the visible slots (scaled), kept in a per-thread buffer with each slot's cache offset;
//   pass 2  max, exp, sum per query head; O = sum_s p_s V_s / l.
// The work per row is a few hundred slots of head dim 16-128 (decode, observation prefill): the linear layers of
// the model dwarf it, so the inner loops are plain loops the compiler vectorizes for the build's target, not the
// register-blocked tiles of state_attention.cpp.
//
// Dtypes: float32 / float16 / bfloat16 accumulate in float32, float64 in double. Indices are validated as they are
// read (a table entry of -1, a slot past the table, a block id outside the cache, lo > hi): bad input raises,
// it never reads out of bounds. A row with no visible slot outputs 0.
// ISA: the fp32 body is compiled a second time for AVX2 + FMA (csrc/include/mem1_fast/simd.h's target macros) and
// chosen by simd::best_isa(), like the other CPU kernels.
#include "mem1_fast/simd.h"  // first: it silences a GCC warning before any header
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>


namespace mem1_fast {
namespace {

// q . k with 8 independent partial sums: the compiler vectorizes the lanes (one sum would be a serial chain, which
// it may not reorder without -ffast-math).
template <typename scalar_t, typename acc_t>
MEM1_INLINE acc_t dot(const acc_t* q, const scalar_t* k, int64_t D) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int u = 0; u < 8; ++u) part[u] += q[d + u] * static_cast<acc_t>(k[d + u]);
  for (; d < D; ++d) part[0] += q[d] * static_cast<acc_t>(k[d]);
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

template <typename scalar_t>
struct Paged {
  const scalar_t *Q, *KC, *VC;
  const int32_t *TAB, *SEQ, *LO, *HI;
  scalar_t* O;
  int64_t Hq, D, NB, BS, Hkv, G, K, B, MAXB;
  double scale;
};

template <typename acc_t>
struct Scratch {
  std::vector<acc_t> qf, acc, s;
  std::vector<int64_t> off;  // cache offset (in elements) of each visible slot's row for this head
};

// Row t: all its query heads over the row's visible slots. Slot by slot, every key/value head is read while the
// slot's row of the cache ([Hkv, D], contiguous) is in cache: the pool's layout puts a slot's heads together.
template <typename scalar_t, typename acc_t>
MEM1_INLINE void attend(const Paged<scalar_t>& P, int64_t t, Scratch<acc_t>& S) {
  const int64_t D = P.D, Hq = P.Hq, G = P.G, K = P.K, BS = P.BS, HD = P.Hkv * D;
  const int64_t b = P.SEQ[t];
  TORCH_CHECK(b >= 0 && b < P.B, "paged_attention: seq[", t, "] = ", b, " is not a row of the block table");
  S.off.clear();
  for (int64_t k = 0; k < K; ++k) {
    const int64_t a = P.LO[t * K + k], e = P.HI[t * K + k];
    TORCH_CHECK(a >= 0 && a <= e, "paged_attention: row ", t, " has an interval [", a, ", ", e, ")");
    // block by block: one table lookup (and no division) per block, not per slot
    for (int64_t slot = a; slot < e;) {
      const int64_t bi = slot / BS, o0 = slot - bi * BS, o1 = std::min(BS, o0 + (e - slot));
      TORCH_CHECK(bi < P.MAXB, "paged_attention: row ", t, " sees slot ", slot, ", past its block table");
      const int64_t blk = P.TAB[b * P.MAXB + bi];
      TORCH_CHECK(blk >= 0 && blk < P.NB, "paged_attention: row ", t, " sees slot ", slot, " in block ", blk,
                  ", which its table does not hold or the cache does not have");
      for (int64_t o = o0; o < o1; ++o) S.off.push_back((blk * BS + o) * HD);
      slot += o1 - o0;
    }
  }
  scalar_t* o = P.O + t * Hq * D;
  const int64_t n = static_cast<int64_t>(S.off.size());
  if (n == 0) {
    std::fill(o, o + Hq * D, scalar_t(0));
    return;
  }
  const scalar_t* qr = P.Q + t * Hq * D;
  S.qf.resize(Hq * D);
  S.acc.assign(Hq * D, acc_t(0));
  S.s.resize(Hq * n);
  const acc_t sc = static_cast<acc_t>(P.scale);
  for (int64_t j = 0; j < Hq * D; ++j) S.qf[j] = static_cast<acc_t>(qr[j]);
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* kr = P.KC + S.off[j];
    for (int64_t hq = 0; hq < Hq; ++hq) S.s[hq * n + j] = dot(S.qf.data() + hq * D, kr + (hq / G) * D, D) * sc;
  }
  for (int64_t hq = 0; hq < Hq; ++hq) {
    acc_t* sg = S.s.data() + hq * n;
    const acc_t m = *std::max_element(sg, sg + n);
    acc_t l = 0;
    for (int64_t j = 0; j < n; ++j) {
      sg[j] = std::exp(sg[j] - m);
      l += sg[j];
    }
    const acc_t inv = acc_t(1) / l;
    for (int64_t j = 0; j < n; ++j) sg[j] *= inv;
  }
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* vr = P.VC + S.off[j];
    for (int64_t hq = 0; hq < Hq; ++hq) {
      const acc_t p = S.s[hq * n + j];
      const scalar_t* vh = vr + (hq / G) * D;
      acc_t* ag = S.acc.data() + hq * D;
      for (int64_t d = 0; d < D; ++d) ag[d] += p * static_cast<acc_t>(vh[d]);
    }
  }
  for (int64_t j = 0; j < Hq * D; ++j) o[j] = static_cast<scalar_t>(S.acc[j]);
}

template <typename scalar_t, typename acc_t>
void attend_generic(const Paged<scalar_t>& P, int64_t t, Scratch<acc_t>& S) {
  attend<scalar_t, acc_t>(P, t, S);
}

#if MEM1_X86
// The same body compiled for AVX2 + FMA (8 fp32 lanes): the extension is built without -march flags, so this is
// the one place the fp32 path gets wide vectors; chosen at run time when the CPU has them.
MEM1_TARGET_PUSH_AVX2
void attend_f32_avx2(const Paged<float>& P, int64_t t, Scratch<float>& S) { attend<float, float>(P, t, S); }
MEM1_TARGET_POP
#endif

template <typename scalar_t, typename acc_t>
void paged_rows(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& table,
                const at::Tensor& seq, const at::Tensor& lo, const at::Tensor& hi, double scale, at::Tensor& out) {
  const int64_t T = q.size(0), Hq = q.size(1), Hkv = kc.size(2);
  const Paged<scalar_t> P{q.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                          table.data_ptr<int32_t>(), seq.data_ptr<int32_t>(), lo.data_ptr<int32_t>(),
                          hi.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), Hq, q.size(2), kc.size(0), kc.size(1),
                          Hkv, Hq / Hkv, lo.size(1), table.size(0), table.size(1), scale};
  void (*fn)(const Paged<scalar_t>&, int64_t, Scratch<acc_t>&) = &attend_generic<scalar_t, acc_t>;
#if MEM1_X86
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd::best_isa() >= simd::kIsaAvx2) fn = &attend_f32_avx2;
  }
#endif
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    Scratch<acc_t> S;
    for (int64_t t = t0; t < t1; ++t) fn(P, t, S);
  });
}

at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_table, const at::Tensor& seq, const at::Tensor& lo,
                               const at::Tensor& hi, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "paged_attention: q must be [T, Hq, D] and the caches one shape [blocks, block_size, Hkv, D]");
  TORCH_CHECK(k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(2) == 0,
              "paged_attention: q's heads / head dim do not fit the caches");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "paged_attention: q and the caches must share a dtype");
  for (const at::Tensor* x : {&block_table, &seq, &lo, &hi})
    TORCH_CHECK(x->scalar_type() == at::kInt, "paged_attention: block_table, seq, lo, hi must be int32");
  TORCH_CHECK(block_table.dim() == 2 && seq.dim() == 1 && seq.size(0) == q.size(0) && lo.dim() == 2 &&
                  lo.sizes() == hi.sizes() && lo.size(0) == q.size(0),
              "paged_attention: block_table must be [B, max_blocks], seq [T], lo and hi [T, K]");
  // the caches are a pool's storage: contiguous by construction (a copy of them would cost the whole pool)
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_attention: the caches must be contiguous");
  const at::Tensor qc = q.contiguous(), tc = block_table.contiguous(), sc = seq.contiguous();
  const at::Tensor lc = lo.contiguous(), hc = hi.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  switch (q.scalar_type()) {
    case at::kFloat: paged_rows<float, float>(qc, k_cache, v_cache, tc, sc, lc, hc, scale, out); break;
    case at::kDouble: paged_rows<double, double>(qc, k_cache, v_cache, tc, sc, lc, hc, scale, out); break;
    case at::kHalf: paged_rows<c10::Half, float>(qc, k_cache, v_cache, tc, sc, lc, hc, scale, out); break;
    case at::kBFloat16: paged_rows<c10::BFloat16, float>(qc, k_cache, v_cache, tc, sc, lc, hc, scale, out); break;
    default: TORCH_CHECK(false, "paged_attention: unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mem1_fast, CPU, m) { m.impl("paged_attention", &paged_attention_cpu); }

}  // namespace mem1_fast
