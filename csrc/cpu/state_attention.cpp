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
// blocked micro-kernel does them: 6 x 64 fp32 accumulators in 24 zmm registers with AVX-512, 6 x 16 with AVX2 (per
// tile it avoids MKL's per-call overhead and threading inside our parallel region). The next tile's K/V (Q/dO) rows
// are prefetched into L2.
//
// ISA: the extension is compiled without -march flags, so the kernel body (state_attention_body.h, on the vector
// layer of csrc/include/mem1_fast/simd.h) is included three times: under `#pragma GCC target("avx512f,...")`, under `target("avx2,fma")`, and for the
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
#include "mem1_fast/simd.h"  // first: it silences a GCC warning before any header

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

#include "mem1_fast/visibility.h"

namespace mem1_fast {
namespace sa {

constexpr int64_t kPad = 16;  // lane padding of tile buffers (a multiple of every vector width used)
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

MEM1_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

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

// One lane with the micro-kernel shape: the generic body, and every ISA's column tail.
template <class T>
struct ScalarV : simd::Scalar<T> {
  static constexpr int MR = 4;  // micro-kernel rows
  static constexpr int NV = 4;  // micro-kernel vectors per row
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
#include "state_attention_body.h"
#undef MEM1_SA_WITH_DOUBLE
}  // namespace generic

#if MEM1_X86
// ----- AVX2 + FMA body ---------------------------------------------------------------------------------------------
MEM1_TARGET_PUSH_AVX2
namespace avx2 {
struct VF : simd::Avx2F32 {
  static constexpr int MR = 6;  // 6 x 2 ymm accumulators + 2 B + 1 broadcast of 16 registers
  static constexpr int NV = 2;
};
#include "state_attention_body.h"
}  // namespace avx2
MEM1_TARGET_POP

// ----- AVX-512 body -------------------------------------------------------------------------------------------------
MEM1_TARGET_PUSH_AVX512
namespace avx512 {
struct VF : simd::Avx512F32 {
  static constexpr int MR = 6;  // 6 x 4 zmm accumulators (6 rows x 64 columns) + 4 B + 1 broadcast of 32
  static constexpr int NV = 4;
};
#include "state_attention_body.h"
}  // namespace avx512
MEM1_TARGET_POP
#endif  // MEM1_X86

// =================================================================================================================
// Host side: checks, ISA choice, conversions, task scheduling, torch ops.
// =================================================================================================================
namespace {

using simd::best_isa;
using simd::kIsaAvx2;
using simd::kIsaAvx512;
using simd::kIsaGeneric;
using simd::pick_isa;

IsaFns<float> fns_f32(int64_t isa) {
#if MEM1_X86
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
