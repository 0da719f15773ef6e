// mem1_fast::logprob_entropy_fwd / logprob_entropy_bwd / ppo_loss_fused -- CPU kernels (docs/design.md §5).
// The math is the chunked reference of mem1_fast/ops/logprob_entropy.py and ops/ppo_loss.py:
//
//   z = hidden . weight^T / tau,  p = softmax(z),  logp = z[t] - lse(z),  entropy = lse(z) - E_p[z]
//   d/dz = g_logp * (onehot(t) - p) + g_ent * p * (E_p[z] - z),   dh = (d/dz) . W / tau,   dW = (d/dz)^T . h / tau
//
// Never holds [N, V]. GEMMs are at::addmm_out on views (MKL/BLAS, threaded by it); the elementwise work runs per
// row (at::parallel_for over rows) with vectorized kernels, each row segment staying in L2.
//
// Generic op (logprob_entropy_fwd / _bwd): tiles of [Rb, Vt] logits (Rb = min(N, 2048) rows, Vt from a 32 MiB
// budget), vocabulary tiles outer, row blocks inner.
//   forward   per tile: Z = h_b W_v^T / tau (one GEMM); per row: max, sum exp(z - m), sum exp(z - m)(z - m) over the
//             tile, merged online into the row's running (m, s, sd) (double sums) -> lse, E_p[z], logp, entropy,
//             all taken relative to the row max, so +-1e4-scale logits neither overflow nor cancel.
//   backward  per tile: Z recomputed (one GEMM), dZ in place from the saved (lse, E_p[z]):
//             dZ = p (g_ent (E_p[z] - z) - g_logp) + g_logp onehot(t); dh_b (+)= dZ W_v / tau;
//             dW_v (+)= dZ^T h_b / tau.
//             W and dW are streamed once (W_v is reused from cache by the row blocks); h and dh (N x H, small) once
//             per vocabulary tile.
//   4 GEMMs per step in all (the logits are recomputed, never saved): floor 4/3 of the LM head's 3.
// Fused PPO loss (ppo_loss_fused): one pass over the vocabulary, chunks of R full rows [R, V] (R = min(512, 192 MiB /
// 4V)):
//   A  Z = h_c W^T / tau                                                     one GEMM
//   B  per row: max, sum exp, sum exp (z - m) -> lse, E_p[z], logp, entropy -> the PPO loss_t and dloss/dlogp,
//      dloss/dentropy (over the normalizer); in place Z <- dloss/dz
//   C  dh_c = Z W / tau,  dW += Z^T h_c / tau                                two GEMMs
//   3 GEMMs, the LM head's. Each chunk streams W twice and dW once (16 V H bytes against 6 R V H flops), so R, not V,
//   sets the relative overhead; R trades it against the chunk's memory (R V 4 bytes).
//
// Dtypes: fp32 / fp16 / bf16 / fp64 hidden and weight (independently); accumulation is fp64 when either is fp64,
// else fp32. An operand whose dtype differs from the accumulation dtype is converted on the fly (ATen copy_): W per
// vocabulary tile (scratch [tile, H]), so no full-size converted copy of W exists; h per row chunk (fused) or once
// ([N, H], generic). Gradients accumulate in the accumulation dtype: the generic backward converts d_weight tile by
// tile (each tile is final after its row blocks), the fused op needs a [V, H] fp32 accumulator for an fp16/bf16
// weight (every chunk adds to all of it).
//
// Elementwise row kernels: logprob_entropy_body.h is included once per ISA (generic, AVX2+FMA,
// AVX-512) under `#pragma GCC target`, as in state_attention.cpp; on the vector layer of csrc/include/mem1_fast/simd.h.
// The ISA follows torch's own choice (at::get_cpu_capability()) capped by the CPU; the ops take `isa` (-1 auto,
// 0 generic, 1 avx2, 2 avx512) so tests can run every body. Every row is reduced by one thread in a fixed order;
// the GEMMs are BLAS's (MKL may change its summation order with the thread count).
#include "mem1_fast/simd.h"  // first: it silences a GCC warning before any header

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace mem1_fast {
namespace lpe {

constexpr float kLog2ef = 1.4426950408889634f;
constexpr int64_t kSumBlock = 4096;  // elements per fp32 partial sum before it is added into a double

// Elementwise kernels over one row of logits (contiguous, n elements).
template <class T>
struct RowFns {
  T (*row_max)(const T* z, int64_t n);
  // s = sum exp(z - m), sd = sum exp(z - m) * (z - m)
  void (*row_sum_exp)(const T* z, int64_t n, T m, double* s, double* sd);
  // z <- exp(z - lse) * (ge * (ez - z) - gl)
  void (*row_grad)(T* z, int64_t n, T lse, T ez, T gl, T ge);
  const char* name;
};

// ----- generic body (any T; also the tail of the vector bodies) --------------------------------------------------
namespace generic {

template <class T>
T row_max(const T* z, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

template <class T>
void row_sum_exp(const T* z, int64_t n, T m, double* s_out, double* sd_out) {
  double s = 0, sd = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T d = z[i] - m;
    const T e = std::exp(d);
    s += e;
    sd += double(e) * d;
  }
  *s_out = s;
  *sd_out = sd;
}

template <class T>
void row_grad(T* z, int64_t n, T lse, T ez, T gl, T ge) {
  for (int64_t i = 0; i < n; ++i) {
    const T p = std::exp(z[i] - lse);
    z[i] = p * (ge * (ez - z[i]) - gl);
  }
}

template <class T>
RowFns<T> fns() {
  return {&row_max<T>, &row_sum_exp<T>, &row_grad<T>, "generic"};
}

}  // namespace generic

#if MEM1_X86
// ----- AVX2 + FMA body ---------------------------------------------------------------------------------------------
MEM1_TARGET_PUSH_AVX2
namespace avx2 {
using VF = simd::Avx2F32;
#define MEM1_LPE_ISA_NAME "avx2"
#include "logprob_entropy_body.h"
#undef MEM1_LPE_ISA_NAME
}  // namespace avx2
MEM1_TARGET_POP

// ----- AVX-512 body -------------------------------------------------------------------------------------------------
MEM1_TARGET_PUSH_AVX512
namespace avx512 {
using VF = simd::Avx512F32;
#define MEM1_LPE_ISA_NAME "avx512"
#include "logprob_entropy_body.h"
#undef MEM1_LPE_ISA_NAME
}  // namespace avx512
MEM1_TARGET_POP
#endif  // MEM1_X86

// =================================================================================================================
// Host side: checks, ISA choice, the chunk driver, torch ops.
// =================================================================================================================
namespace {

using simd::best_isa;
using simd::kIsaAvx2;
using simd::kIsaAvx512;
using simd::kIsaGeneric;
using simd::pick_isa;

template <class T>
RowFns<T> row_fns(int64_t isa);

template <>
RowFns<float> row_fns<float>(int64_t isa) {
#if MEM1_X86
  if (isa == kIsaAvx512) return avx512::fns();
  if (isa == kIsaAvx2) return avx2::fns();
#endif
  (void)isa;
  return generic::fns<float>();
}

template <>
RowFns<double> row_fns<double>(int64_t) {
  return generic::fns<double>();
}

// Default tile sizes (the ops' tile_rows / tile_cols override them).
// fused: rows per chunk. Each chunk streams W twice and d_weight once (16 V H bytes) against 6 R V H flops, so the
// relative time overhead depends on R alone (a few % at R >= 320 on the 2-core dev machine); the chunk's logits
// [R, V] are capped at 192 MiB (R = 320 at V = 152k: ~1.4% of what the naive path holds there; 62.5 MiB at 32k).
constexpr int64_t kFusedRows = 512;
constexpr int64_t kFusedChunkBytes = int64_t(192) << 20;
constexpr int64_t kTileBytes = int64_t(32) << 20;         // generic: logits tile [Rb, Vt] ([2048, 4096] fp32)
constexpr int64_t kRowBlock = 2048;                       // generic: rows per block (tuned on the dev CPU)
constexpr int64_t kConvTileBytes = int64_t(16) << 20;     // fused: converted weight tile (non-fp32 weight)

enum class Mode { kForward, kBackward, kFused };

// Per-token PPO loss (ops/ppo_loss.py, reference_ppo_loss) and its derivatives w.r.t. logp and entropy.
template <class T>
struct PPO {
  const float* old_logp = nullptr;
  const float* adv = nullptr;
  const float* ref_logp = nullptr;  // nullptr: no KL term
  const float* weights = nullptr;   // [N] per-token loss weights; nullptr: all 1
  T clip_eps = 0, ent_coef = 0, kl_coef = 0, inv_norm = 1;
  T* loss_rows = nullptr;  // [N], per-token weighted loss (before 1/normalizer)

  // w_t loss_t and (dloss/dlogp, dloss/dentropy), both already weighted and divided by the normalizer
  MEM1_INLINE void eval(int64_t g, T logp, T ent, T* gl, T* ge) const {
    const T A = T(adv[g]);
    const T ratio = std::exp(logp - T(old_logp[g]));
    const T unclipped = -A * ratio;
    const T clipped = -A * std::min(std::max(ratio, T(1) - clip_eps), T(1) + clip_eps);
    // max(unclipped, clipped); ties (ratio inside the clip range) take the unclipped branch: d/dlogp = -A r
    T loss = unclipped >= clipped ? unclipped : clipped;
    T dlogp = unclipped >= clipped ? -A * ratio : T(0);
    loss = loss - ent_coef * ent;
    if (ref_logp != nullptr && kl_coef != T(0)) {
      const T d = T(ref_logp[g]) - logp;
      const T ed = std::exp(d);
      loss = loss + kl_coef * (ed - d - T(1));
      dlogp += kl_coef * (T(1) - ed);
    }
    const T wn = (weights != nullptr ? T(weights[g]) : T(1)) * inv_norm;
    loss_rows[g] = weights != nullptr ? loss * T(weights[g]) : loss;
    *gl = dlogp * wn;
    *ge = -ent_coef * wn;
  }
};

template <class T>
struct Job {
  Mode mode = Mode::kForward;
  at::Tensor hidden, weight;  // contiguous, their own dtypes
  const int64_t* targets = nullptr;
  int64_t N = 0, H = 0, V = 0;
  int64_t tile_rows = 0, tile_cols = 0;  // requested tile shape (0: automatic)
  T inv_tau = 1;
  bool need_h = false, need_w = false;
  RowFns<T> fns{};
  // forward outputs (kForward, kFused) / backward inputs (kBackward): [N] in T
  T *logp = nullptr, *ent = nullptr, *lse = nullptr, *ez = nullptr;
  const T *g_logp = nullptr, *g_ent = nullptr;  // kBackward; nullptr = that output unused
  PPO<T> ppo;                                   // kFused
  at::Tensor d_hidden, d_weight;                // outputs in the input dtypes (undefined when not needed)
};

int64_t clamp_tile(int64_t x, int64_t lo, int64_t hi) {
  x = std::min(x, hi);
  if (x < hi && x >= 32) x = x / 16 * 16;  // whole cache lines
  return std::max<int64_t>(std::max<int64_t>(lo, 1), std::min(x, std::max<int64_t>(hi, 1)));
}

// Operands in the accumulation dtype T: views of fp32 inputs, converted copies (into reused scratch) otherwise.
template <class T>
struct Operands {
  at::Tensor hidden, weight, hbuf, wbuf;
  bool conv_h = false, conv_w = false;
  Operands(const Job<T>& J, int64_t max_rows, int64_t max_cols) : hidden(J.hidden), weight(J.weight) {
    const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
    const auto opt = at::TensorOptions().dtype(acc).device(at::kCPU);
    conv_h = hidden.scalar_type() != acc;
    conv_w = weight.scalar_type() != acc;
    if (conv_h) hbuf = at::empty({max_rows, J.H}, opt);
    if (conv_w) wbuf = at::empty({max_cols, J.H}, opt);
  }
  at::Tensor rows(int64_t r0, int64_t rn) {
    if (!conv_h) return hidden.narrow(0, r0, rn);
    at::Tensor t = hbuf.narrow(0, 0, rn);
    t.copy_(hidden.narrow(0, r0, rn));  // ATen's vectorized, parallel conversion
    return t;
  }
  at::Tensor wtile(int64_t v0, int64_t vn) {
    if (!conv_w) return weight.narrow(0, v0, vn);
    at::Tensor t = wbuf.narrow(0, 0, vn);
    t.copy_(weight.narrow(0, v0, vn));
    return t;
  }
};

// Gradient accumulators in T: the outputs themselves when their dtype is T.
template <class T>
struct GradAcc {
  at::Tensor dh, dw;  // dh: [max_rows, H] scratch (converted per row block) or the output; dw: [V, H]
  bool conv_h = false, conv_w = false;
  GradAcc(Job<T>& J, int64_t max_rows) {
    const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
    const auto opt = at::TensorOptions().dtype(acc).device(at::kCPU);
    if (J.need_h) {
      conv_h = J.d_hidden.scalar_type() != acc;
      dh = conv_h ? at::empty({max_rows, J.H}, opt) : J.d_hidden;
    }
    if (J.need_w) {
      conv_w = J.d_weight.scalar_type() != acc;
      dw = conv_w ? at::empty({J.V, J.H}, opt) : J.d_weight;
    }
  }
  at::Tensor dh_rows(int64_t r0, int64_t rn) { return conv_h ? dh.narrow(0, 0, rn) : dh.narrow(0, r0, rn); }
  void finish_rows(Job<T>& J, int64_t r0, int64_t rn) {
    if (J.need_h && conv_h) J.d_hidden.narrow(0, r0, rn).copy_(dh.narrow(0, 0, rn));
  }
  void finish(Job<T>& J) {
    if (!J.need_w) return;
    if (J.N == 0) {
      J.d_weight.zero_();
    } else if (conv_w) {
      J.d_weight.copy_(dw);
    }
  }
};

// Generic forward / backward: tiles [Rb, Vt] of logits, vocabulary tiles outer, row blocks inner; the logits are
// recomputed tile by tile, never a full row.
//   forward   Z = h_b W_v^T / tau; per row, (max, sum exp, sum exp * (z - max)) of the tile merged online into the
//             row's running (m, s, sd).
//   backward  Z recomputed, dZ in place from the saved (lse, E_p[z]), dh_b (+)= dZ W_v / tau, dW_v (+)= dZ^T h_b / tau.
// W and dW are streamed once (each dW_v tile is final after its row blocks, so an fp16/bf16 d_weight is converted
// tile by tile), h and dh (N x H, small; fp32 copies when their dtype is not T) once per vocabulary tile.
template <class T>
void run_tiled(Job<T>& J) {
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  const auto opt = at::TensorOptions().dtype(acc).device(at::kCPU);
  const int64_t N = J.N, V = J.V;
  const bool fwd = J.mode == Mode::kForward;
  if (N == 0) {
    if (!fwd && J.need_w) J.d_weight.zero_();
    return;
  }
  const int64_t Rb = clamp_tile(J.tile_rows > 0 ? J.tile_rows : kRowBlock, 1, N);
  const int64_t Vt = clamp_tile(J.tile_cols > 0 ? J.tile_cols : kTileBytes / (Rb * int64_t(sizeof(T))), 16, V);
  at::Tensor Zbuf = at::empty({Rb, Vt}, opt);
  const at::Tensor h = J.hidden.scalar_type() == acc ? J.hidden : J.hidden.to(acc);  // [N, H] in T
  const bool conv_w = J.weight.scalar_type() != acc;
  at::Tensor wbuf = conv_w ? at::empty({Vt, J.H}, opt) : at::Tensor();
  at::Tensor dh, dwbuf;
  if (!fwd && J.need_h) dh = J.d_hidden.scalar_type() == acc ? J.d_hidden : at::empty({N, J.H}, opt);
  if (!fwd && J.need_w && J.d_weight.scalar_type() != acc) dwbuf = at::empty({Vt, J.H}, opt);
  std::vector<T> m(fwd ? N : 0, -std::numeric_limits<T>::infinity()), zt(fwd ? N : 0);
  std::vector<double> s(fwd ? N : 0, 0.0), sd(fwd ? N : 0, 0.0);

  for (int64_t v0 = 0; v0 < V; v0 += Vt) {
    const int64_t vn = std::min(Vt, V - v0);
    at::Tensor Wv = J.weight.narrow(0, v0, vn);
    if (conv_w) Wv = wbuf.narrow(0, 0, vn).copy_(Wv);  // ATen's vectorized, parallel conversion
    at::Tensor dWv;
    if (!fwd && J.need_w) dWv = dwbuf.defined() ? dwbuf.narrow(0, 0, vn) : J.d_weight.narrow(0, v0, vn);
    for (int64_t r0 = 0; r0 < N; r0 += Rb) {
      const int64_t rn = std::min(Rb, N - r0);
      const at::Tensor hb = h.narrow(0, r0, rn);
      at::Tensor Z = Zbuf.narrow(0, 0, rn).narrow(1, 0, vn);  // [rn, vn], row stride Vt
      at::addmm_out(Z, Z, hb, Wv.t(), /*beta=*/0, /*alpha=*/J.inv_tau);
      T* zp = Zbuf.data_ptr<T>();
      at::parallel_for(0, rn, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t g = r0 + i;
          T* z = zp + i * Vt;
          const int64_t t = J.targets[g] - v0;
          const bool in_tile = t >= 0 && t < vn;
          if (fwd) {
            const T mo = m[g];
            const T mn = std::max(mo, J.fns.row_max(z, vn));
            if (mn > mo && s[g] > 0) {  // rescale the running sums to the new max
              const double d = double(mo) - double(mn), a = std::exp(d);
              sd[g] = a * (sd[g] + d * s[g]);
              s[g] *= a;
            }
            m[g] = mn;
            double ts = 0, tsd = 0;
            J.fns.row_sum_exp(z, vn, mn, &ts, &tsd);
            s[g] += ts;
            sd[g] += tsd;
            if (in_tile) zt[g] = z[t];
          } else {
            const T gl = J.g_logp ? J.g_logp[g] : T(0);
            const T ge = J.g_ent ? J.g_ent[g] : T(0);
            J.fns.row_grad(z, vn, J.lse[g], J.ez[g], gl, ge);
            if (in_tile) z[t] += gl;
          }
        }
      });
      if (fwd) continue;
      if (J.need_h) {
        at::Tensor dhb = dh.narrow(0, r0, rn);
        at::addmm_out(dhb, dhb, Z, Wv, /*beta=*/v0 == 0 ? 0 : 1, /*alpha=*/J.inv_tau);
      }
      if (J.need_w) at::addmm_out(dWv, dWv, Z.t(), hb, /*beta=*/r0 == 0 ? 0 : 1, /*alpha=*/J.inv_tau);
    }
    if (dwbuf.defined()) J.d_weight.narrow(0, v0, vn).copy_(dWv);
  }
  if (fwd) {
    for (int64_t g = 0; g < N; ++g) {
      const double logs = std::log(s[g]), mean_d = sd[g] / s[g];  // s >= 1 (the max term is exactly 1)
      J.lse[g] = T(double(m[g]) + logs);
      J.ez[g] = T(double(m[g]) + mean_d);
      J.logp[g] = T(double(zt[g] - m[g]) - logs);
      J.ent[g] = T(logs - mean_d);
    }
  } else if (J.need_h && !dh.is_same(J.d_hidden)) {
    J.d_hidden.copy_(dh);
  }
}

// Fused PPO loss: chunks of R full rows, one pass over the vocabulary.
//   A  Z = h_c W^T / tau                                     (Z: [R, V], the chunk's logits, held once)
//   B  per row: max, sum exp, sum exp (z - max) -> lse, E_p[z], logp, entropy -> PPO loss_t, dloss/dlogp,
//      dloss/dentropy; then in place Z <- dloss/dz = p (ge (E_p[z] - z) - gl) + gl onehot(t)
//   C  dh_c = Z W / tau,  dW += Z^T h_c / tau
// Each chunk streams W twice and dW once (read + write): R trades memory (R V 4 bytes) against that traffic.
template <class T>
void run_fused(Job<T>& J) {
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  const auto opt = at::TensorOptions().dtype(acc).device(at::kCPU);
  const int64_t N = J.N, H = J.H, V = J.V;
  const bool grads = J.need_h || J.need_w;
  const int64_t R = clamp_tile(
      J.tile_rows > 0 ? J.tile_rows : std::min(kFusedRows, kFusedChunkBytes / (V * int64_t(sizeof(T)))), 1, N);
  const bool conv_w = J.weight.scalar_type() != acc;
  const int64_t Vc = conv_w ? clamp_tile(J.tile_cols > 0 ? J.tile_cols : kConvTileBytes / (H * int64_t(sizeof(T))),
                                         16, V)
                            : V;
  at::Tensor Zbuf = at::empty({std::min(R, std::max<int64_t>(N, 1)), V}, opt);
  Operands<T> X(J, R, Vc);
  GradAcc<T> G(J, R);

  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rn = std::min(R, N - r0);
    const at::Tensor hc = X.rows(r0, rn);
    at::Tensor Z = Zbuf.narrow(0, 0, rn);  // contiguous [rn, V]
    for (int64_t v0 = 0; v0 < V; v0 += Vc) {  // A
      const int64_t vn = std::min(Vc, V - v0);
      at::Tensor Zv = Z.narrow(1, v0, vn);
      at::addmm_out(Zv, Zv, hc, X.wtile(v0, vn).t(), /*beta=*/0, /*alpha=*/J.inv_tau);
    }
    T* zp = Z.data_ptr<T>();
    at::parallel_for(0, rn, 1, [&](int64_t b, int64_t e) {  // B, one row at a time (the row stays in L2)
      for (int64_t i = b; i < e; ++i) {
        const int64_t g = r0 + i;
        T* z = zp + i * V;
        const int64_t t = J.targets[g];
        const T m = J.fns.row_max(z, V);
        double s = 0, sd = 0;
        J.fns.row_sum_exp(z, V, m, &s, &sd);
        const double logs = std::log(s), mean_d = sd / s;  // s >= 1 (the max term is exactly 1), mean_d <= 0
        const T lse = T(double(m) + logs), ez = T(double(m) + mean_d);
        const T lp = T(double(z[t] - m) - logs), en = T(logs - mean_d);
        J.lse[g] = lse;
        J.ez[g] = ez;
        J.logp[g] = lp;
        J.ent[g] = en;
        T gl = 0, ge = 0;
        J.ppo.eval(g, lp, en, &gl, &ge);
        if (!grads) continue;
        J.fns.row_grad(z, V, lse, ez, gl, ge);
        z[t] += gl;
      }
    });
    if (!grads) continue;
    at::Tensor dhc = J.need_h ? G.dh_rows(r0, rn) : at::Tensor();
    for (int64_t v0 = 0; v0 < V; v0 += Vc) {  // C
      const int64_t vn = std::min(Vc, V - v0);
      const at::Tensor Wv = X.wtile(v0, vn);
      const at::Tensor dZv = Z.narrow(1, v0, vn);
      if (J.need_h) at::addmm_out(dhc, dhc, dZv, Wv, /*beta=*/v0 == 0 ? 0 : 1, /*alpha=*/J.inv_tau);
      if (J.need_w) {
        at::Tensor dWv = G.dw.narrow(0, v0, vn);
        at::addmm_out(dWv, dWv, dZv.t(), hc, /*beta=*/r0 == 0 ? 0 : 1, /*alpha=*/J.inv_tau);
      }
    }
    G.finish_rows(J, r0, rn);
  }
  if (grads) G.finish(J);
}

template <class T>
void run(Job<T>& J) {
  if (J.mode == Mode::kFused) {
    run_fused(J);
  } else {
    run_tiled(J);
  }
}

// ----- checks -------------------------------------------------------------------------------------------------
bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

at::ScalarType check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                            double temperature, const char* op) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), op,
              ": hidden must be [N, H] and weight [V, H], got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(is_float_type(hidden.scalar_type()) && is_float_type(weight.scalar_type()), op,
              ": hidden and weight must be float32/float16/bfloat16/float64, got ", hidden.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), op, ": targets must be [N=", hidden.size(0),
              "], got ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(), op,
              ": the CPU implementation needs CPU tensors");
  TORCH_CHECK(weight.size(0) > 0, op, ": weight must have at least one row (V > 0)");
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
  const bool dbl = hidden.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble;
  return dbl ? at::kDouble : at::kFloat;
}

void check_targets(const at::Tensor& targets, int64_t V, const char* op) {
  const int64_t* t = targets.data_ptr<int64_t>();
  const int64_t n = targets.numel();
  int64_t bad = -1;
  for (int64_t i = 0; i < n && bad < 0; ++i) {
    if (t[i] < 0 || t[i] >= V) bad = i;
  }
  TORCH_CHECK(bad < 0, op, ": target ids must lie in [0, ", V, "), got ", (bad < 0 ? 0 : t[bad]), " at row ", bad);
}

at::Tensor row_vector(const c10::optional<at::Tensor>& x, int64_t N, at::ScalarType dt, const char* name,
                      const char* op) {
  if (!x.has_value() || !x->defined()) return at::Tensor();
  TORCH_CHECK(x->dim() == 1 && x->size(0) == N, op, ": ", name, " must be [N=", N, "], got ", x->sizes());
  TORCH_CHECK(x->device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  return x->to(dt).contiguous();
}

template <class T>
void setup(Job<T>& J, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
           double temperature, int64_t tile_rows, int64_t tile_cols, int64_t isa, const char* op) {
  J.hidden = hidden.contiguous();
  J.weight = weight.contiguous();
  J.targets = targets.data_ptr<int64_t>();
  J.N = hidden.size(0);
  J.H = hidden.size(1);
  J.V = weight.size(0);
  J.tile_rows = tile_rows;
  J.tile_cols = tile_cols;
  J.inv_tau = T(1.0 / temperature);
  J.fns = row_fns<T>(pick_isa(isa, op));
}

template <class T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_impl(const at::Tensor& hidden, const at::Tensor& weight,
                                                                    const at::Tensor& targets, double temperature,
                                                                    int64_t tile_rows, int64_t tile_cols, int64_t isa,
                                                                    const char* op) {
  Job<T> J;
  J.mode = Mode::kForward;
  setup(J, hidden, weight, targets, temperature, tile_rows, tile_cols, isa, op);
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor logp = at::empty({J.N}, opt), ent = at::empty({J.N}, opt);
  at::Tensor lse = at::empty({J.N}, opt), ez = at::empty({J.N}, opt);
  J.logp = logp.data_ptr<T>();
  J.ent = ent.data_ptr<T>();
  J.lse = lse.data_ptr<T>();
  J.ez = ez.data_ptr<T>();
  run(J);
  return {logp, ent, lse, ez};
}

}  // namespace

// logp, entropy, lse, E_p[z] (all [N], float32; float64 when an input is float64)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprob_entropy_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets_in, double temperature,
    int64_t tile_rows, int64_t tile_cols, int64_t isa) {
  const char* op = "mem1_fast::logprob_entropy_fwd";
  at::NoGradGuard no_grad;  // the ATen calls below write into views; no autograd inside this op
  const at::ScalarType acc = check_inputs(hidden, weight, targets_in, temperature, op);
  const at::Tensor targets = targets_in.contiguous();
  check_targets(targets, weight.size(0), op);
  if (acc == at::kDouble) return fwd_impl<double>(hidden, weight, targets, temperature, tile_rows, tile_cols, isa, op);
  return fwd_impl<float>(hidden, weight, targets, temperature, tile_rows, tile_cols, isa, op);
}

namespace {
template <class T>
std::tuple<at::Tensor, at::Tensor> bwd_impl(const at::Tensor& g_logp, const at::Tensor& g_ent,
                                            const at::Tensor& hidden, const at::Tensor& weight,
                                            const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& ez,
                                            double temperature, bool need_h, bool need_w, int64_t tile_rows,
                                            int64_t tile_cols, int64_t isa, const char* op) {
  Job<T> J;
  J.mode = Mode::kBackward;
  setup(J, hidden, weight, targets, temperature, tile_rows, tile_cols, isa, op);
  J.lse = lse.data_ptr<T>();
  J.ez = ez.data_ptr<T>();
  J.g_logp = g_logp.defined() ? g_logp.data_ptr<T>() : nullptr;
  J.g_ent = g_ent.defined() ? g_ent.data_ptr<T>() : nullptr;
  J.need_h = need_h;
  J.need_w = need_w;
  if (need_h) J.d_hidden = at::empty(hidden.sizes(), hidden.options());
  if (need_w) J.d_weight = at::empty(weight.sizes(), weight.options());
  if (need_h && J.N == 0) J.d_hidden.zero_();
  if (J.g_logp == nullptr && J.g_ent == nullptr) {  // neither output used: zero gradients, no work
    if (need_h) J.d_hidden.zero_();
    if (need_w) J.d_weight.zero_();
    return {J.d_hidden, J.d_weight};
  }
  run(J);
  return {J.d_hidden, J.d_weight};
}
}  // namespace

// (d_hidden, d_weight) in the input dtypes; an undefined tensor (None) for a gradient that is not needed.
std::tuple<at::Tensor, at::Tensor> logprob_entropy_bwd_cpu(const c10::optional<at::Tensor>& g_logp_in,
                                                           const c10::optional<at::Tensor>& g_ent_in,
                                                           const at::Tensor& hidden, const at::Tensor& weight,
                                                           const at::Tensor& targets_in, const at::Tensor& lse_in,
                                                           const at::Tensor& ez_in, double temperature,
                                                           bool need_hidden, bool need_weight, int64_t tile_rows,
                                                           int64_t tile_cols, int64_t isa) {
  const char* op = "mem1_fast::logprob_entropy_bwd";
  at::NoGradGuard no_grad;  // the ATen calls below write into views; no autograd inside this op
  const at::ScalarType acc = check_inputs(hidden, weight, targets_in, temperature, op);
  const at::Tensor targets = targets_in.contiguous();
  check_targets(targets, weight.size(0), op);
  const int64_t N = hidden.size(0);
  const at::Tensor g_logp = row_vector(g_logp_in, N, acc, "g_logp", op);
  const at::Tensor g_ent = row_vector(g_ent_in, N, acc, "g_ent", op);
  const at::Tensor lse = row_vector(lse_in, N, acc, "lse", op);
  const at::Tensor ez = row_vector(ez_in, N, acc, "ez", op);
  TORCH_CHECK(lse.defined() && ez.defined(), op, ": lse and ez (saved by the forward) are required");
  if (acc == at::kDouble) {
    return bwd_impl<double>(g_logp, g_ent, hidden, weight, targets, lse, ez, temperature, need_hidden, need_weight,
                            tile_rows, tile_cols, isa, op);
  }
  return bwd_impl<float>(g_logp, g_ent, hidden, weight, targets, lse, ez, temperature, need_hidden, need_weight,
                         tile_rows, tile_cols, isa, op);
}

namespace {
template <class T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_impl(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, const at::Tensor& old_logp,
    const at::Tensor& adv, const at::Tensor& ref_logp, double temperature, double clip_eps, double entropy_coef,
    double kl_coef, double normalizer, bool need_h, bool need_w, int64_t tile_rows, int64_t tile_cols, int64_t isa,
    const at::Tensor& weights, const char* op) {
  Job<T> J;
  J.mode = Mode::kFused;
  setup(J, hidden, weight, targets, temperature, tile_rows, tile_cols, isa, op);
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const int64_t N = J.N;
  at::Tensor logp = at::empty({N}, opt), ent = at::empty({N}, opt);
  at::Tensor lse = at::empty({N}, opt), ez = at::empty({N}, opt), loss_rows = at::empty({N}, opt);
  J.logp = logp.data_ptr<T>();
  J.ent = ent.data_ptr<T>();
  J.lse = lse.data_ptr<T>();
  J.ez = ez.data_ptr<T>();
  J.ppo.old_logp = old_logp.data_ptr<float>();
  J.ppo.adv = adv.data_ptr<float>();
  J.ppo.ref_logp = ref_logp.defined() ? ref_logp.data_ptr<float>() : nullptr;
  J.ppo.weights = weights.defined() ? weights.data_ptr<float>() : nullptr;
  J.ppo.clip_eps = T(clip_eps);
  J.ppo.ent_coef = T(entropy_coef);
  J.ppo.kl_coef = T(kl_coef);
  J.ppo.inv_norm = T(1.0 / normalizer);
  J.ppo.loss_rows = loss_rows.data_ptr<T>();
  J.need_h = need_h;
  J.need_w = need_w;
  if (need_h) J.d_hidden = at::empty(hidden.sizes(), hidden.options());
  if (need_w) J.d_weight = at::empty(weight.sizes(), weight.options());
  if (need_h && N == 0) J.d_hidden.zero_();
  run(J);
  // fixed-order sum in double: the same loss whatever the thread count
  const T* lr = J.ppo.loss_rows;
  double total = 0;
  for (int64_t i = 0; i < N; ++i) total += double(lr[i]);
  at::Tensor loss = at::empty({}, opt);  // float32 (float64 for float64 inputs, as the reference)
  loss.fill_(total / normalizer);
  return {loss, logp, ent, J.d_hidden, J.d_weight};
}
}  // namespace

// (loss 0-dim, logp [N], entropy [N], d_hidden, d_weight): the gradients of `loss` (d_hidden / d_weight undefined
// when not needed).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_loss_fused_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets_in, const at::Tensor& old_in,
    const at::Tensor& adv_in, const c10::optional<at::Tensor>& ref_in, double temperature, double clip_eps,
    double entropy_coef, double kl_coef, double normalizer, bool need_hidden, bool need_weight, int64_t tile_rows,
    int64_t tile_cols, int64_t isa, const c10::optional<at::Tensor>& weights_in) {
  const char* op = "mem1_fast::ppo_loss_fused";
  at::NoGradGuard no_grad;  // the ATen calls below write into views; no autograd inside this op
  const at::ScalarType acc = check_inputs(hidden, weight, targets_in, temperature, op);
  const at::Tensor targets = targets_in.contiguous();
  check_targets(targets, weight.size(0), op);
  const int64_t N = hidden.size(0);
  TORCH_CHECK(clip_eps > 0, op, ": clip_eps must be > 0, got ", clip_eps);
  TORCH_CHECK(normalizer > 0, op, ": normalizer must be > 0, got ", normalizer);
  const at::Tensor old_logp = row_vector(old_in, N, at::kFloat, "old_logp", op);
  const at::Tensor adv = row_vector(adv_in, N, at::kFloat, "advantages", op);
  const at::Tensor ref_logp = row_vector(ref_in, N, at::kFloat, "ref_logp", op);
  TORCH_CHECK(kl_coef == 0 || ref_logp.defined(), op, ": kl_coef != 0 needs ref_logp");
  const at::Tensor weights = row_vector(weights_in, N, at::kFloat, "token_weights", op);
  if (acc == at::kDouble) {
    return ppo_impl<double>(hidden, weight, targets, old_logp, adv, ref_logp, temperature, clip_eps, entropy_coef,
                            kl_coef, normalizer, need_hidden, need_weight, tile_rows, tile_cols, isa, weights, op);
  }
  return ppo_impl<float>(hidden, weight, targets, old_logp, adv, ref_logp, temperature, clip_eps, entropy_coef,
                         kl_coef, normalizer, need_hidden, need_weight, tile_rows, tile_cols, isa, weights, op);
}

// Which row-kernel body `isa` resolves to ("avx512", "avx2" or "generic"; float64 always runs "generic").
std::string logprob_entropy_cpu_isa(const at::Tensor& probe, int64_t isa) {
  const int64_t chosen = pick_isa(isa, "mem1_fast::logprob_entropy_cpu_isa");
  if (probe.scalar_type() == at::kDouble) return "generic";
  return row_fns<float>(chosen).name;
}

// The schemas live in csrc/bindings.cpp (the single TORCH_LIBRARY(mem1_fast, m) of the extension).
TORCH_LIBRARY_IMPL(mem1_fast, CPU, m) {
  m.impl("logprob_entropy_fwd", &logprob_entropy_fwd_cpu);
  m.impl("logprob_entropy_bwd", &logprob_entropy_bwd_cpu);
  m.impl("ppo_loss_fused", &ppo_loss_fused_cpu);
  m.impl("logprob_entropy_cpu_isa", &logprob_entropy_cpu_isa);
}

}  // namespace lpe
}  // namespace mem1_fast
