// mem1_fast state_attention -- CUDA launchers (raw pointers + stream; no torch headers).
//
// Attention over an interval visibility spec (docs/design.md §4-§5), packed varlen layout, FlashAttention-2
// structure, tensor cores through mma.sync m16n8k16 (sm_80+), fp16 / bf16 inputs, fp32 accumulation. The kernels are in
// state_attention.cu; the torch binding is csrc/cuda/bindings_cuda.cpp.
//
// Tensors (device memory):
//   q [T, Hq, D], k / v [T, Hkv, D], out [T, Hq, D] (and dout / dq [T, Hq, D], dk / dv [T, Hkv, D] in the
//   backward): element (t, h, d) at ptr[t * stride_t + h * stride_h + d] -- the head dim is contiguous; strides
//   are in elements and must be multiples of 8, pointers 16-byte aligned (the tiles move in 16-byte chunks).
//   GQA: query head h reads key/value head h / (Hq / Hkv); K/V are never repeated.
//   lse float32 [Hq, T] contiguous: natural-log log-sum-exp of each row's scaled scores, -inf for a row with no
//   visible key (whose output is 0 and whose gradients are 0).
//   lo / hi int32 [T, K] row-major contiguous: row p sees column c iff lo[p,k] <= c < hi[p,k] for some k
//   (mem1_fast/visibility.h: 0 <= lo <= hi <= p + 1).
//   Block map for tiles (BM, BN) = (MEM1_SA_BM, MEM1_SA_BN), CSR over query blocks (mem1_fast/visibility.py
//   BlockMap): partial_ptr / full_ptr int32 [nQ + 1], partial_idx / full_idx int32 key-block indices; and for the
//   backward the same map transposed (CSR over key blocks, idx = query blocks): t_partial_ptr / t_full_ptr int32
//   [nK + 1], t_partial_idx / t_full_idx.
//   workspace (backward only): float32 [2, Hq, T] scratch (lse in log2 units, then delta = rowsum(dO * O)).
//
// Supported: D in {64, 128}; fp16 (`_f16`) and bf16 (`_bf16`); Hq % Hkv == 0, Hq <= 65535; any T >= 0 (ragged
// last tiles); 0 <= K <= 16 (a block's intervals are staged in shared memory). The launchers return
// cudaErrorInvalidValue for anything else (and for BM / BN other than the kernels' tiles, misaligned pointers or
// strides), else the launch status; they are asynchronous on `stream` and allocate nothing. Shared memory per
// block grows with K (52 KiB fwd, 103 KiB dq, 123 KiB dkdv at D = 128 and K = 2; see
// mem1_state_attention_smem_bytes), above the 48 KiB default: the launchers opt in with cudaFuncSetAttribute. The
// D = 128 backward needs more than the 99 KiB per block of sm_86 / sm_89 parts: it targets A100 / H100 (163 / 227
// KiB); elsewhere its launch fails with the CUDA error. Non-finite K/V values are not isolated: inside a tile they
// can reach rows that cannot see them (0 * inf in P V), as in FlashAttention.
//
// The backward is deterministic: dK / dV are accumulated per (key block, kv head) over the transposed map with the
// GQA group's query heads looped inside the CUDA block, dQ per (query block, query head); no atomics.
#pragma once

#include <stdint.h>

#if defined(MEM1_SA_EMULATE)
// CPU emulation build of state_attention.cu (tests/test_state_attention_cuda.py): no CUDA headers at all.
typedef int cudaError_t;
typedef void* cudaStream_t;
#define cudaSuccess 0
#define cudaErrorInvalidValue 1
#else
#include <cuda_runtime_api.h>
#endif

// Tile sizes the kernels are compiled for: the block map must be built for (MEM1_SA_BM, MEM1_SA_BN).
#define MEM1_SA_BM 64
#define MEM1_SA_BN 64

#ifdef __cplusplus
extern "C" {
#endif

// Arguments of every launcher. All fields are 8 bytes wide (pointers, int64_t, double): the layout has no padding,
// so it can be mirrored field by field (tests use ctypes). Fields a launcher does not use may be left null / 0.
typedef struct Mem1StateAttnParams {
  // inputs [T, H, D] and their token / head strides (elements)
  const void* q;
  int64_t q_stride_t, q_stride_h;
  const void* k;
  int64_t k_stride_t, k_stride_h;
  const void* v;
  int64_t v_stride_t, v_stride_h;
  // forward output, backward input
  void* out;
  int64_t out_stride_t, out_stride_h;
  float* lse;  // [Hq, T]
  // backward only
  const void* dout;
  int64_t dout_stride_t, dout_stride_h;
  void* dq;
  int64_t dq_stride_t, dq_stride_h;
  void* dk;
  int64_t dk_stride_t, dk_stride_h;
  void* dv;
  int64_t dv_stride_t, dv_stride_h;
  float* workspace;  // [2, Hq, T]
  // sizes
  int64_t T, Hq, Hkv, D;
  // interval spec
  const int32_t* lo;
  const int32_t* hi;
  int64_t K;
  // block map, CSR over query blocks
  const int32_t* partial_ptr;
  const int32_t* partial_idx;
  const int32_t* full_ptr;
  const int32_t* full_idx;
  // transposed block map, CSR over key blocks (backward only)
  const int32_t* t_partial_ptr;
  const int32_t* t_partial_idx;
  const int32_t* t_full_ptr;
  const int32_t* t_full_idx;
  int64_t BM, BN;
  double scale;  // softmax scale (usually 1 / sqrt(D))
} Mem1StateAttnParams;

// sizeof(Mem1StateAttnParams), for bindings that mirror the struct (ctypes).
int64_t mem1_state_attention_params_size(void);

// Dynamic shared memory of one block of kernel 0 (fwd), 1 (dkdv) or 2 (dq) for head dim D and K intervals per row,
// in bytes; -1 for unsupported arguments. (ptxas reports 0 for these kernels: their shared memory is dynamic.)
int64_t mem1_state_attention_smem_bytes(int32_t kernel, int64_t D, int64_t K);

// Forward: writes out and lse.
cudaError_t mem1_state_attention_fwd_f16(const Mem1StateAttnParams* p, cudaStream_t stream);
cudaError_t mem1_state_attention_fwd_bf16(const Mem1StateAttnParams* p, cudaStream_t stream);

// Backward: reads dout, q, k, v, out, lse (+ both block maps), writes dq, dk, dv (every row, zeros where a row or
// key sees / is seen by nothing) and uses workspace. Three kernels in stream order: delta preprocess, dK/dV, dQ.
cudaError_t mem1_state_attention_bwd_f16(const Mem1StateAttnParams* p, cudaStream_t stream);
cudaError_t mem1_state_attention_bwd_bf16(const Mem1StateAttnParams* p, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
