// mem1_fast::state_attention_fwd / state_attention_bwd -- CPU kernels of state-visibility attention
// (docs/design.md §4-§5).
//
// FlashAttention-2 on the tiles of a block map (csrc/cpu/block_map.cpp): only listed (query block, key block) tiles
// are computed; FULL tiles need no mask, PARTIAL tiles are masked per element from the interval spec lo/hi; empty
// tiles are never visited.
//
//   forward    one task per (query block, head): S^T = K_tile . Q^T, online softmax over the listed key tiles in
//              base 2, O^T += V_tile^T . P^T, fp32 accumulators; saves the natural-log LSE.
//   backward   P recomputed from the LSE, Delta = rowsum(dO * O), dS = P (dP - Delta). Two schedules, chosen by
//              how the kv heads spread over the threads, with bit-identical results:
//              fused     one task per kv head: key blocks ascending, the query blocks of the transposed map (built
//                        here from the map passed in, a counting sort), the Hq/Hkv query heads of the group:
//                        S, dP, dV^T += dO^T P, dK^T += Q^T dS, dQ += dS K in place -- 5 tile GEMMs.
//              two-pass  dQ per (query block, head), then dK/dV per (key block, kv head) -- 7 tile GEMMs, but as
//                        many tasks as tiles allow (used when Hkv is not a multiple of the thread count, e.g. MQA).
//              Every product is formed from the same operands in the same order in both (scores unscaled in every
//              GEMM, scaled right after), so the gradients agree bit for bit.
// Every output element is written by exactly one task, in a fixed order: results are bit-identical run to run and
// whatever the thread count (no atomics, so `deterministic` has nothing to switch).
//
// GEMMs: C[M,N] (+)= A[M,K] B[K,N], A read by scalar broadcast at any (row, col) strides (so A^T is free: the big
// q/k/v/dO tensors are only ever read that way), B a packed tile of 64 contiguous lanes in L1 (Q^T, K^T, V^T, dO^T,
// P, dS), accumulators transposed where needed (O^T, dQ^T, dK^T, dV^T) so that this always holds. A register-
// blocked micro-kernel does them: 6 x 64 fp32 accumulators in 24 zmm registers with AVX-512, 6 x 16 with AVX2.
// Measured on the 2-core dev CPU, 64x64x64 tiles, one thread: ~115 GFLOP/s (~75% of AVX-512 peak), on par with or
// above MKL sgemm called per tile (90-113 GFLOP/s NN, 60-78 with a transposed operand), without MKL's per-call
// overhead or threading inside our parallel region. The next tile's K/V (Q/dO) rows are prefetched into L2.
//
// ISA: the extension is compiled without -march flags, so the kernel body (the #else branch at the bottom of this
// file) is included three times: under `#pragma GCC target("avx512f,...")`, under `target("avx2,fma")`, and for the
// generic target (also the only one for float64). The choice at run time follows torch's own
// (`at::get_cpu_capability()`, i.e. ATEN_CPU_CAPABILITY) and what the CPU supports; the ops take an `isa` argument
// (-1 auto, 0 generic, 1 avx2, 2 avx512) and the backward a `schedule` argument so tests can run every path.
//
// Dtypes: fp16/bf16 inputs are converted to fp32 once (fp32 math, outputs converted back); float64 runs the generic
// body in double. Non-finite K/V values: rows of K/V holding one are zeroed in a copy (only made when there is one),
// and exactly the (row, head) pairs whose visible keys include such a row get NaN outputs; in the backward those
// rows contribute nothing (their dO is treated as 0), which is what the reference (autograd through its masking)
// gives. Rows with no visible key: output 0, LSE -inf, zero gradients. Probabilities below 2^-126 are flushed to 0
// (no denormals reach the GEMMs).
#ifndef MEM1_SA_BODY
#define MEM1_SA_BODY 1

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 intrinsic headers trip -Wmaybe-uninitialized (their `__Y = __Y` idiom) once inlined; the
// diagnostic is reported at the header's lines, so it is silenced before any header is included.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define MEM1_SA_X86 1
#include <immintrin.h>
#else
#define MEM1_SA_X86 0
#endif

#include "mem1_fast/visibility.h"

#if defined(__GNUC__) || defined(__clang__)
#define MEM1_SA_INLINE inline __attribute__((always_inline))
#else
#define MEM1_SA_INLINE inline
#endif

namespace mem1_fast {
namespace sa {

constexpr int64_t kPad = 16;  // lane padding of tile buffers (a multiple of every vector width used)
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

MEM1_SA_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Everything a task needs; plain pointers, no torch types (the kernel bodies are compiled per ISA).
template <class T>
struct Args {
  int64_t ntok = 0, Hq = 0, Hkv = 0, G = 1, D = 0, K = 0;  // tokens, heads, group size Hq/Hkv, head dim, intervals
  int64_t BM = 0, BN = 0, BMp = 0, BNp = 0, nQ = 0, nK = 0;
  T scale = 0, scale2 = 0;  // softmax scale, scale * log2(e)
  const T* q = nullptr;  // [ntok, Hq, D] contiguous
  const T* k = nullptr;  // [ntok, Hkv, D]
  const T* v = nullptr;
  const int32_t* lo = nullptr;  // [ntok, K]
  const int32_t* hi = nullptr;
  const int32_t *pptr = nullptr, *pidx = nullptr, *fptr = nullptr, *fidx = nullptr;      // tiles by query block
  const int32_t *tpptr = nullptr, *tpidx = nullptr, *tfptr = nullptr, *tfidx = nullptr;  // tiles by key block
  const uint8_t* poisoned = nullptr;  // [Hkv, ntok]: the row sees a non-finite K/V row (nullptr: none anywhere)
  T* out = nullptr;                   // forward: [ntok, Hq, D]
  float* lse = nullptr;               // forward: [Hq, ntok]
  const T* dout = nullptr;            // backward: [ntok, Hq, D] (rows of poisoned (row, head) zeroed)
  const float* lse_in = nullptr;      // backward: [Hq, ntok]
  const T* delta = nullptr;           // backward: [Hq, ntok] rowsum(dO * O)
  T *dq = nullptr, *dk = nullptr, *dv = nullptr;
  T* dqa = nullptr;  // fused backward: dQ accumulator [ntok, Hq, Dq] (== dq when Dq == D)
  int64_t Dq = 0;    // D rounded up to kPad (the fused dQ GEMM then has no column tail)
};

// Scratch sizes (elements) of one task of each kind; the same layout is carved in the body.
inline int64_t fwd_scratch(int64_t D, int64_t BMp, int64_t BNp) { return 2 * D * BMp + BNp * BMp + 4 * BMp; }
inline int64_t dq_scratch(int64_t D, int64_t BMp, int64_t BNp) { return 3 * D * BMp + 2 * BNp * BMp + 2 * BMp; }
inline int64_t dkdv_scratch(int64_t D, int64_t BMp, int64_t BNp, int64_t Dq) {
  return 4 * D * BNp + 2 * BMp * BNp + BNp * Dq;
}

// Generic "vector" of one lane; also the column-tail path of every ISA.
template <class T_>
struct ScalarV {
  using T = T_;
  using reg = T;
  using ireg = int32_t;
  using mask = bool;
  static constexpr int W = 1;
  static constexpr int MR = 4;  // micro-kernel rows
  static constexpr int NV = 4;  // micro-kernel vectors per row
  static MEM1_SA_INLINE reg zero() { return T(0); }
  static MEM1_SA_INLINE reg set1(T x) { return x; }
  static MEM1_SA_INLINE reg load(const T* p) { return *p; }
  static MEM1_SA_INLINE void store(T* p, reg x) { *p = x; }
  static MEM1_SA_INLINE reg add(reg a, reg b) { return a + b; }
  static MEM1_SA_INLINE reg sub(reg a, reg b) { return a - b; }
  static MEM1_SA_INLINE reg mul(reg a, reg b) { return a * b; }
  static MEM1_SA_INLINE reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  static MEM1_SA_INLINE reg max(reg a, reg b) { return a < b ? b : a; }  // NaN in a is kept
  static MEM1_SA_INLINE T hsum(reg a) { return a; }
  static MEM1_SA_INLINE reg exp2(reg x) { return x < T(-126) ? T(0) : std::exp2(x); }  // like the SIMD ones
  static MEM1_SA_INLINE ireg iset1(int32_t x) { return x; }
  static MEM1_SA_INLINE ireg iload(const int32_t* p) { return *p; }
  static MEM1_SA_INLINE ireg iota() { return 0; }
  static MEM1_SA_INLINE ireg iadd(ireg a, ireg b) { return a + b; }
  static MEM1_SA_INLINE mask in_range(ireg c, ireg lo, ireg hi) { return lo <= c && c < hi; }
  static MEM1_SA_INLINE mask mnone() { return false; }
  static MEM1_SA_INLINE mask mor(mask a, mask b) { return a || b; }
  static MEM1_SA_INLINE reg select(mask m, reg t, reg f) { return m ? t : f; }
  static MEM1_SA_INLINE mask is_neg_inf(reg x) { return x == -std::numeric_limits<T>::infinity(); }
  static MEM1_SA_INLINE bool any_nonzero(reg x) { return !(x == T(0)); }  // NaN counts
};

// Entry points of one ISA's compiled body.
template <class T>
struct IsaFns {
  void (*fwd_task)(const Args<T>&, int64_t, T*, int32_t*);
  void (*dq_task)(const Args<T>&, int64_t, T*, int32_t*);
  void (*dkdv_task)(const Args<T>&, int64_t, T*, int32_t*);
  void (*fused_task)(const Args<T>&, int64_t, T*, int32_t*);
  void (*row_dots)(const T*, const T*, int64_t, int64_t, int64_t, int64_t, int64_t, T*);
  void (*scan_rows)(const T*, const T*, int64_t, int64_t, int64_t, uint8_t*);
  const char* name;
};

// ----- generic body (float and double) ---------------------------------------------------------------------------
namespace generic {
using VF = ScalarV<float>;
using VD = ScalarV<double>;
#define MEM1_SA_WITH_DOUBLE 1
#include "state_attention.cpp"
#undef MEM1_SA_WITH_DOUBLE
}  // namespace generic

#if MEM1_SA_X86
#if defined(__clang__)
#define MEM1_SA_TARGET_PUSH_AVX2 _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c\"))), apply_to = function)")
#define MEM1_SA_TARGET_PUSH_AVX512 _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c\"))), apply_to = function)")
#define MEM1_SA_TARGET_POP _Pragma("clang attribute pop")
#else
#define MEM1_SA_TARGET_PUSH_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define MEM1_SA_TARGET_PUSH_AVX512 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c\")")
#define MEM1_SA_TARGET_POP _Pragma("GCC pop_options")
#endif

// ----- AVX2 + FMA body ---------------------------------------------------------------------------------------------
MEM1_SA_TARGET_PUSH_AVX2
namespace avx2 {
struct VF {
  using T = float;
  using reg = __m256;
  using ireg = __m256i;
  using mask = __m256;
  static constexpr int W = 8;
  static constexpr int MR = 6;  // 6 x 2 ymm accumulators + 2 B + 1 broadcast of 16 registers
  static constexpr int NV = 2;
  static MEM1_SA_INLINE reg zero() { return _mm256_setzero_ps(); }
  static MEM1_SA_INLINE reg set1(float x) { return _mm256_set1_ps(x); }
  static MEM1_SA_INLINE reg load(const float* p) { return _mm256_loadu_ps(p); }
  static MEM1_SA_INLINE void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static MEM1_SA_INLINE reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static MEM1_SA_INLINE reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static MEM1_SA_INLINE reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static MEM1_SA_INLINE reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static MEM1_SA_INLINE reg max(reg a, reg b) { return _mm256_max_ps(b, a); }  // NaN in a is kept
  static MEM1_SA_INLINE float hsum(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // 2^x: round-to-nearest split, Cephes exp2f polynomial on [-0.5, 0.5] (rel. error ~1e-7), exponent by bits;
  // x < -126 (and -inf) gives 0, NaN stays NaN.
  static MEM1_SA_INLINE reg exp2(reg x) {
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
  static MEM1_SA_INLINE ireg iset1(int32_t x) { return _mm256_set1_epi32(x); }
  static MEM1_SA_INLINE ireg iload(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static MEM1_SA_INLINE ireg iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static MEM1_SA_INLINE ireg iadd(ireg a, ireg b) { return _mm256_add_epi32(a, b); }
  static MEM1_SA_INLINE mask in_range(ireg c, ireg lo, ireg hi) {
    // lo <= c  <=>  !(lo > c);  c < hi  <=>  hi > c
    const __m256i ge = _mm256_andnot_si256(_mm256_cmpgt_epi32(lo, c), _mm256_cmpgt_epi32(hi, c));
    return _mm256_castsi256_ps(ge);
  }
  static MEM1_SA_INLINE mask mnone() { return _mm256_setzero_ps(); }
  static MEM1_SA_INLINE mask mor(mask a, mask b) { return _mm256_or_ps(a, b); }
  static MEM1_SA_INLINE reg select(mask m, reg t, reg f) { return _mm256_blendv_ps(f, t, m); }
  static MEM1_SA_INLINE mask is_neg_inf(reg x) {
    return _mm256_cmp_ps(x, _mm256_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
  }
  static MEM1_SA_INLINE bool any_nonzero(reg x) {
    return _mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_NEQ_UQ)) != 0;
  }
};
#include "state_attention.cpp"
}  // namespace avx2
MEM1_SA_TARGET_POP

// ----- AVX-512 body -------------------------------------------------------------------------------------------------
MEM1_SA_TARGET_PUSH_AVX512
namespace avx512 {
struct VF {
  using T = float;
  using reg = __m512;
  using ireg = __m512i;
  using mask = __mmask16;
  static constexpr int W = 16;
  static constexpr int MR = 6;  // 6 x 4 zmm accumulators (6 rows x 64 columns) + 4 B + 1 broadcast of 32
  static constexpr int NV = 4;
  static MEM1_SA_INLINE reg zero() { return _mm512_setzero_ps(); }
  static MEM1_SA_INLINE reg set1(float x) { return _mm512_set1_ps(x); }
  static MEM1_SA_INLINE reg load(const float* p) { return _mm512_loadu_ps(p); }
  static MEM1_SA_INLINE void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static MEM1_SA_INLINE reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static MEM1_SA_INLINE reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static MEM1_SA_INLINE reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static MEM1_SA_INLINE reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static MEM1_SA_INLINE reg max(reg a, reg b) { return _mm512_max_ps(b, a); }  // NaN in a is kept
  static MEM1_SA_INLINE float hsum(reg a) {  // (not _mm512_reduce_add_ps: GCC 12 warns inside it)
    alignas(64) float t[16];
    _mm512_store_ps(t, a);
    float s = 0.f;
    for (int i = 0; i < 16; ++i) s += t[i];
    return s;
  }
  // 2^x = p(f) * 2^n (scalef). x < -126 (and -inf) gives exactly 0 -- no denormal probabilities, which would
  // slow the next GEMM down by microcode assists --, NaN stays NaN.
  static MEM1_SA_INLINE reg exp2(reg x) {
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
  static MEM1_SA_INLINE ireg iset1(int32_t x) { return _mm512_set1_epi32(x); }
  static MEM1_SA_INLINE ireg iload(const int32_t* p) { return _mm512_loadu_si512(p); }
  static MEM1_SA_INLINE ireg iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static MEM1_SA_INLINE ireg iadd(ireg a, ireg b) { return _mm512_add_epi32(a, b); }
  static MEM1_SA_INLINE mask in_range(ireg c, ireg lo, ireg hi) {
    return _mm512_cmpge_epi32_mask(c, lo) & _mm512_cmplt_epi32_mask(c, hi);
  }
  static MEM1_SA_INLINE mask mnone() { return 0; }
  static MEM1_SA_INLINE mask mor(mask a, mask b) { return a | b; }
  static MEM1_SA_INLINE reg select(mask m, reg t, reg f) { return _mm512_mask_blend_ps(m, f, t); }
  static MEM1_SA_INLINE mask is_neg_inf(reg x) {
    return _mm512_cmp_ps_mask(x, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
  }
  static MEM1_SA_INLINE bool any_nonzero(reg x) {
    return _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NEQ_UQ) != 0;
  }
};
#include "state_attention.cpp"
}  // namespace avx512
MEM1_SA_TARGET_POP
#endif  // MEM1_SA_X86

// =================================================================================================================
// Host side: checks, ISA choice, conversions, task scheduling, torch ops.
// =================================================================================================================
namespace {

enum Isa : int64_t { kIsaAuto = -1, kIsaGeneric = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };

int64_t best_isa() {
#if MEM1_SA_X86
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

int64_t pick_isa(int64_t requested, const char* op) {
  const int64_t best = best_isa();
  if (requested < 0) return best;
  TORCH_CHECK(requested <= kIsaAvx512, op, ": isa must be -1 (auto), 0 (generic), 1 (avx2) or 2 (avx512), got ",
              requested);
  TORCH_CHECK(requested <= best, op, ": isa=", requested, " is not available on this CPU / torch build (best: ", best,
              ")");
  return requested;
}

IsaFns<float> fns_f32(int64_t isa) {
#if MEM1_SA_X86
  if (isa == kIsaAvx512) return avx512::fns_f32();
  if (isa == kIsaAvx2) return avx2::fns_f32();
#endif
  (void)isa;
  return generic::fns_f32();
}

// Aligned per-thread scratch.
struct Scratch {
  std::unique_ptr<char[]> raw;
  char* base = nullptr;
  void reserve(size_t bytes) {
    raw.reset(new char[bytes + 64]);
    base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw.get()) + 63) & ~uintptr_t(63));
  }
};

// Run fn(task, T* ws, int32_t* iws) for every task in `order` (biggest first) over at::parallel_for threads that
// pull tasks from a shared counter. Each task writes its own outputs only, so the result does not depend on which
// thread ran what.
constexpr int64_t kSerialWork = int64_t(1) << 22;  // multiply-adds below which one thread does everything

template <class T, class Fn>
void run_tasks(const std::vector<int64_t>& order, int64_t work, int64_t ws_elems, int64_t iws_elems, const Fn& fn) {
  const int64_t n = static_cast<int64_t>(order.size());
  if (n == 0) return;
  // Small problems run on the calling thread: waking a team costs more than they do (and much more when the cores
  // are busy with other work).
  const int64_t nthreads = work < kSerialWork ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::atomic<int64_t> next{0};
  const size_t ws_bytes = static_cast<size_t>(round_up(ws_elems, kPad)) * sizeof(T);
  const size_t bytes = ws_bytes + static_cast<size_t>(round_up(iws_elems, kPad)) * sizeof(int32_t);
  auto worker = [&](int64_t, int64_t) {
    Scratch s;
    s.reserve(bytes);
    T* ws = reinterpret_cast<T*>(s.base);
    int32_t* iws = reinterpret_cast<int32_t*>(s.base + ws_bytes);
    for (;;) {
      const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
      if (t >= n) break;
      fn(order[t], ws, iws);
    }
  };
  if (nthreads == 1) {
    worker(0, 1);
  } else {
    at::parallel_for(0, nthreads, 1, worker);
  }
}

// Tasks (block, head) sorted by decreasing cost (number of listed tiles x heads), ties by index: LPT order.
std::vector<int64_t> task_order(const int32_t* pptr, const int32_t* fptr, int64_t nblocks, int64_t heads) {
  std::vector<int64_t> cost(static_cast<size_t>(nblocks));
  for (int64_t b = 0; b < nblocks; ++b) cost[b] = (pptr[b + 1] - pptr[b]) + (fptr[b + 1] - fptr[b]);
  std::vector<int64_t> order;
  order.reserve(static_cast<size_t>(nblocks * heads));
  for (int64_t b = 0; b < nblocks; ++b) {
    if (cost[b] == 0) continue;  // nothing visible: outputs stay at their initial values (0 / -inf)
    for (int64_t h = 0; h < heads; ++h) order.push_back(b * heads + h);
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost[a / heads] > cost[b / heads]; });
  return order;
}

void check_csr(const at::Tensor& ptr, const at::Tensor& idx, int64_t nrows, int64_t ncols, const char* op,
               const char* what) {
  TORCH_CHECK(ptr.scalar_type() == at::kInt && idx.scalar_type() == at::kInt, op, ": ", what,
              " block-map tensors must be int32, got ", ptr.scalar_type(), " and ", idx.scalar_type());
  TORCH_CHECK(ptr.device().is_cpu() && idx.device().is_cpu(), op, ": ", what, " block map must be on the CPU");
  TORCH_CHECK(ptr.dim() == 1 && ptr.numel() == nrows + 1, op, ": ", what, " block-map pointer must be 1-D of size ",
              nrows + 1, ", got shape ", ptr.sizes(), " (block map built for other tile sizes or another T?)");
  TORCH_CHECK(idx.dim() == 1 && ptr.is_contiguous() && idx.is_contiguous(), op, ": ", what,
              " block-map tensors must be contiguous 1-D");
  const int32_t* p = ptr.data_ptr<int32_t>();
  const int32_t* x = idx.data_ptr<int32_t>();
  TORCH_CHECK(p[0] == 0 && p[nrows] == idx.numel(), op, ": ", what, " block-map pointer must run from 0 to ",
              idx.numel(), ", got ", p[0], " .. ", p[nrows]);
  for (int64_t r = 0; r < nrows; ++r) {
    TORCH_CHECK(p[r + 1] >= p[r], op, ": ", what, " block-map pointer decreases at block ", r);
    for (int32_t e = p[r]; e < p[r + 1]; ++e) {
      TORCH_CHECK(x[e] >= 0 && x[e] < ncols && (e == p[r] || x[e] > x[e - 1]), op, ": ", what,
                  " block-map index out of range or not ascending at block ", r, " (value ", x[e], ", limit ", ncols,
                  ")");
    }
  }
}

// The intervals follow the contract (0 <= lo <= hi <= p + 1, sorted, disjoint), and every key block that a row's
// intervals touch is listed (partial or full) for the row's query block: a block map built for other tile sizes or
// another spec is refused instead of silently dropping visible keys. O(T*K + visible/BN).
void check_spec_and_coverage(const char* op, const int32_t* lo, const int32_t* hi, int64_t T, int64_t K, int64_t BM,
                             int64_t BN, const int32_t* pptr, const int32_t* pidx, const int32_t* fptr,
                             const int32_t* fidx) {
  for (int64_t p = 0; p < T; ++p) {
    int64_t bad_k = 0;
    const int32_t err = vis::check_row(lo + p * K, hi + p * K, K, p, &bad_k);
    TORCH_CHECK(err == vis::kRowOk, op, ": invalid interval at row p=", p, ", k=", bad_k, ": [lo=",
                lo[p * K + bad_k], ", hi=", hi[p * K + bad_k],
                ") (need 0 <= lo <= hi <= p + 1, non-empty intervals sorted and disjoint)");
  }
  const int64_t nQ = vis::num_blocks(T, BM), nK = vis::num_blocks(T, BN);
  std::vector<int64_t> mark(static_cast<size_t>(nK), -1);
  const vis::BlockDiv bn(BN);
  for (int64_t qb = 0; qb < nQ; ++qb) {
    for (int32_t e = pptr[qb]; e < pptr[qb + 1]; ++e) mark[pidx[e]] = qb;
    for (int32_t e = fptr[qb]; e < fptr[qb + 1]; ++e) mark[fidx[e]] = qb;
    for (int64_t p = vis::block_begin(qb, BM); p < vis::block_end(qb, BM, T); ++p) {
      for (int64_t k = 0; k < K; ++k) {
        int64_t first, last;
        if (!vis::interval_block_range(lo[p * K + k], hi[p * K + k], bn, &first, &last)) continue;
        for (int64_t kb = first; kb <= last; ++kb) {
          TORCH_CHECK(mark[kb] == qb, op, ": the block map does not list tile (query block ", qb, ", key block ", kb,
                      ") although row ", p, " sees keys in it: it was built for other tile sizes (BM=", BM,
                      ", BN=", BN, " here) or another visibility spec");
        }
      }
    }
  }
}

// CSR transpose (tiles by key block, query blocks ascending): counting sort, O(nrows + ncols + nnz).
void csr_transpose(const int32_t* ptr, const int32_t* idx, int64_t nrows, int64_t ncols, std::vector<int32_t>& tptr,
                   std::vector<int32_t>& tidx) {
  const int64_t nnz = ptr[nrows];
  tptr.assign(static_cast<size_t>(ncols + 1), 0);
  tidx.resize(static_cast<size_t>(nnz));
  for (int64_t e = 0; e < nnz; ++e) ++tptr[idx[e] + 1];
  for (int64_t c = 0; c < ncols; ++c) tptr[c + 1] += tptr[c];
  std::vector<int32_t> fill(tptr.begin(), tptr.end() - 1);
  for (int64_t r = 0; r < nrows; ++r) {
    for (int32_t e = ptr[r]; e < ptr[r + 1]; ++e) tidx[fill[idx[e]]++] = static_cast<int32_t>(r);
  }
}

struct Inputs {
  int64_t T = 0, Hq = 0, Hkv = 0, D = 0, K = 0;
  at::ScalarType in_dtype = at::kFloat, comp_dtype = at::kFloat;
};

Inputs check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& lo, const at::Tensor& hi, double scale, int64_t BM, int64_t BN) {
  TORCH_CHECK(q.defined() && k.defined() && v.defined(), op, ": q, k, v must be defined");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op,
              ": the CPU kernel needs CPU tensors, got q on ", q.device(), ", k on ", k.device(), ", v on ",
              v.device());
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op, ": q, k, v must be [T, H, D], got shapes ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op, ": q, k, v must share a dtype, got ", dt, ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": q, k, v must be float32, float16, bfloat16 or float64, got ", dt);
  Inputs in;
  in.T = q.size(0);
  in.Hq = q.size(1);
  in.D = q.size(2);
  in.Hkv = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == in.T && k.size(2) == in.D, op, ": k and v must be [T=", in.T, ", Hkv, D=", in.D,
              "], got ", k.sizes());
  TORCH_CHECK(in.Hq > 0 && in.Hkv > 0 && in.D > 0, op, ": heads and head dim must be > 0, got q ", q.sizes(),
              ", k ", k.sizes());
  TORCH_CHECK(in.Hq % in.Hkv == 0, op, ": query heads (", in.Hq, ") must be a multiple of key/value heads (", in.Hkv,
              ")");
  TORCH_CHECK(lo.scalar_type() == at::kInt && hi.scalar_type() == at::kInt, op, ": lo and hi must be int32, got ",
              lo.scalar_type(), " and ", hi.scalar_type());
  TORCH_CHECK(lo.device().is_cpu() && hi.device().is_cpu(), op, ": lo and hi must be CPU tensors");
  TORCH_CHECK(lo.dim() == 2 && lo.sizes() == hi.sizes() && lo.size(0) == in.T, op,
              ": lo and hi must both be [T=", in.T, ", K], got ", lo.sizes(), " and ", hi.sizes());
  in.K = lo.size(1);
  TORCH_CHECK(BM > 0 && BN > 0 && BM <= 1024 && BN <= 1024, op, ": tile sizes must be in [1, 1024], got BM=", BM,
              ", BN=", BN);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(in.T < std::numeric_limits<int32_t>::max(), op, ": T=", in.T, " does not fit int32 indices");
  in.in_dtype = dt;
  in.comp_dtype = dt == at::kDouble ? at::kDouble : at::kFloat;
  return in;
}

// fp32 (or fp64) contiguous view of x; `own` forces a private copy (to be written in place).
at::Tensor compute_copy(const at::Tensor& x, at::ScalarType dt, bool own) {
  at::Tensor y = x.to(dt).contiguous();
  if (own && (y.data_ptr() == x.data_ptr() || !y.is_contiguous())) y = y.clone(at::MemoryFormat::Contiguous);
  return y;
}

// Rows (token, kv head) of K or V holding a non-finite value -> bad[t*Hkv + h] = 1. Returns whether any.
template <class T>
bool scan_bad_rows(const IsaFns<T>& f, const T* k, const T* v, int64_t rows, int64_t D, std::vector<uint8_t>& bad) {
  bad.assign(static_cast<size_t>(rows), 0);
  at::parallel_for(0, rows, 2048, [&](int64_t b, int64_t e) { f.scan_rows(k, v, b, e, D, bad.data()); });
  return std::any_of(bad.begin(), bad.end(), [](uint8_t x) { return x != 0; });
}

// Zero every non-finite value of the (private) copies k, v; flag (kv head, row) pairs whose visible keys include a
// bad K/V row: poisoned[h*T + p].
template <class T>
std::vector<uint8_t> sanitize_and_poison(T* k, T* v, const std::vector<uint8_t>& bad, const int32_t* lo,
                                         const int32_t* hi, int64_t T_, int64_t Hkv, int64_t D, int64_t K) {
  for (int64_t r = 0; r < T_ * Hkv; ++r) {
    if (!bad[r]) continue;
    for (int64_t d = 0; d < D; ++d) {
      if (!std::isfinite(k[r * D + d])) k[r * D + d] = T(0);
      if (!std::isfinite(v[r * D + d])) v[r * D + d] = T(0);
    }
  }
  std::vector<uint8_t> poisoned(static_cast<size_t>(Hkv * T_), 0);
  std::vector<int64_t> cnt(static_cast<size_t>(T_ + 1));
  for (int64_t h = 0; h < Hkv; ++h) {
    cnt[0] = 0;
    for (int64_t c = 0; c < T_; ++c) cnt[c + 1] = cnt[c] + bad[c * Hkv + h];
    if (cnt[T_] == 0) continue;
    for (int64_t p = 0; p < T_; ++p) {
      int64_t n = 0;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t l = std::clamp<int64_t>(lo[p * K + j], 0, T_);
        const int64_t u = std::clamp<int64_t>(hi[p * K + j], 0, T_);
        if (u > l) n += cnt[u] - cnt[l];
      }
      poisoned[h * T_ + p] = n > 0;
    }
  }
  return poisoned;
}

template <class T>
void fill_args_common(Args<T>& a, const Inputs& in, double scale, int64_t BM, int64_t BN, const at::Tensor& q,
                      const at::Tensor& k, const at::Tensor& v, const at::Tensor& lo, const at::Tensor& hi) {
  a.ntok = in.T;
  a.Hq = in.Hq;
  a.Hkv = in.Hkv;
  a.G = in.Hq / in.Hkv;
  a.D = in.D;
  a.K = in.K;
  a.BM = BM;
  a.BN = BN;
  a.BMp = round_up(BM, kPad);
  a.BNp = round_up(BN, kPad);
  a.nQ = vis::num_blocks(in.T, BM);
  a.nK = vis::num_blocks(in.T, BN);
  a.scale = static_cast<T>(scale);
  a.scale2 = static_cast<T>(scale * kLog2e);
  a.q = q.data_ptr<T>();
  a.k = k.data_ptr<T>();
  a.v = v.data_ptr<T>();
  a.lo = lo.data_ptr<int32_t>();
  a.hi = hi.data_ptr<int32_t>();
}

// Multiply-adds of `gemms` tile GEMMs over every listed tile and query head.
template <class T>
int64_t work_estimate(const Args<T>& a, int64_t gemms) {
  const int64_t tiles = (a.pptr[a.nQ] + a.fptr[a.nQ]);
  return tiles * a.Hq * a.BM * a.BN * a.D * gemms;
}

template <class T>
void forward_impl(const IsaFns<T>& f, const Inputs& in, const at::Tensor& q_in, const at::Tensor& k_in,
                  const at::Tensor& v_in, const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& pptr,
                  const at::Tensor& pidx, const at::Tensor& fptr, const at::Tensor& fidx, double scale, int64_t BM,
                  int64_t BN, at::Tensor& out, at::Tensor& lse) {
  const auto dt = in.comp_dtype;
  at::Tensor q = compute_copy(q_in, dt, false);
  at::Tensor k = compute_copy(k_in, dt, false);
  at::Tensor v = compute_copy(v_in, dt, false);
  std::vector<uint8_t> bad, poisoned;
  if (scan_bad_rows<T>(f, k.data_ptr<T>(), v.data_ptr<T>(), in.T * in.Hkv, in.D, bad)) {
    k = compute_copy(k_in, dt, true);
    v = compute_copy(v_in, dt, true);
    poisoned = sanitize_and_poison<T>(k.data_ptr<T>(), v.data_ptr<T>(), bad, lo.data_ptr<int32_t>(),
                                      hi.data_ptr<int32_t>(), in.T, in.Hkv, in.D, in.K);
  }
  Args<T> a;
  fill_args_common(a, in, scale, BM, BN, q, k, v, lo, hi);
  a.pptr = pptr.data_ptr<int32_t>();
  a.pidx = pidx.data_ptr<int32_t>();
  a.fptr = fptr.data_ptr<int32_t>();
  a.fidx = fidx.data_ptr<int32_t>();
  a.poisoned = poisoned.empty() ? nullptr : poisoned.data();
  out = at::zeros({in.T, in.Hq, in.D}, q.options());
  lse = at::empty({in.Hq, in.T}, q.options().dtype(at::kFloat));
  lse.fill_(-std::numeric_limits<float>::infinity());
  a.out = out.data_ptr<T>();
  a.lse = lse.data_ptr<float>();
  const std::vector<int64_t> order = task_order(a.pptr, a.fptr, a.nQ, a.Hq);
  run_tasks<T>(order, work_estimate(a, 2), fwd_scratch(a.D, a.BMp, a.BNp), 2 * a.K * a.BMp,
               [&](int64_t t, T* ws, int32_t* iws) { f.fwd_task(a, t, ws, iws); });
  if (!poisoned.empty()) {  // rows that see a non-finite K/V value: NaN output (the definition)
    T* o = out.data_ptr<T>();
    for (int64_t p = 0; p < in.T; ++p) {
      for (int64_t h = 0; h < in.Hq; ++h) {
        if (poisoned[(h / a.G) * in.T + p]) {
          std::fill(o + (p * in.Hq + h) * in.D, o + (p * in.Hq + h + 1) * in.D, std::numeric_limits<T>::quiet_NaN());
        }
      }
    }
  }
}

template <class T>
void backward_impl(const IsaFns<T>& f, const Inputs& in, const at::Tensor& dout_in, const at::Tensor& q_in,
                   const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
                   const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& pptr, const at::Tensor& pidx,
                   const at::Tensor& fptr, const at::Tensor& fidx, double scale, int64_t BM, int64_t BN,
                   int64_t schedule, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const auto dt = in.comp_dtype;
  at::Tensor q = compute_copy(q_in, dt, false);
  at::Tensor k = compute_copy(k_in, dt, false);
  at::Tensor v = compute_copy(v_in, dt, false);
  at::Tensor dout = compute_copy(dout_in, dt, false);
  at::Tensor o = compute_copy(out_in, dt, false);
  at::Tensor lse = lse_in.contiguous();
  std::vector<uint8_t> bad, poisoned;
  if (scan_bad_rows<T>(f, k.data_ptr<T>(), v.data_ptr<T>(), in.T * in.Hkv, in.D, bad)) {
    k = compute_copy(k_in, dt, true);
    v = compute_copy(v_in, dt, true);
    poisoned = sanitize_and_poison<T>(k.data_ptr<T>(), v.data_ptr<T>(), bad, lo.data_ptr<int32_t>(),
                                      hi.data_ptr<int32_t>(), in.T, in.Hkv, in.D, in.K);
    dout = compute_copy(dout_in, dt, true);  // poisoned rows contribute nothing: dO := 0 there
    T* g = dout.data_ptr<T>();
    const int64_t G = in.Hq / in.Hkv;
    for (int64_t p = 0; p < in.T; ++p) {
      for (int64_t h = 0; h < in.Hq; ++h) {
        if (poisoned[(h / G) * in.T + p]) std::fill(g + (p * in.Hq + h) * in.D, g + (p * in.Hq + h + 1) * in.D, T(0));
      }
    }
  }
  // Delta[h, p] = sum_d dO * O (0 for poisoned rows, whose O is NaN and dO is 0)
  at::Tensor delta = at::empty({in.Hq, in.T}, q.options());
  {
    const T* g = dout.data_ptr<T>();
    const T* oo = o.data_ptr<T>();
    T* dl = delta.data_ptr<T>();
    at::parallel_for(0, in.T, 256, [&](int64_t b, int64_t e) { f.row_dots(g, oo, b, e, in.Hq, in.D, in.T, dl); });
    if (!poisoned.empty()) {
      const int64_t G = in.Hq / in.Hkv;
      for (int64_t h = 0; h < in.Hq; ++h) {
        for (int64_t p = 0; p < in.T; ++p) {
          if (poisoned[(h / G) * in.T + p]) dl[h * in.T + p] = T(0);
        }
      }
    }
  }
  Args<T> a;
  fill_args_common(a, in, scale, BM, BN, q, k, v, lo, hi);
  a.pptr = pptr.data_ptr<int32_t>();
  a.pidx = pidx.data_ptr<int32_t>();
  a.fptr = fptr.data_ptr<int32_t>();
  a.fidx = fidx.data_ptr<int32_t>();
  std::vector<int32_t> tpptr, tpidx, tfptr, tfidx;  // the map by key block, for the dK/dV pass
  csr_transpose(a.pptr, a.pidx, a.nQ, a.nK, tpptr, tpidx);
  csr_transpose(a.fptr, a.fidx, a.nQ, a.nK, tfptr, tfidx);
  a.tpptr = tpptr.data();
  a.tpidx = tpidx.data();
  a.tfptr = tfptr.data();
  a.tfidx = tfidx.data();
  a.poisoned = poisoned.empty() ? nullptr : poisoned.data();
  a.dout = dout.data_ptr<T>();
  a.lse_in = lse.data_ptr<float>();
  a.delta = delta.data_ptr<T>();
  dq = at::zeros({in.T, in.Hq, in.D}, q.options());
  dk = at::zeros({in.T, in.Hkv, in.D}, q.options());
  dv = at::zeros({in.T, in.Hkv, in.D}, q.options());
  a.dq = dq.data_ptr<T>();
  a.dk = dk.data_ptr<T>();
  a.dv = dv.data_ptr<T>();
  a.Dq = round_up(a.D, kPad);
  const int64_t ws_dkdv = dkdv_scratch(a.D, a.BMp, a.BNp, a.Dq);
  // Fused (one task per kv head, 5 GEMMs per tile) when the kv heads spread evenly over the threads; else two
  // passes (dQ by (query block, head), then dK/dV by (key block, kv head): 7 GEMMs per tile, all threads busy).
  // Both give bit-identical gradients (test_state_attention_cpp.py checks it).
  const int64_t threads = work_estimate(a, 5) < kSerialWork ? 1 : std::max<int64_t>(1, at::get_num_threads());
  const bool fused = schedule == 1 || (schedule < 0 && (a.Hkv % threads == 0 || a.Hkv >= 4 * threads));
  if (fused) {
    at::Tensor dqa = a.Dq == a.D ? dq : at::zeros({in.T, in.Hq, a.Dq}, q.options());
    a.dqa = dqa.data_ptr<T>();
    std::vector<int64_t> heads(static_cast<size_t>(a.Hkv));
    for (int64_t h = 0; h < a.Hkv; ++h) heads[h] = h;
    run_tasks<T>(heads, work_estimate(a, 5), ws_dkdv, 0,
                 [&](int64_t t, T* ws, int32_t* iws) { f.fused_task(a, t, ws, iws); });
    return;
  }
  const std::vector<int64_t> qorder = task_order(a.pptr, a.fptr, a.nQ, a.Hq);
  run_tasks<T>(qorder, work_estimate(a, 3), dq_scratch(a.D, a.BMp, a.BNp), 2 * a.K * a.BMp,
               [&](int64_t t, T* ws, int32_t* iws) { f.dq_task(a, t, ws, iws); });
  const std::vector<int64_t> korder = task_order(a.tpptr, a.tfptr, a.nK, a.Hkv);
  run_tasks<T>(korder, work_estimate(a, 4), ws_dkdv, 0,
               [&](int64_t t, T* ws, int32_t* iws) { f.dkdv_task(a, t, ws, iws); });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> state_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& lo_in,
                                                           const at::Tensor& hi_in, const at::Tensor& pptr,
                                                           const at::Tensor& pidx, const at::Tensor& fptr,
                                                           const at::Tensor& fidx, double scale, int64_t BM,
                                                           int64_t BN, int64_t isa) {
  const char* op = "mem1_fast::state_attention_fwd";
  const Inputs in = check_inputs(op, q, k, v, lo_in, hi_in, scale, BM, BN);
  const at::Tensor lo = lo_in.contiguous(), hi = hi_in.contiguous();
  const int64_t nQ = vis::num_blocks(in.T, BM), nK = vis::num_blocks(in.T, BN);
  check_csr(pptr, pidx, nQ, nK, op, "partial");
  check_csr(fptr, fidx, nQ, nK, op, "full");
  check_spec_and_coverage(op, lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>(), in.T, in.K, BM, BN,
                          pptr.data_ptr<int32_t>(), pidx.data_ptr<int32_t>(), fptr.data_ptr<int32_t>(),
                          fidx.data_ptr<int32_t>());
  const int64_t chosen = pick_isa(isa, op);
  at::Tensor out, lse;
  if (in.comp_dtype == at::kDouble) {
    forward_impl<double>(generic::fns_f64(), in, q, k, v, lo, hi, pptr, pidx, fptr, fidx, scale, BM, BN, out, lse);
  } else {
    forward_impl<float>(fns_f32(chosen), in, q, k, v, lo, hi, pptr, pidx, fptr, fidx, scale, BM, BN, out, lse);
  }
  if (out.scalar_type() != in.in_dtype) out = out.to(in.in_dtype);
  return std::make_tuple(out, lse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> state_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& lo_in, const at::Tensor& hi_in, const at::Tensor& pptr,
    const at::Tensor& pidx, const at::Tensor& fptr, const at::Tensor& fidx, double scale, int64_t BM, int64_t BN,
    bool deterministic, int64_t isa, int64_t schedule) {
  (void)deterministic;  // the schedule is deterministic by construction (see the file comment)
  const char* op = "mem1_fast::state_attention_bwd";
  const Inputs in = check_inputs(op, q, k, v, lo_in, hi_in, scale, BM, BN);
  TORCH_CHECK(dout.defined() && dout.device().is_cpu() && dout.sizes() == q.sizes(), op,
              ": dout must be a CPU tensor shaped like q ", q.sizes(), ", got ", dout.sizes());
  TORCH_CHECK(out.defined() && out.device().is_cpu() && out.sizes() == q.sizes(), op,
              ": out must be a CPU tensor shaped like q ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(dout.is_floating_point() && out.is_floating_point(), op, ": dout and out must be floating point");
  TORCH_CHECK(lse.defined() && lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.dim() == 2 &&
                  lse.size(0) == in.Hq && lse.size(1) == in.T,
              op, ": lse must be float32 [Hq=", in.Hq, ", T=", in.T, "], got ", lse.scalar_type(), " ", lse.sizes());
  const at::Tensor lo = lo_in.contiguous(), hi = hi_in.contiguous();
  const int64_t nQ = vis::num_blocks(in.T, BM), nK = vis::num_blocks(in.T, BN);
  check_csr(pptr, pidx, nQ, nK, op, "partial");
  check_csr(fptr, fidx, nQ, nK, op, "full");
  check_spec_and_coverage(op, lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>(), in.T, in.K, BM, BN,
                          pptr.data_ptr<int32_t>(), pidx.data_ptr<int32_t>(), fptr.data_ptr<int32_t>(),
                          fidx.data_ptr<int32_t>());
  TORCH_CHECK(schedule >= -1 && schedule <= 1, op, ": schedule must be -1 (auto), 0 (two-pass) or 1 (fused), got ",
              schedule);
  const int64_t chosen = pick_isa(isa, op);
  at::Tensor dq, dk, dv;
  if (in.comp_dtype == at::kDouble) {
    backward_impl<double>(generic::fns_f64(), in, dout, q, k, v, out, lse, lo, hi, pptr, pidx, fptr, fidx, scale, BM,
                          BN, schedule, dq, dk, dv);
  } else {
    backward_impl<float>(fns_f32(chosen), in, dout, q, k, v, out, lse, lo, hi, pptr, pidx, fptr, fidx, scale, BM, BN,
                         schedule, dq, dk, dv);
  }
  if (dq.scalar_type() != in.in_dtype) {
    dq = dq.to(in.in_dtype);
    dk = dk.to(in.in_dtype);
    dv = dv.to(in.in_dtype);
  }
  return std::make_tuple(dq, dk, dv);
}

// Name of the kernel body an `isa` request resolves to ("avx512", "avx2", "generic"); for tests and benchmarks.
std::string state_attention_cpu_isa(const at::Tensor& probe, int64_t isa) {
  const char* op = "mem1_fast::state_attention_cpu_isa";
  if (probe.scalar_type() == at::kDouble) return "generic";
  return fns_f32(pick_isa(isa, op)).name;
}

// The schemas live in csrc/bindings.cpp (the single TORCH_LIBRARY(mem1_fast, m) of the extension).
TORCH_LIBRARY_IMPL(mem1_fast, CPU, m) {
  m.impl("state_attention_fwd", &state_attention_fwd_cpu);
  m.impl("state_attention_bwd", &state_attention_bwd_cpu);
  m.impl("state_attention_cpu_isa", &state_attention_cpu_isa);
}

}  // namespace sa
}  // namespace mem1_fast

#else  // MEM1_SA_BODY ------------------------------------------------------------------------------------------------
// Kernel body, included once per ISA inside namespace mem1_fast::sa::<isa> with VF (float vector ops; VD too for
// the generic one) defined. No torch, no lambdas, no std containers here: only plain code on raw pointers.

template <class V>
struct Kern {
  using T = typename V::T;
  using reg = typename V::reg;
  static constexpr int W = V::W;
  using MkFn = void (*)(int64_t, const T*, int64_t, int64_t, const T*, int64_t, T*, int64_t, bool);

  // C[MR, NV*W] (+)= sum_k A[r*ars + k*acs] * B[k*ldb + c]: accumulators in registers, A broadcast, B rows loaded.
  template <int MR, int NV>
  static void mk(int64_t K, const T* A, int64_t ars, int64_t acs, const T* B, int64_t ldb, T* C, int64_t ldc,
                 bool accumulate) {
    reg c[MR][NV];
    if (accumulate) {
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NV; ++j) c[r][j] = V::load(C + r * ldc + j * W);
    } else {
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NV; ++j) c[r][j] = V::zero();
    }
    const T* a[MR];
    for (int r = 0; r < MR; ++r) a[r] = A + r * ars;
    for (int64_t k = 0; k < K; ++k) {
      reg b[NV];
      for (int j = 0; j < NV; ++j) b[j] = V::load(B + j * W);
      for (int r = 0; r < MR; ++r) {
        const reg x = V::set1(*a[r]);
        for (int j = 0; j < NV; ++j) c[r][j] = V::fmadd(x, b[j], c[r][j]);
        a[r] += acs;
      }
      B += ldb;
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NV; ++j) V::store(C + r * ldc + j * W, c[r][j]);
  }

  template <int MR>
  static MkFn pick_nv(int nv) {
    switch (nv) {
      case 1: return &mk<MR, 1>;
      case 2: return (V::NV >= 2) ? &mk<MR, (V::NV >= 2 ? 2 : 1)> : nullptr;
      case 3: return (V::NV >= 3) ? &mk<MR, (V::NV >= 3 ? 3 : 1)> : nullptr;
      default: return &mk<MR, V::NV>;
    }
  }
  static MkFn pick(int mr, int nv) {
    switch (mr) {
      case 1: return pick_nv<1>(nv);
      case 2: return pick_nv<(V::MR >= 2 ? 2 : 1)>(nv);
      case 3: return pick_nv<(V::MR >= 3 ? 3 : 1)>(nv);
      case 4: return pick_nv<(V::MR >= 4 ? 4 : 1)>(nv);
      case 5: return pick_nv<(V::MR >= 5 ? 5 : 1)>(nv);
      default: return pick_nv<V::MR>(nv);
    }
  }

  // C[M, N] (+)= A[M, K] B[K, N] (A at strides (ars, acs), B rows contiguous at stride ldb, C at stride ldc).
  static void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t ars, int64_t acs, const T* B, int64_t ldb,
                   T* C, int64_t ldc, bool accumulate) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
      if (!accumulate)
        for (int64_t r = 0; r < M; ++r)
          for (int64_t j = 0; j < N; ++j) C[r * ldc + j] = T(0);
      return;
    }
    const int64_t nvec = N / W;
    for (int64_t j0 = 0; j0 < nvec; j0 += V::NV) {
      const int nv = static_cast<int>(std::min<int64_t>(V::NV, nvec - j0));
      for (int64_t m0 = 0; m0 < M; m0 += V::MR) {
        const int mr = static_cast<int>(std::min<int64_t>(V::MR, M - m0));
        pick(mr, nv)(K, A + m0 * ars, ars, acs, B + j0 * W, ldb, C + m0 * ldc + j0 * W, ldc, accumulate);
      }
    }
    if (W > 1 && nvec * W < N) {  // column tail, one lane at a time
      const int64_t n0 = nvec * W;
      Kern<ScalarV<T>>::gemm(M, N - n0, K, A, ars, acs, B + n0, ldb, C + n0, ldc, accumulate);
    }
  }

  // Tiles of block b: partial and full lists merged in ascending order.
  struct Tiles {
    const int32_t *pidx, *fidx;
    int32_t a, ae, c, ce;
    Tiles(const int32_t* pptr, const int32_t* pidx_, const int32_t* fptr, const int32_t* fidx_, int64_t b)
        : pidx(pidx_), fidx(fidx_), a(pptr[b]), ae(pptr[b + 1]), c(fptr[b]), ce(fptr[b + 1]) {}
    bool next(int64_t* blk, bool* partial) {
      if (a < ae && (c >= ce || pidx[a] < fidx[c])) {
        *blk = pidx[a++];
        *partial = true;
        return true;
      }
      if (c < ce) {
        *blk = fidx[c++];
        *partial = false;
        return true;
      }
      return false;
    }
  };

  static MEM1_SA_INLINE T neg_inf() { return -std::numeric_limits<T>::infinity(); }

  // Ask for rows [0, n) (stride rs elements, D each) to be brought into L2 while the current tile computes.
  static MEM1_SA_INLINE void prefetch_rows(const T* X, int64_t rs, int64_t n, int64_t D) {
    constexpr int64_t line = 64 / sizeof(T);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < D; d += line) __builtin_prefetch(X + j * rs + d, 0, 2);
  }

  // Pack X[i, :] (rows i < m at stride rs) transposed into Xt[d * ld + i]; lanes m .. ld are zero.
  static void pack_t(const T* X, int64_t rs, int64_t m, int64_t D, T* Xt, int64_t ld) {
    for (int64_t d = 0; d < D; ++d) {
      T* dst = Xt + d * ld;
      for (int64_t i = m; i < ld; ++i) dst[i] = T(0);
    }
    for (int64_t i = 0; i < m; ++i) {
      const T* src = X + i * rs;
      for (int64_t d = 0; d < D; ++d) Xt[d * ld + i] = src[d];
    }
  }

  // Per-lane intervals of query rows r0 .. r0+m (lanes m .. BMp: empty), as lot[k * BMp + i], hit[...].
  static void pack_intervals(const Args<T>& a, int64_t r0, int64_t m, int32_t* lot, int32_t* hit) {
    for (int64_t k = 0; k < a.K; ++k) {
      for (int64_t i = 0; i < a.BMp; ++i) {
        const bool in = i < m;
        lot[k * a.BMp + i] = in ? a.lo[(r0 + i) * a.K + k] : 0;
        hit[k * a.BMp + i] = in ? a.hi[(r0 + i) * a.K + k] : 0;
      }
    }
  }

  // Scores are computed unscaled (q . k, the same sums in every pass, so the passes agree bit for bit) and scaled
  // to base 2 here, right after the GEMM; masked entries become -inf after scaling, whatever the sign of the scale.
  // ST[j * BMp + i]: key c0 + j (rows j < n), query lane i.
  static void scale_mask_keys_by_lanes(const Args<T>& a, T* ST, int64_t n, int64_t c0, const int32_t* lot,
                                       const int32_t* hit, bool partial) {
    const int64_t BMp = a.BMp;
    const reg sc = V::set1(a.scale2);
    const reg ninf = V::set1(neg_inf());
    for (int64_t j = 0; j < n; ++j) {
      T* row = ST + j * BMp;
      if (!partial) {
        for (int64_t i = 0; i < BMp; i += W) V::store(row + i, V::mul(V::load(row + i), sc));
        continue;
      }
      const typename V::ireg c = V::iset1(static_cast<int32_t>(c0 + j));
      for (int64_t i = 0; i < BMp; i += W) {
        typename V::mask vis = V::mnone();
        for (int64_t k = 0; k < a.K; ++k) {
          vis = V::mor(vis, V::in_range(c, V::iload(lot + k * BMp + i), V::iload(hit + k * BMp + i)));
        }
        V::store(row + i, V::select(vis, V::mul(V::load(row + i), sc), ninf));
      }
    }
  }

  // S[i * BNp + j]: query r0 + i (rows i < m), key lane j = c0 + j (lanes past the last key, c0 + j >= T, are never
  // visible since hi <= T).
  static void scale_mask_lanes_by_queries(const Args<T>& a, T* S, int64_t m, int64_t r0, int64_t c0, bool masked) {
    const int64_t BNp = a.BNp;
    const reg sc = V::set1(a.scale2);
    const reg ninf = V::set1(neg_inf());
    for (int64_t i = 0; i < m; ++i) {
      T* row = S + i * BNp;
      if (!masked) {
        for (int64_t j = 0; j < BNp; j += W) V::store(row + j, V::mul(V::load(row + j), sc));
        continue;
      }
      const int32_t* lo = a.lo + (r0 + i) * a.K;
      const int32_t* hi = a.hi + (r0 + i) * a.K;
      for (int64_t j = 0; j < BNp; j += W) {
        const typename V::ireg c = V::iadd(V::iset1(static_cast<int32_t>(c0 + j)), V::iota());
        typename V::mask vis = V::mnone();
        for (int64_t k = 0; k < a.K; ++k) vis = V::mor(vis, V::in_range(c, V::iset1(lo[k]), V::iset1(hi[k])));
        V::store(row + j, V::select(vis, V::mul(V::load(row + j), sc), ninf));
      }
    }
  }

  // lse in base 2 for P = 2^(S2 - lse2); rows with no visible key (lse = -inf) get +inf so that P = 0.
  static MEM1_SA_INLINE T lse2_of(float lse) {
    return lse == -std::numeric_limits<float>::infinity() ? std::numeric_limits<T>::infinity()
                                                           : static_cast<T>(lse) * static_cast<T>(kLog2e);
  }

  // ---------------------------------------------------------------------------------------------------------------
  static void fwd_task(const Args<T>& a, int64_t task, T* ws, int32_t* iws) {
    const int64_t qb = task / a.Hq, h = task % a.Hq, hk = h / a.G;
    const int64_t D = a.D, BMp = a.BMp, BNp = a.BNp;
    const int64_t r0 = qb * a.BM, m = std::min(a.BM, a.ntok - r0);
    const int64_t krs = a.Hkv * D;  // token stride of K / V
    T* Qt = ws;                     // [D, BMp]
    T* ST = Qt + D * BMp;           // [BNp, BMp] scores, then probabilities
    T* Ot = ST + BNp * BMp;         // [D, BMp] output accumulator, transposed
    T* mx = Ot + D * BMp;           // [BMp] running max (base 2)
    T* l = mx + BMp;                // [BMp] running sum
    T* alpha = l + BMp;             // [BMp]
    int32_t* lot = iws;
    int32_t* hit = iws + a.K * BMp;

    pack_t(a.q + (r0 * a.Hq + h) * D, a.Hq * D, m, D, Qt, BMp);
    pack_intervals(a, r0, m, lot, hit);
    for (int64_t i = 0; i < BMp; ++i) {
      mx[i] = neg_inf();
      l[i] = T(0);
    }
    for (int64_t i = 0; i < D * BMp; ++i) Ot[i] = T(0);

    Tiles tiles(a.pptr, a.pidx, a.fptr, a.fidx, qb);
    int64_t kb, kb_next;
    bool partial, partial_next;
    bool more = tiles.next(&kb_next, &partial_next);
    while (more) {
      kb = kb_next;
      partial = partial_next;
      more = tiles.next(&kb_next, &partial_next);
      const int64_t c0 = kb * a.BN, n = std::min(a.BN, a.ntok - c0);
      const T* Kb = a.k + (c0 * a.Hkv + hk) * D;
      const T* Vb = a.v + (c0 * a.Hkv + hk) * D;
      const int64_t c1 = more ? kb_next * a.BN : 0, n1 = more ? std::min(a.BN, a.ntok - c1) : 0;
      prefetch_rows(a.k + (c1 * a.Hkv + hk) * D, krs, n1, D);  // next tile's K and V into L2
      gemm(n, BMp, D, Kb, krs, 1, Qt, BMp, ST, BMp, false);     // S^T = K . Q^T  [n, BMp]
      prefetch_rows(a.v + (c1 * a.Hkv + hk) * D, krs, n1, D);
      scale_mask_keys_by_lanes(a, ST, n, c0, lot, hit, partial);
      bool rescale = false;
      for (int64_t i = 0; i < BMp; i += W) {
        reg tm = V::set1(neg_inf());
        for (int64_t j = 0; j < n; ++j) tm = V::max(V::load(ST + j * BMp + i), tm);
        const reg mo = V::load(mx + i);
        const reg mn = V::max(tm, mo);
        const reg base = V::select(V::is_neg_inf(mn), V::zero(), mn);
        const reg al = V::exp2(V::sub(mo, base));
        reg sum = V::zero();
        for (int64_t j = 0; j < n; ++j) {
          const reg p = V::exp2(V::sub(V::load(ST + j * BMp + i), base));
          V::store(ST + j * BMp + i, p);
          sum = V::add(sum, p);
        }
        V::store(mx + i, mn);
        V::store(l + i, V::fmadd(V::load(l + i), al, sum));
        V::store(alpha + i, al);
        rescale = rescale || V::any_nonzero(V::sub(al, V::set1(T(1))));
      }
      if (rescale) {  // Ot[d, i] *= alpha[i]
        for (int64_t d = 0; d < D; ++d) {
          T* row = Ot + d * BMp;
          for (int64_t i = 0; i < BMp; i += W) V::store(row + i, V::mul(V::load(row + i), V::load(alpha + i)));
        }
      }
      gemm(D, BMp, n, Vb, 1, krs, ST, BMp, Ot, BMp, true);  // O^T += V^T . P^T
    }
    for (int64_t i = 0; i < m; ++i) {
      T* dst = a.out + ((r0 + i) * a.Hq + h) * D;
      const T li = l[i];
      if (li > T(0)) {
        const T inv = T(1) / li;
        for (int64_t d = 0; d < D; ++d) dst[d] = Ot[d * BMp + i] * inv;
        a.lse[h * a.ntok + r0 + i] = static_cast<float>((mx[i] + std::log2(li)) * static_cast<T>(kLn2));
      } else if (!(li == T(0))) {  // NaN (from NaN in q): propagate
        for (int64_t d = 0; d < D; ++d) dst[d] = std::numeric_limits<T>::quiet_NaN();
        a.lse[h * a.ntok + r0 + i] = std::numeric_limits<float>::quiet_NaN();
      }  // else no visible key: out stays 0, lse stays -inf
    }
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Two-pass backward, pass 1: dQ for one (query block, head).
  static void dq_task(const Args<T>& a, int64_t task, T* ws, int32_t* iws) {
    const int64_t qb = task / a.Hq, h = task % a.Hq, hk = h / a.G;
    const int64_t D = a.D, BMp = a.BMp, BNp = a.BNp;
    const int64_t r0 = qb * a.BM, m = std::min(a.BM, a.ntok - r0);
    const int64_t krs = a.Hkv * D;
    T* Qt = ws;                // [D, BMp]
    T* dOt = Qt + D * BMp;     // [D, BMp]
    T* PT = dOt + D * BMp;     // [BNp, BMp]
    T* dPT = PT + BNp * BMp;   // [BNp, BMp], then dS^T
    T* dQt = dPT + BNp * BMp;  // [D, BMp] dQ accumulator, transposed
    T* l2 = dQt + D * BMp;     // [BMp] lse in base 2 (+inf: no visible key / padding lane)
    T* dl = l2 + BMp;          // [BMp] Delta
    int32_t* lot = iws;
    int32_t* hit = iws + a.K * BMp;

    pack_t(a.q + (r0 * a.Hq + h) * D, a.Hq * D, m, D, Qt, BMp);
    pack_t(a.dout + (r0 * a.Hq + h) * D, a.Hq * D, m, D, dOt, BMp);
    pack_intervals(a, r0, m, lot, hit);
    for (int64_t i = 0; i < BMp; ++i) {
      l2[i] = i < m ? lse2_of(a.lse_in[h * a.ntok + r0 + i]) : std::numeric_limits<T>::infinity();
      dl[i] = i < m ? a.delta[h * a.ntok + r0 + i] : T(0);
    }
    for (int64_t i = 0; i < D * BMp; ++i) dQt[i] = T(0);

    Tiles tiles(a.pptr, a.pidx, a.fptr, a.fidx, qb);
    int64_t kb, kb_next;
    bool partial, partial_next;
    bool more = tiles.next(&kb_next, &partial_next);
    while (more) {
      kb = kb_next;
      partial = partial_next;
      more = tiles.next(&kb_next, &partial_next);
      const int64_t c0 = kb * a.BN, n = std::min(a.BN, a.ntok - c0);
      const T* Kb = a.k + (c0 * a.Hkv + hk) * D;
      const T* Vb = a.v + (c0 * a.Hkv + hk) * D;
      const int64_t c1 = more ? kb_next * a.BN : 0, n1 = more ? std::min(a.BN, a.ntok - c1) : 0;
      prefetch_rows(a.k + (c1 * a.Hkv + hk) * D, krs, n1, D);
      gemm(n, BMp, D, Kb, krs, 1, Qt, BMp, PT, BMp, false);   // S^T
      prefetch_rows(a.v + (c1 * a.Hkv + hk) * D, krs, n1, D);
      gemm(n, BMp, D, Vb, krs, 1, dOt, BMp, dPT, BMp, false);  // dP^T = V . dO^T
      scale_mask_keys_by_lanes(a, PT, n, c0, lot, hit, partial);
      for (int64_t i = 0; i < BMp; i += W) {
        const reg lv = V::load(l2 + i);
        const reg dv = V::load(dl + i);
        for (int64_t j = 0; j < n; ++j) {
          const reg p = V::exp2(V::sub(V::load(PT + j * BMp + i), lv));
          V::store(dPT + j * BMp + i, V::mul(p, V::sub(V::load(dPT + j * BMp + i), dv)));
        }
      }
      gemm(D, BMp, n, Kb, 1, krs, dPT, BMp, dQt, BMp, true);  // dQ^T += K^T . dS^T
    }
    for (int64_t i = 0; i < m; ++i) {
      T* dst = a.dq + ((r0 + i) * a.Hq + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = dQt[d * BMp + i] * a.scale;
    }
  }

  // dK / dV of key block kb (kv head hk) over every listed (query head of the group, query block), accumulated in
  // dKt / dVt; with dqa != nullptr (fused schedule) also dQ += dS . K into dqa (rows of a.Hq * a.Dq, zero on entry).
  static void dkdv_block(const Args<T>& a, int64_t kb, int64_t hk, T* ws, T* dqa) {
    const int64_t D = a.D, BMp = a.BMp, BNp = a.BNp, Dq = a.Dq;
    const int64_t c0 = kb * a.BN, n = std::min(a.BN, a.ntok - c0);
    const int64_t qrs = a.Hq * D, krs = a.Hkv * D;
    T* Kt = ws;                // [D, BNp]
    T* Vt = Kt + D * BNp;      // [D, BNp]
    T* P = Vt + D * BNp;       // [BMp, BNp]
    T* dP = P + BMp * BNp;     // [BMp, BNp], then dS
    T* dKt = dP + BMp * BNp;   // [D, BNp] accumulators, transposed
    T* dVt = dKt + D * BNp;    // [D, BNp]
    T* Kn = dVt + D * BNp;     // [BNp, Dq] the K tile, rows contiguous, zero padded (fused schedule only)

    const T* Kb = a.k + (c0 * a.Hkv + hk) * D;
    pack_t(Kb, krs, n, D, Kt, BNp);
    pack_t(a.v + (c0 * a.Hkv + hk) * D, krs, n, D, Vt, BNp);
    if (dqa != nullptr) {
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t d = 0; d < D; ++d) Kn[j * Dq + d] = Kb[j * krs + d];
        for (int64_t d = D; d < Dq; ++d) Kn[j * Dq + d] = T(0);
      }
    }
    for (int64_t i = 0; i < D * BNp; ++i) {
      dKt[i] = T(0);
      dVt[i] = T(0);
    }
    const bool clipped = n < BNp;
    for (int64_t g = 0; g < a.G; ++g) {
      const int64_t h = hk * a.G + g;
      Tiles tiles(a.tpptr, a.tpidx, a.tfptr, a.tfidx, kb);
      int64_t qb, qb_next;
      bool partial, partial_next;
      bool more = tiles.next(&qb_next, &partial_next);
      while (more) {
        qb = qb_next;
        partial = partial_next;
        more = tiles.next(&qb_next, &partial_next);
        const int64_t r0 = qb * a.BM, m = std::min(a.BM, a.ntok - r0);
        const T* Qb = a.q + (r0 * a.Hq + h) * D;
        const T* dOb = a.dout + (r0 * a.Hq + h) * D;
        const int64_t r1 = more ? qb_next * a.BM : 0, m1 = more ? std::min(a.BM, a.ntok - r1) : 0;
        prefetch_rows(a.q + (r1 * a.Hq + h) * D, qrs, m1, D);
        gemm(m, BNp, D, Qb, qrs, 1, Kt, BNp, P, BNp, false);    // S = Q . K^T   [m, BNp]
        prefetch_rows(a.dout + (r1 * a.Hq + h) * D, qrs, m1, D);
        gemm(m, BNp, D, dOb, qrs, 1, Vt, BNp, dP, BNp, false);  // dP = dO . V^T
        scale_mask_lanes_by_queries(a, P, m, r0, c0, partial || clipped);
        for (int64_t i = 0; i < m; ++i) {
          const reg lv = V::set1(lse2_of(a.lse_in[h * a.ntok + r0 + i]));
          const reg dv = V::set1(a.delta[h * a.ntok + r0 + i]);
          T* prow = P + i * BNp;
          T* drow = dP + i * BNp;
          for (int64_t j = 0; j < BNp; j += W) {
            const reg p = V::exp2(V::sub(V::load(prow + j), lv));
            V::store(prow + j, p);
            V::store(drow + j, V::mul(p, V::sub(V::load(drow + j), dv)));
          }
        }
        gemm(D, BNp, m, dOb, 1, qrs, P, BNp, dVt, BNp, true);  // dV^T += dO^T . P
        gemm(D, BNp, m, Qb, 1, qrs, dP, BNp, dKt, BNp, true);  // dK^T += Q^T . dS
        if (dqa != nullptr) {  // dQ += dS . K: the same products, in the same order, as dq_task's dQ^T += K^T dS^T
          gemm(m, Dq, n, dP, BNp, 1, Kn, Dq, dqa + (r0 * a.Hq + h) * Dq, a.Hq * Dq, true);
        }
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      T* dk = a.dk + ((c0 + j) * a.Hkv + hk) * D;
      T* dv = a.dv + ((c0 + j) * a.Hkv + hk) * D;
      for (int64_t d = 0; d < D; ++d) {
        dk[d] = dKt[d * BNp + j] * a.scale;
        dv[d] = dVt[d * BNp + j];
      }
    }
  }

  // Two-pass backward, pass 2: dK, dV for one (key block, kv head).
  static void dkdv_task(const Args<T>& a, int64_t task, T* ws, int32_t*) {
    dkdv_block(a, task / a.Hkv, task % a.Hkv, ws, nullptr);
  }

  // Fused backward, one task per kv head: key blocks in ascending order as in dkdv_task, plus dQ accumulated in
  // a.dqa in the order dq_task uses (key blocks ascending), so both schedules give bit-identical gradients.
  static void fused_task(const Args<T>& a, int64_t hk, T* ws, int32_t*) {
    for (int64_t kb = 0; kb < a.nK; ++kb) {
      if (a.tpptr[kb] == a.tpptr[kb + 1] && a.tfptr[kb] == a.tfptr[kb + 1]) continue;
      dkdv_block(a, kb, hk, ws, a.dqa);
    }
    for (int64_t p = 0; p < a.ntok; ++p) {
      for (int64_t g = 0; g < a.G; ++g) {
        const int64_t h = hk * a.G + g;
        const T* src = a.dqa + (p * a.Hq + h) * a.Dq;
        T* dst = a.dq + (p * a.Hq + h) * a.D;
        for (int64_t d = 0; d < a.D; ++d) dst[d] = src[d] * a.scale;  // in place when dqa == dq (Dq == D)
      }
    }
  }

  // Delta[h, p] = sum_d dO[p, h, d] * O[p, h, d] for p in [p0, p1).
  static void row_dots(const T* g, const T* o, int64_t p0, int64_t p1, int64_t H, int64_t D, int64_t ntok,
                       T* delta) {
    const int64_t Dv = D / W * W;
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t h = 0; h < H; ++h) {
        const T* x = g + (p * H + h) * D;
        const T* y = o + (p * H + h) * D;
        reg acc = V::zero();
        for (int64_t d = 0; d < Dv; d += W) acc = V::fmadd(V::load(x + d), V::load(y + d), acc);
        T s = V::hsum(acc);
        for (int64_t d = Dv; d < D; ++d) s += x[d] * y[d];
        delta[h * ntok + p] = s;
      }
    }
  }

  // bad[r] = 1 when row r (token * Hkv + head) of k or v holds a non-finite value (x * 0 != 0).
  static void scan_rows(const T* k, const T* v, int64_t r0, int64_t r1, int64_t D, uint8_t* bad) {
    const int64_t Dv = D / W * W;
    const reg z = V::zero();
    for (int64_t r = r0; r < r1; ++r) {
      const T* x = k + r * D;
      const T* y = v + r * D;
      reg acc = V::zero();
      for (int64_t d = 0; d < Dv; d += W) {
        acc = V::add(acc, V::add(V::mul(V::load(x + d), z), V::mul(V::load(y + d), z)));
      }
      bool b = V::any_nonzero(acc);
      for (int64_t d = Dv; d < D; ++d) b = b || !(x[d] * T(0) == T(0)) || !(y[d] * T(0) == T(0));
      bad[r] = b ? 1 : 0;
    }
  }
};

template <class V>
IsaFns<typename V::T> make_fns(const char* name) {
  IsaFns<typename V::T> f;
  f.fwd_task = &Kern<V>::fwd_task;
  f.dq_task = &Kern<V>::dq_task;
  f.dkdv_task = &Kern<V>::dkdv_task;
  f.fused_task = &Kern<V>::fused_task;
  f.row_dots = &Kern<V>::row_dots;
  f.scan_rows = &Kern<V>::scan_rows;
  f.name = name;
  return f;
}

inline IsaFns<float> fns_f32() {
#if defined(MEM1_SA_WITH_DOUBLE)
  return make_fns<VF>("generic");
#else
  return make_fns<VF>(VF::W == 16 ? "avx512" : "avx2");
#endif
}
#if defined(MEM1_SA_WITH_DOUBLE)
inline IsaFns<double> fns_f64() { return make_fns<VD>("generic"); }
#endif

#endif  // MEM1_SA_BODY
