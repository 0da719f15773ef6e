// mem1_fast block map -- CUDA kernels (raw pointers + stream; no torch headers). See block_map.cuh for the driver
// sequence and csrc/cpu/block_map.cpp for the algorithm (edge counts + difference array over each query block's
// key-block range; never T x T, never nQ x nK).
#include "block_map.cuh"

#include "mem1_fast/visibility.h"

namespace {

namespace vis = mem1_fast::vis;

constexpr int kRangeThreads = 128;
constexpr int kScanThreads = 256;
constexpr int kAccumThreads = 256;

// Inclusive prefix sum of `v` over the NT threads of the block. `warp_sums` is shared scratch of NT / 32 ints.
// *total receives the sum over the block. Every thread of the block must call it (contains __syncthreads).
template <int NT>
__device__ __forceinline__ int block_inclusive_scan(int v, int* warp_sums, int* total) {
  static_assert(NT % 32 == 0 && NT <= 1024, "block size must be a multiple of 32, at most 1024");
  constexpr int kWarps = NT / 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += n;
    }
    if (lane < kWarps) warp_sums[lane] = w;
  }
  __syncthreads();
  if (warp > 0) v += warp_sums[warp - 1];
  *total = warp_sums[kWarps - 1];
  __syncthreads();  // warp_sums may be reused by the next call
  return v;
}

// Kernel 1: one CUDA block per query block. Validates its rows and computes the key-block range of their non-empty
// intervals.
__global__ void __launch_bounds__(kRangeThreads) block_map_range_kernel(const int32_t* __restrict__ lo,
                                                                        const int32_t* __restrict__ hi, int64_t T,
                                                                        int64_t K, int64_t BM, int64_t BN,
                                                                        int32_t* __restrict__ kmin_out,
                                                                        int32_t* __restrict__ len_out,
                                                                        uint32_t* __restrict__ bad_row) {
  __shared__ int s_min;
  __shared__ int s_max;
  const int64_t qb = blockIdx.x;
  if (threadIdx.x == 0) {
    s_min = 0x7fffffff;
    s_max = -1;
  }
  __syncthreads();
  const int64_t r0 = vis::block_begin(qb, BM);
  const int64_t r1 = vis::block_end(qb, BM, T);
  int my_min = 0x7fffffff;  // min lo, max hi over the non-empty intervals; divided by BN once at the end
  int my_max = -1;
  for (int64_t r = r0 + threadIdx.x; r < r1; r += blockDim.x) {
    const int32_t* lo_row = lo + r * K;
    const int32_t* hi_row = hi + r * K;
    int64_t bad_k = 0;
    if (vis::check_row(lo_row, hi_row, K, r, &bad_k) != vis::kRowOk) {
      atomicMin(bad_row, static_cast<uint32_t>(r));
      continue;
    }
    for (int64_t k = 0; k < K; ++k) {
      const int l = lo_row[k], h = hi_row[k];
      if (h > l) {
        my_min = min(my_min, l);
        my_max = max(my_max, h);
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    my_min = min(my_min, __shfl_xor_sync(0xffffffffu, my_min, o));
    my_max = max(my_max, __shfl_xor_sync(0xffffffffu, my_max, o));
  }
  if ((threadIdx.x & 31) == 0 && my_max >= 0) {
    atomicMin(&s_min, my_min);
    atomicMax(&s_max, my_max);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const bool any = s_max >= 0;
    const vis::BlockDiv bn(BN);
    const int64_t first = any ? bn(s_min) : 0;
    const int64_t last = any ? bn(s_max - 1) : -1;
    kmin_out[qb] = static_cast<int32_t>(first);
    len_out[qb] = static_cast<int32_t>(last - first + 1);
  }
}

// Kernel 2: one thread per row (grid-stride). Adds every non-empty interval's partial overlaps at its first and
// last key block to edge[], and marks the fully covered blocks in between in the difference array mid[].
__global__ void __launch_bounds__(kAccumThreads) block_map_accumulate_kernel(const int32_t* __restrict__ lo,
                                                                             const int32_t* __restrict__ hi,
                                                                             int64_t T, int64_t K, int64_t BM,
                                                                             int64_t BN,
                                                                             const int32_t* __restrict__ kmin,
                                                                             const int64_t* __restrict__ off,
                                                                             int32_t* __restrict__ edge,
                                                                             int32_t* __restrict__ mid) {
  const vis::BlockDiv bm(BM), bn(BN);
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < T;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t qb = bm(r);
    const int64_t base = off[qb] - kmin[qb];  // edge[base + kb] is key block kb of this query block
    const int32_t* lo_row = lo + r * K;
    const int32_t* hi_row = hi + r * K;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t l = lo_row[k], h = hi_row[k];
      int64_t first, last;
      if (!vis::interval_block_range(l, h, bn, &first, &last)) continue;
      if (first == last) {
        atomicAdd(edge + base + first, static_cast<int>(h - l));
        continue;
      }
      atomicAdd(edge + base + first, static_cast<int>(vis::interval_block_overlap(l, h, first, BN, T)));
      atomicAdd(edge + base + last, static_cast<int>(vis::interval_block_overlap(l, h, last, BN, T)));
      if (last > first + 1) {
        atomicAdd(mid + base + first + 1, 1);
        atomicAdd(mid + base + last, -1);
      }
    }
  }
}

// Kernel 3: one CUDA block per query block. count = edge + BN * prefix(mid); the tile kind overwrites edge[].
__global__ void __launch_bounds__(kScanThreads) block_map_classify_kernel(int64_t T, int64_t BM, int64_t BN,
                                                                          const int32_t* __restrict__ kmin,
                                                                          const int32_t* __restrict__ len,
                                                                          const int64_t* __restrict__ off,
                                                                          int32_t* __restrict__ edge,
                                                                          const int32_t* __restrict__ mid,
                                                                          int32_t* __restrict__ nP,
                                                                          int32_t* __restrict__ nF) {
  __shared__ int warp_sums[kScanThreads / 32];
  __shared__ int s_counts[2];
  const int64_t qb = blockIdx.x;
  const int L = len[qb];
  const int64_t base = off[qb];
  const int64_t k0 = kmin[qb];
  if (threadIdx.x < 2) s_counts[threadIdx.x] = 0;
  int my_p = 0, my_f = 0;
  int carry = 0;  // prefix(mid) up to the previous chunk
  for (int c = 0; c < L; c += kScanThreads) {
    const int i = c + threadIdx.x;
    const bool in = i < L;
    int total;
    const int run = carry + block_inclusive_scan<kScanThreads>(in ? mid[base + i] : 0, warp_sums, &total);
    carry += total;
    if (in) {
      const int64_t kb = k0 + i;
      const int64_t count = static_cast<int64_t>(edge[base + i]) + static_cast<int64_t>(run) * BN;
      const int32_t kind = vis::classify_tile(count, vis::tile_area(qb, kb, BM, BN, T));
      edge[base + i] = kind;
      my_p += kind == vis::kTilePartial;
      my_f += kind == vis::kTileFull;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    my_p += __shfl_xor_sync(0xffffffffu, my_p, o);
    my_f += __shfl_xor_sync(0xffffffffu, my_f, o);
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
    atomicAdd(&s_counts[0], my_p);
    atomicAdd(&s_counts[1], my_f);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    nP[qb] = s_counts[0];
    nF[qb] = s_counts[1];
  }
}

// Kernel 4: one CUDA block per query block. Ordered compaction of the partial / full key blocks into the CSR
// index arrays. Both flags are scanned at once, packed as partial + (full << 16) (a chunk holds < 2^16 tiles).
__global__ void __launch_bounds__(kScanThreads) block_map_compact_kernel(const int32_t* __restrict__ kmin,
                                                                         const int32_t* __restrict__ len,
                                                                         const int64_t* __restrict__ off,
                                                                         const int32_t* __restrict__ kind,
                                                                         const int32_t* __restrict__ partial_ptr,
                                                                         const int32_t* __restrict__ full_ptr,
                                                                         int32_t* __restrict__ partial_idx,
                                                                         int32_t* __restrict__ full_idx) {
  __shared__ int warp_sums[kScanThreads / 32];
  const int64_t qb = blockIdx.x;
  const int L = len[qb];
  const int64_t base = off[qb];
  const int32_t k0 = kmin[qb];
  int32_t* outP = partial_idx + partial_ptr[qb];
  int32_t* outF = full_idx + full_ptr[qb];
  int carryP = 0, carryF = 0;
  for (int c = 0; c < L; c += kScanThreads) {
    const int i = c + threadIdx.x;
    const int32_t t = i < L ? kind[base + i] : vis::kTileEmpty;
    const int flag = (t == vis::kTilePartial ? 1 : 0) | (t == vis::kTileFull ? (1 << 16) : 0);
    int total;
    const int incl = block_inclusive_scan<kScanThreads>(flag, warp_sums, &total);
    const int excl = incl - flag;
    if (t == vis::kTilePartial) outP[carryP + (excl & 0xffff)] = k0 + i;
    if (t == vis::kTileFull) outF[carryF + (excl >> 16)] = k0 + i;
    carryP += total & 0xffff;
    carryF += total >> 16;
  }
}

inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

}  // namespace

extern "C" {

cudaError_t mem1_block_map_range_cuda(const int32_t* lo, const int32_t* hi, int64_t T, int64_t K, int64_t BM,
                                      int64_t BN, int32_t* kmin, int32_t* len, uint32_t* bad_row,
                                      cudaStream_t stream) {
  if (BM <= 0 || BN <= 0 || BM * BN >= (int64_t(1) << 30)) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(bad_row, 0xFF, sizeof(uint32_t), stream);
  if (err != cudaSuccess) return err;
  const int64_t nQ = vis::num_blocks(T, BM);
  if (nQ == 0) return cudaSuccess;
  block_map_range_kernel<<<static_cast<unsigned>(nQ), kRangeThreads, 0, stream>>>(lo, hi, T, K, BM, BN, kmin, len,
                                                                                 bad_row);
  return cudaGetLastError();
}

cudaError_t mem1_block_map_accumulate_cuda(const int32_t* lo, const int32_t* hi, int64_t T, int64_t K, int64_t BM,
                                           int64_t BN, const int32_t* kmin, const int64_t* off, int32_t* edge,
                                           int32_t* mid, cudaStream_t stream) {
  if (BM <= 0 || BN <= 0) return cudaErrorInvalidValue;
  if (T == 0 || K == 0) return cudaSuccess;
  block_map_accumulate_kernel<<<grid_for(T, kAccumThreads), kAccumThreads, 0, stream>>>(lo, hi, T, K, BM, BN, kmin,
                                                                                       off, edge, mid);
  return cudaGetLastError();
}

cudaError_t mem1_block_map_classify_cuda(int64_t T, int64_t BM, int64_t BN, const int32_t* kmin, const int32_t* len,
                                         const int64_t* off, int32_t* edge, const int32_t* mid, int32_t* nP,
                                         int32_t* nF, cudaStream_t stream) {
  if (BM <= 0 || BN <= 0) return cudaErrorInvalidValue;
  const int64_t nQ = vis::num_blocks(T, BM);
  if (nQ == 0) return cudaSuccess;
  block_map_classify_kernel<<<static_cast<unsigned>(nQ), kScanThreads, 0, stream>>>(T, BM, BN, kmin, len, off, edge,
                                                                                   mid, nP, nF);
  return cudaGetLastError();
}

cudaError_t mem1_block_map_compact_cuda(int64_t nQ, const int32_t* kmin, const int32_t* len, const int64_t* off,
                                        const int32_t* kind, const int32_t* partial_ptr, const int32_t* full_ptr,
                                        int32_t* partial_idx, int32_t* full_idx, cudaStream_t stream) {
  if (nQ == 0) return cudaSuccess;
  block_map_compact_kernel<<<static_cast<unsigned>(nQ), kScanThreads, 0, stream>>>(kmin, len, off, kind, partial_ptr,
                                                                                  full_ptr, partial_idx, full_idx);
  return cudaGetLastError();
}

}  // extern "C"
