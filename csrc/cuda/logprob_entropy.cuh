// mem1_fast logprob_entropy -- CUDA forward launchers (raw pointers + stream; no torch headers) and the online
// log-sum-exp / entropy reduction shared by the device code and any host code (docs/design.md §5).
//
// Per row n (z = hidden[n] . weight^T * inv_tau, over the V vocabulary entries):
//   logp[n]    = z[target[n]] - lse(z)                         (<= 0 exactly)
//   entropy[n] = lse(z) - E_softmax(z)[z]                     (>= 0 exactly)
//   stats[0, n] = m = max z,  stats[1, n] = logs = log sum exp(z - m),  stats[2, n] = mean_d = E_p[z - m]
// so lse = m + logs, E_p[z] = m + mean_d. The statistics are those of triton_kernels/logprob_entropy.py (same
// layout), so the Triton backward can consume this forward's `stats`.
//
// Tensors (device memory): hidden [N, H] with row stride `stride_hidden` (elements; columns contiguous), weight
// [V, H] with row stride `stride_weight`, targets int64 [N] in [0, V), logp / entropy float32 [N], stats float32
// [3, N] contiguous, workspace float32 [4, splits, N] (partial statistics of each vocabulary split).
// hidden and weight share the dtype of the launcher: `_f16` (__half), `_bf16` (__nv_bfloat16) -- tensor cores
// (wmma m16n16k16, fp32 accumulation, sm_80+) -- or `_f32` (float, IEEE fp32 FMA: no tf32).
// Any N >= 0, V >= 1, H >= 1 (ragged last tiles everywhere); 16-byte vector loads are used when H, both row strides
// and both base pointers allow it, scalar loads otherwise. The launchers return cudaErrorInvalidValue for invalid
// arguments, else the launch status; they are asynchronous on `stream` and allocate nothing.
// Deterministic: each split is reduced by one CUDA block in vocabulary order, the splits are merged in split order.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#include <cuda_runtime_api.h>
#define MEM1_LPE_HD __host__ __device__ __forceinline__
#elif defined(MEM1_LPE_HOST_ONLY) || defined(MEM1_LPE_EMULATE)
// host-only users of the reduction helpers, and the CPU emulation build of logprob_entropy.cu (no CUDA toolkit)
typedef int cudaError_t;
typedef void* cudaStream_t;
#define cudaSuccess 0
#define cudaErrorInvalidValue 1
#define MEM1_LPE_HD static inline
#else
#include <cuda_runtime_api.h>
#define MEM1_LPE_HD static inline
#endif

#if defined(__CUDACC__)
#define MEM1_LPE_EXP expf  // IEEE-accurate (to 2 ulp) without --use_fast_math
#define MEM1_LPE_LOG logf
#elif defined(__cplusplus)
#include <cmath>
#define MEM1_LPE_EXP std::exp
#define MEM1_LPE_LOG std::log
#else
#include <math.h>
#define MEM1_LPE_EXP expf
#define MEM1_LPE_LOG logf
#endif

// Tiles of the kernels: rows x vocabulary per CUDA block, hidden step of the K-loop.
#define MEM1_LPE_BM 64
#define MEM1_LPE_BN 64
#define MEM1_LPE_BK 32
#define MEM1_LPE_THREADS 128

#ifdef __cplusplus
extern "C" {
#endif

// Arguments of the forward launchers. Every field is 8 bytes wide (pointers, int64_t, double): no padding, so it can
// be mirrored field by field (tests use ctypes).
typedef struct Mem1LogprobEntropyFwdParams {
  const void* hidden;     // [N, H]
  int64_t stride_hidden;  // elements between rows of hidden
  const void* weight;     // [V, H]
  int64_t stride_weight;  // elements between rows of weight
  const int64_t* targets; // [N]
  int64_t N, V, H;
  double inv_temperature; // 1 / temperature (> 0)
  float* logp;            // [N]
  float* entropy;         // [N]
  float* stats;           // [3, N]: m, logs, mean_d
  float* workspace;       // [4, splits, N]
  int64_t splits;         // vocabulary splits (>= 1; mem1_logprob_entropy_fwd_splits gives a good value)
} Mem1LogprobEntropyFwdParams;

cudaError_t mem1_logprob_entropy_fwd_f16(const Mem1LogprobEntropyFwdParams* p, cudaStream_t stream);
cudaError_t mem1_logprob_entropy_fwd_bf16(const Mem1LogprobEntropyFwdParams* p, cudaStream_t stream);
cudaError_t mem1_logprob_entropy_fwd_f32(const Mem1LogprobEntropyFwdParams* p, cudaStream_t stream);

// Number of vocabulary splits for about 4 CUDA blocks per SM (never more than the vocabulary tiles), and the
// workspace the launchers need for it, in bytes (4 * splits * N floats).
int64_t mem1_logprob_entropy_fwd_splits(int64_t N, int64_t V, int64_t num_sms);
int64_t mem1_logprob_entropy_fwd_workspace_bytes(int64_t N, int64_t splits);

#ifdef __cplusplus
}
#endif

// ----- the reduction, shared by the kernels and host code -------------------------------------------------------
// Running statistics of one row, relative to its running max m: s = sum exp(z - m), sd = sum exp(z - m) (z - m).
// A new max m' rescales them: a = exp(m - m'); sd <- a (sd + s (m - m')); s <- a s. With m = -inf (nothing seen
// yet) s = sd = 0 and the shift term is skipped (0 * -inf). Keeping everything relative to the max makes
// +-1e4-scale logits neither overflow nor cancel, and gives logs >= 0, mean_d <= 0 exactly.

// Rescale (s, sd) from max m_old to m_new >= m_old.
MEM1_LPE_HD void mem1_lpe_rescale(float m_old, float m_new, float* s, float* sd) {
  const float a = MEM1_LPE_EXP(m_old - m_new);
  const float shift = *s > 0.0f ? m_old - m_new : 0.0f;
  *sd = a * (*sd + *s * shift);
  *s = a * *s;
}

// Merge partial statistics (m2, s2, sd2) into (m, s, sd).
MEM1_LPE_HD void mem1_lpe_merge(float* m, float* s, float* sd, float m2, float s2, float sd2) {
  const float mn = *m > m2 ? *m : m2;
  mem1_lpe_rescale(*m, mn, s, sd);
  mem1_lpe_rescale(m2, mn, &s2, &sd2);
  *m = mn;
  *s += s2;
  *sd += sd2;
}

// Final values from merged statistics and the target logit zt.
MEM1_LPE_HD void mem1_lpe_finalize(float m, float s, float sd, float zt, float* logp, float* entropy, float* logs,
                                   float* mean_d) {
  *logs = MEM1_LPE_LOG(s);  // s >= 1: the max term is exp(0)
  *mean_d = sd / s;         // <= 0
  *logp = (zt - m) - *logs;
  *entropy = *logs - *mean_d;
}
