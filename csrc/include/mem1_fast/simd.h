// The CPU kernels' one SIMD layer: float vectors of one lane (generic, also every ISA's tail path), AVX2 + FMA and
// AVX-512, behind one interface, and the run-time choice among them.
//
// The extension is compiled without -march flags. A kernel body written against the interface (a template, or a
// file included once per ISA) is compiled for AVX2 / AVX-512 between MEM1_TARGET_PUSH_<ISA> and MEM1_TARGET_POP,
// and the host code picks one at run time with `pick_isa`: torch's own choice (at::get_cpu_capability(), i.e.
// ATEN_CPU_CAPABILITY) capped by what the CPU supports. Ops take `isa` (-1 auto, 0 generic, 1 avx2, 2 avx512) so
// tests can run every body.
//
// exp2: round-to-nearest split, Cephes exp2f polynomial on [-0.5, 0.5] (rel. error ~1e-7), exponent by bits;
// x < -126 (and -inf) gives exactly 0 -- no subnormal probabilities, which would slow the next GEMM down by
// microcode assists --, NaN stays NaN. max(a, b) keeps a NaN in a.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 intrinsic headers trip -Wmaybe-uninitialized and -Wuninitialized (their `__Y = __Y` idiom for
// an undefined vector) once inlined; the diagnostic is reported at the header's lines, so it is silenced before any
// header is included.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define MEM1_X86 1
#include <immintrin.h>
#else
#define MEM1_X86 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define MEM1_INLINE inline __attribute__((always_inline))
#else
#define MEM1_INLINE inline
#endif

#if MEM1_X86
#if defined(__clang__)
#define MEM1_TARGET_PUSH_AVX2 _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c\"))), apply_to = function)")
#define MEM1_TARGET_PUSH_AVX512 \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c\"))), apply_to = function)")
#define MEM1_TARGET_POP _Pragma("clang attribute pop")
#else
#define MEM1_TARGET_PUSH_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define MEM1_TARGET_PUSH_AVX512 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c\")")
#define MEM1_TARGET_POP _Pragma("GCC pop_options")
#endif
#endif

namespace mem1_fast {
namespace simd {

// One lane; the generic body (float and double) and the column-tail path of every ISA.
template <class T_>
struct Scalar {
  using T = T_;
  using reg = T;
  using ireg = int32_t;
  using mask = bool;
  static constexpr int W = 1;
  static MEM1_INLINE reg zero() { return T(0); }
  static MEM1_INLINE reg set1(T x) { return x; }
  static MEM1_INLINE reg load(const T* p) { return *p; }
  static MEM1_INLINE void store(T* p, reg x) { *p = x; }
  static MEM1_INLINE reg add(reg a, reg b) { return a + b; }
  static MEM1_INLINE reg sub(reg a, reg b) { return a - b; }
  static MEM1_INLINE reg mul(reg a, reg b) { return a * b; }
  static MEM1_INLINE reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  static MEM1_INLINE reg fmsub(reg a, reg b, reg c) { return a * b - c; }
  static MEM1_INLINE reg max(reg a, reg b) { return a < b ? b : a; }  // NaN in a is kept
  static MEM1_INLINE T hsum(reg a) { return a; }
  static MEM1_INLINE T hmax(reg a) { return a; }
  static MEM1_INLINE reg exp2(reg x) { return x < T(-126) ? T(0) : std::exp2(x); }  // like the SIMD ones
  static MEM1_INLINE ireg iset1(int32_t x) { return x; }
  static MEM1_INLINE ireg iload(const int32_t* p) { return *p; }
  static MEM1_INLINE ireg iota() { return 0; }
  static MEM1_INLINE ireg iadd(ireg a, ireg b) { return a + b; }
  static MEM1_INLINE mask in_range(ireg c, ireg lo, ireg hi) { return lo <= c && c < hi; }
  static MEM1_INLINE mask mnone() { return false; }
  static MEM1_INLINE mask mor(mask a, mask b) { return a || b; }
  static MEM1_INLINE reg select(mask m, reg t, reg f) { return m ? t : f; }
  static MEM1_INLINE mask is_neg_inf(reg x) { return x == -std::numeric_limits<T>::infinity(); }
  static MEM1_INLINE bool any_nonzero(reg x) { return !(x == T(0)); }  // NaN counts
};

#if MEM1_X86
MEM1_TARGET_PUSH_AVX2
struct Avx2F32 {
  using T = float;
  using reg = __m256;
  using ireg = __m256i;
  using mask = __m256;
  static constexpr int W = 8;
  static MEM1_INLINE reg zero() { return _mm256_setzero_ps(); }
  static MEM1_INLINE reg set1(float x) { return _mm256_set1_ps(x); }
  static MEM1_INLINE reg load(const float* p) { return _mm256_loadu_ps(p); }
  static MEM1_INLINE void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static MEM1_INLINE reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static MEM1_INLINE reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static MEM1_INLINE reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static MEM1_INLINE reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static MEM1_INLINE reg fmsub(reg a, reg b, reg c) { return _mm256_fmsub_ps(a, b, c); }
  static MEM1_INLINE reg max(reg a, reg b) { return _mm256_max_ps(b, a); }  // NaN in a is kept
  static MEM1_INLINE float hsum(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static MEM1_INLINE float hmax(reg a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // 2^x: round-to-nearest split, Cephes exp2f polynomial on [-0.5, 0.5] (rel. error ~1e-7), exponent by bits;
  // x < -126 (and -inf) gives 0, NaN stays NaN.
  static MEM1_INLINE reg exp2(reg x) {
    reg xc = _mm256_max_ps(_mm256_set1_ps(-127.f), x);
    xc = _mm256_min_ps(_mm256_set1_ps(127.f), xc);
    const reg n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const reg f = _mm256_sub_ps(xc, n);
    reg p = _mm256_set1_ps(1.535336188319500e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const reg r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_blendv_ps(r, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_LT_OQ));
  }
  static MEM1_INLINE ireg iset1(int32_t x) { return _mm256_set1_epi32(x); }
  static MEM1_INLINE ireg iload(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static MEM1_INLINE ireg iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static MEM1_INLINE ireg iadd(ireg a, ireg b) { return _mm256_add_epi32(a, b); }
  static MEM1_INLINE mask in_range(ireg c, ireg lo, ireg hi) {
    // lo <= c  <=>  !(lo > c);  c < hi  <=>  hi > c
    const __m256i ge = _mm256_andnot_si256(_mm256_cmpgt_epi32(lo, c), _mm256_cmpgt_epi32(hi, c));
    return _mm256_castsi256_ps(ge);
  }
  static MEM1_INLINE mask mnone() { return _mm256_setzero_ps(); }
  static MEM1_INLINE mask mor(mask a, mask b) { return _mm256_or_ps(a, b); }
  static MEM1_INLINE reg select(mask m, reg t, reg f) { return _mm256_blendv_ps(f, t, m); }
  static MEM1_INLINE mask is_neg_inf(reg x) {
    return _mm256_cmp_ps(x, _mm256_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
  }
  static MEM1_INLINE bool any_nonzero(reg x) {
    return _mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_NEQ_UQ)) != 0;
  }
};
MEM1_TARGET_POP

MEM1_TARGET_PUSH_AVX512
struct Avx512F32 {
  using T = float;
  using reg = __m512;
  using ireg = __m512i;
  using mask = __mmask16;
  static constexpr int W = 16;
  static MEM1_INLINE reg zero() { return _mm512_setzero_ps(); }
  static MEM1_INLINE reg set1(float x) { return _mm512_set1_ps(x); }
  static MEM1_INLINE reg load(const float* p) { return _mm512_loadu_ps(p); }
  static MEM1_INLINE void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static MEM1_INLINE reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static MEM1_INLINE reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static MEM1_INLINE reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static MEM1_INLINE reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static MEM1_INLINE reg fmsub(reg a, reg b, reg c) { return _mm512_fmsub_ps(a, b, c); }
  static MEM1_INLINE reg max(reg a, reg b) { return _mm512_max_ps(b, a); }  // NaN in a is kept
  static MEM1_INLINE float hsum(reg a) {  // (not _mm512_reduce_add_ps: GCC 12 warns inside it)
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static MEM1_INLINE float hmax(reg a) {
    const __m256 h = _mm256_max_ps(_mm512_castps512_ps256(a),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // 2^x = p(f) * 2^n (scalef). x < -126 (and -inf) gives exactly 0 -- no denormal probabilities, which would
  // slow the next GEMM down by microcode assists --, NaN stays NaN.
  static MEM1_INLINE reg exp2(reg x) {
    reg xc = _mm512_max_ps(_mm512_set1_ps(-127.f), x);
    xc = _mm512_min_ps(_mm512_set1_ps(127.f), xc);
    const reg n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const reg f = _mm512_sub_ps(xc, n);
    reg p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_NLT_UQ), p, n);
  }
  static MEM1_INLINE ireg iset1(int32_t x) { return _mm512_set1_epi32(x); }
  static MEM1_INLINE ireg iload(const int32_t* p) { return _mm512_loadu_si512(p); }
  static MEM1_INLINE ireg iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static MEM1_INLINE ireg iadd(ireg a, ireg b) { return _mm512_add_epi32(a, b); }
  static MEM1_INLINE mask in_range(ireg c, ireg lo, ireg hi) {
    return _mm512_cmpge_epi32_mask(c, lo) & _mm512_cmplt_epi32_mask(c, hi);
  }
  static MEM1_INLINE mask mnone() { return 0; }
  static MEM1_INLINE mask mor(mask a, mask b) { return a | b; }
  static MEM1_INLINE reg select(mask m, reg t, reg f) { return _mm512_mask_blend_ps(m, f, t); }
  static MEM1_INLINE mask is_neg_inf(reg x) {
    return _mm512_cmp_ps_mask(x, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
  }
  static MEM1_INLINE bool any_nonzero(reg x) {
    return _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NEQ_UQ) != 0;
  }
};
MEM1_TARGET_POP
#endif  // MEM1_X86

enum Isa : int64_t { kIsaAuto = -1, kIsaGeneric = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };

inline int64_t best_isa() {
#if MEM1_X86
  static const int64_t best = [] {
    // follow torch's own choice (ATEN_CPU_CAPABILITY), capped by what this CPU does
    const std::string cap = at::get_cpu_capability();
    const bool fma = __builtin_cpu_supports("fma");
    if (cap == "AVX512" && fma && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
      return int64_t(kIsaAvx512);
    }
    if ((cap == "AVX512" || cap == "AVX2") && fma && __builtin_cpu_supports("avx2")) return int64_t(kIsaAvx2);
    return int64_t(kIsaGeneric);
  }();
  return best;
#else
  return kIsaGeneric;
#endif
}

inline int64_t pick_isa(int64_t requested, const char* op) {
  const int64_t best = best_isa();
  if (requested < 0) return best;
  TORCH_CHECK(requested <= kIsaAvx512, op, ": isa must be -1 (auto), 0 (generic), 1 (avx2) or 2 (avx512), got ",
              requested);
  TORCH_CHECK(requested <= best, op, ": isa=", requested, " is not available on this CPU / torch build (best: ", best,
              ")");
  return requested;
}

}  // namespace simd
}  // namespace mem1_fast
