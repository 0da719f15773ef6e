// mem1_fast block map -- CUDA launchers (raw pointers + stream; no torch headers).
//
// Same computation as csrc/cpu/block_map.cpp (see that file and mem1_fast/visibility.h for the semantics), split
// in four kernels with two host-side (torch) prefix sums between them. All arrays are device memory; lo / hi are
// row-major contiguous int32 [T, K]; nQ = ceil(T / BM). A binding (.cpp with torch CUDA) drives them as:
//
//   1. mem1_block_map_range_cuda(lo, hi, T, K, BM, BN, kmin[nQ], len[nQ], bad_row[1])
//        -> per query block, first key block kmin and length len of the key-block range touched by its rows'
//           non-empty intervals (len 0 if none); bad_row = smallest row violating the contract (0xFFFFFFFF: none;
//           the launcher initializes it). Check it before going on.
//   2. host: off = exclusive_cumsum(len) (int64 [nQ]), W = sum(len); zero-filled int32 edge[W] and mid[W].
//   3. mem1_block_map_accumulate_cuda(lo, hi, T, K, BM, BN, kmin, off, edge, mid)
//   4. mem1_block_map_classify_cuda(T, BM, BN, kmin, len, off, edge, mid, nP[nQ], nF[nQ])
//        -> edge[] now holds the tile kind of every key block of each range (0 empty, 1 partial, 2 full);
//           nP / nF: partial / full tiles per query block.
//   5. host: partial_ptr = [0, cumsum(nP)], full_ptr = [0, cumsum(nF)] (int32 [nQ+1]); allocate the idx arrays.
//   6. mem1_block_map_compact_cuda(nQ, kmin, len, off, edge, partial_ptr, full_ptr, partial_idx, full_idx)
//
// Each launcher returns the launch status (cudaSuccess or the error of cudaGetLastError()); they are asynchronous
// on `stream`. Limits: BM * BN < 2^30 (counts are int32), W < 2^31.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

cudaError_t mem1_block_map_range_cuda(const int32_t* lo, const int32_t* hi, int64_t T, int64_t K, int64_t BM,
                                      int64_t BN, int32_t* kmin, int32_t* len, uint32_t* bad_row,
                                      cudaStream_t stream);

cudaError_t mem1_block_map_accumulate_cuda(const int32_t* lo, const int32_t* hi, int64_t T, int64_t K, int64_t BM,
                                           int64_t BN, const int32_t* kmin, const int64_t* off, int32_t* edge,
                                           int32_t* mid, cudaStream_t stream);

cudaError_t mem1_block_map_classify_cuda(int64_t T, int64_t BM, int64_t BN, const int32_t* kmin, const int32_t* len,
                                         const int64_t* off, int32_t* edge, const int32_t* mid, int32_t* nP,
                                         int32_t* nF, cudaStream_t stream);

cudaError_t mem1_block_map_compact_cuda(int64_t nQ, const int32_t* kmin, const int32_t* len, const int64_t* off,
                                        const int32_t* kind, const int32_t* partial_ptr, const int32_t* full_ptr,
                                        int32_t* partial_idx, int32_t* full_idx, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
