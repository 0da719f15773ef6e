// mem1_fast::paged_attention -- CPU kernel of attention over a paged KV cache (mem1_fast/ops/paged_attention.py).
//
// One task per (query row, key/value head): the Hq/Hkv query heads of the group share every key and value read
// (GQA), and K/V are read in place through the row's sequence's block table -- slot s is offset s % BS of block
// table[seq, s / BS] -- over the slots of the row's intervals only: nothing is gathered, and slots outside them
// (never-written or evicted memory) are never touched.
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
#include <vector>

namespace mem1_fast {
namespace {

template <typename scalar_t, typename acc_t>
void paged_rows(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& table,
                const at::Tensor& seq, const at::Tensor& lo, const at::Tensor& hi, double scale, at::Tensor& out) {
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t NB = kc.size(0), BS = kc.size(1), Hkv = kc.size(2);
  const int64_t G = Hq / Hkv, K = lo.size(1), B = table.size(0), MAXB = table.size(1);
  const scalar_t* Q = q.data_ptr<scalar_t>();
  const scalar_t* KC = kc.data_ptr<scalar_t>();
  const scalar_t* VC = vc.data_ptr<scalar_t>();
  const int32_t* TAB = table.data_ptr<int32_t>();
  const int32_t* SEQ = seq.data_ptr<int32_t>();
  const int32_t* LO = lo.data_ptr<int32_t>();
  const int32_t* HI = hi.data_ptr<int32_t>();
  scalar_t* O = out.data_ptr<scalar_t>();
  const acc_t sc = static_cast<acc_t>(scale);

  at::parallel_for(0, T * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> qf(G * D), acc(G * D), s;
    std::vector<int64_t> off;  // cache offset (in elements) of each visible slot's row for this head
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / Hkv, h = i % Hkv;
      const int64_t b = SEQ[t];
      TORCH_CHECK(b >= 0 && b < B, "paged_attention: seq[", t, "] = ", b, " is not a row of the block table");
      off.clear();
      for (int64_t k = 0; k < K; ++k) {
        const int64_t a = LO[t * K + k], e = HI[t * K + k];
        TORCH_CHECK(a >= 0 && a <= e, "paged_attention: row ", t, " has an interval [", a, ", ", e, ")");
        for (int64_t slot = a; slot < e; ++slot) {
          const int64_t bi = slot / BS;
          TORCH_CHECK(bi < MAXB, "paged_attention: row ", t, " sees slot ", slot, ", past its block table");
          const int64_t blk = TAB[b * MAXB + bi];
          TORCH_CHECK(blk >= 0 && blk < NB, "paged_attention: row ", t, " sees slot ", slot, " in block ", blk,
                      ", which its table does not hold or the cache does not have");
          off.push_back(((blk * BS + slot % BS) * Hkv + h) * D);
        }
      }
      scalar_t* o = O + (t * Hq + h * G) * D;
      const int64_t n = static_cast<int64_t>(off.size());
      if (n == 0) {
        std::fill(o, o + G * D, scalar_t(0));
        continue;
      }
      const scalar_t* qr = Q + (t * Hq + h * G) * D;
      for (int64_t j = 0; j < G * D; ++j) qf[j] = static_cast<acc_t>(qr[j]);
      s.resize(G * n);
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t* kr = KC + off[j];
        for (int64_t g = 0; g < G; ++g) {
          const acc_t* qg = qf.data() + g * D;
          acc_t dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * static_cast<acc_t>(kr[d]);
          s[g * n + j] = dot * sc;
        }
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t g = 0; g < G; ++g) {
        acc_t* sg = s.data() + g * n;
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
        const scalar_t* vr = VC + off[j];
        for (int64_t g = 0; g < G; ++g) {
          const acc_t p = s[g * n + j];
          acc_t* ag = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) ag[d] += p * static_cast<acc_t>(vr[d]);
        }
      }
      for (int64_t j = 0; j < G * D; ++j) o[j] = static_cast<scalar_t>(acc[j]);
    }
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
