// mem1_fast logprob_entropy -- CUDA forward (raw pointers + stream; no torch headers). Contract, tiles and the
// shared reduction helpers: logprob_entropy.cuh. The torch binding belongs in csrc/cuda/bindings_cuda.cpp.
//
// Two kernels:
//   partial  grid (ceil(N / 64) row blocks, splits): a CUDA block of 4 warps owns 64 rows and walks the vocabulary
//            tiles of its split, 64 entries at a time. Per tile, the logits z[64 x 64] = hidden_rows . W_tile^T are
//            a K-loop over H in steps of 32: both operand tiles are staged in shared memory (the next step's global
//            loads are issued into registers before the current step's math, so they overlap it), multiplied on
//            tensor cores with wmma m16n16k16 (f16 / bf16 in, fp32 accumulate; each warp a 32 x 32 quarter) or, for
//            fp32 inputs, with IEEE fp32 FMAs (each thread a 4 x 8 micro-tile). The tile goes to shared memory as
//            fp32; then each warp updates the online statistics of its 16 rows (warp-shuffle max and sums; lane r
//            of the warp holds row r's running (m, s, sd, z_target) in registers) and gathers the target logit
//            from the same tile. The split's statistics go to the workspace [4, splits, N].
//   combine  one thread per row: merges the splits in split order (mem1_lpe_merge) and writes logp, entropy and
//            the saved statistics (mem1_lpe_finalize).
// Nothing of size [N, V] is ever written. 1 matmul-equivalent (the LM head's forward).
//
// Shared memory per block: A / W staging 2 x 64 x (32 + 8) halves = 10 KiB (fp32: 2 x 32 x (64 + 4) floats =
// 17 KiB) + the fp32 logits tile 64 x (64 + 4) floats = 17 KiB; static, under the 48 KiB default.
#include "logprob_entropy.cuh"

#if defined(MEM1_LPE_EMULATE)
// CPU emulation build (g++, tests/test_logprob_entropy_cuda.py): the shared emulator provides the CUDA names used
// here (thread / block indices, __syncthreads, warp shuffles, wmma on whole 16 x 16 tiles, __half / __nv_bfloat16).
#include "emulator.h"
#define MEM1_LPE_LAUNCH(kernel, grid, block, stream, ...) MEM1_EMU_LAUNCH(kernel, grid, block, __VA_ARGS__)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define MEM1_LPE_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

#include <stdint.h>

namespace mem1_lpe {

constexpr int kBM = MEM1_LPE_BM;  // rows per block
constexpr int kBN = MEM1_LPE_BN;  // vocabulary entries per tile
constexpr int kBK = MEM1_LPE_BK;  // hidden step
constexpr int kThreads = MEM1_LPE_THREADS;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = kBM / kWarps;  // 16: one warp updates the statistics of 16 rows
constexpr int kPadH = 8;                    // halves of padding per staged row: 16 B, keeps wmma's 32 B alignment
constexpr int kPadF = 4;                    // floats of padding per row of fp32 tiles
constexpr int kLdC = kBN + kPadF;           // row pitch of the fp32 logits tile
constexpr float kNegPad = -3.0e38f;         // padding columns: exp(z - m) = 0 and (z - m) exp(z - m) = 0, no inf * 0
constexpr int kCombineThreads = 256;

static_assert(kWarps == 4 && kBM == 64 && kBN == 64 && kBK == 32, "the warp layouts below assume these tiles");
static_assert(kRowsPerWarp <= 32, "a lane holds the statistics of one row");

// ---------------------------------------------------------------------------------------------------------------
// Global -> register loads of one operand tile (rows x kBK elements of a row-major [rows_total, H] matrix).
// Chunks of 16 bytes; VEC: one 16-byte load per chunk (H, the row stride and the base pointer allow it), else
// element by element. Rows >= n_rows and columns >= H read as zero.
// ---------------------------------------------------------------------------------------------------------------
template <class T>
struct Chunk {
  static constexpr int kElems = 16 / sizeof(T);
  union {
    uint4 v;
    T e[kElems];
  };
};

template <class T, bool VEC>
__device__ __forceinline__ void load_chunk(Chunk<T>& c, const T* __restrict__ base, int64_t stride, int64_t row,
                                           int64_t n_rows, int64_t k, int64_t H) {
  constexpr int E = Chunk<T>::kElems;
  if (row < n_rows && VEC && k + E <= H) {
    c.v = __ldg(reinterpret_cast<const uint4*>(base + row * stride + k));
    return;
  }
#pragma unroll
  for (int i = 0; i < E; ++i) {
    c.e[i] = (row < n_rows && k + i < H) ? base[row * stride + k + i] : T(0.0f);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core main loop (f16 / bf16): acc tile 64 x 64 -> Cs (fp32, row pitch kLdC).
// Warp w computes rows 32 (w / 2) .. +32, columns 32 (w % 2) .. +32: 2 x 2 fragments of 16 x 16.
// ---------------------------------------------------------------------------------------------------------------
template <class T, bool VEC>
struct MmaTile {
  static constexpr int E = Chunk<T>::kElems;                  // 8 elements per chunk
  static constexpr int kChunksPerRow = kBK / E;                // 4
  static constexpr int kChunks = kBM * kChunksPerRow / kThreads;  // 2 per thread per operand
  static constexpr int kLd = kBK + kPadH;                      // 40 elements (80 B) per staged row

  struct Smem {
    T a[kBM][kLd];
    T w[kBN][kLd];
  };

  __device__ static void run(Smem& sm, float* Cs, const T* __restrict__ X, int64_t stride_x, int64_t row0,
                             int64_t N, const T* __restrict__ W, int64_t stride_w, int64_t col0, int64_t V,
                             int64_t H) {
    using namespace nvcuda;
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int wr = (warp / 2) * 32;
    const int wc = (warp % 2) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    Chunk<T> ra[kChunks], rw[kChunks];
    auto fetch = [&](int64_t k0) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int id = tid + c * kThreads;
        const int r = id / kChunksPerRow;
        const int kk = (id % kChunksPerRow) * E;
        load_chunk<T, VEC>(ra[c], X, stride_x, row0 + r, N, k0 + kk, H);
        load_chunk<T, VEC>(rw[c], W, stride_w, col0 + r, V, k0 + kk, H);
      }
    };
    fetch(0);
    for (int64_t k0 = 0; k0 < H; k0 += kBK) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int id = tid + c * kThreads;
        const int r = id / kChunksPerRow;
        const int kk = (id % kChunksPerRow) * E;
        *reinterpret_cast<uint4*>(&sm.a[r][kk]) = ra[c].v;
        *reinterpret_cast<uint4*>(&sm.w[r][kk]) = rw[c].v;
      }
      __syncthreads();
      if (k0 + kBK < H) fetch(k0 + kBK);  // in flight during the math below
#pragma unroll
      for (int ks = 0; ks < kBK; ks += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];  // B = W^T: W rows are B columns
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sm.a[wr + 16 * i][ks], kLd);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &sm.w[wc + 16 * j][ks], kLd);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      __syncthreads();  // the staging buffers are overwritten next step
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (wr + 16 * i) * kLdC + wc + 16 * j, acc[i][j], kLdC, wmma::mem_row_major);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// IEEE fp32 main loop (SIMT): thread (ty, tx) = (tid / 8, tid % 8) computes rows 4 ty .. +4, columns 8 tx .. +8.
// Operands are staged k-major (a[k][row], w[k][col]) so the inner loop reads float4 vectors.
// ---------------------------------------------------------------------------------------------------------------
template <bool VEC>
struct FmaTile {
  static constexpr int E = 4;                                  // floats per chunk
  static constexpr int kChunksPerRow = kBK / E;                // 8
  static constexpr int kChunks = kBM * kChunksPerRow / kThreads;  // 4 per thread per operand
  static constexpr int kLd = kBM + kPadF;                      // 68 floats per staged k-row

  struct Smem {
    float a[kBK][kLd];
    float w[kBK][kLd];
  };

  __device__ static void run(Smem& sm, float* Cs, const float* __restrict__ X, int64_t stride_x, int64_t row0,
                             int64_t N, const float* __restrict__ W, int64_t stride_w, int64_t col0, int64_t V,
                             int64_t H) {
    const int tid = threadIdx.x;
    const int ty = tid / 8;
    const int tx = tid % 8;
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    Chunk<float> ra[kChunks], rw[kChunks];
    auto fetch = [&](int64_t k0) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int id = tid + c * kThreads;
        const int r = id / kChunksPerRow;
        const int kk = (id % kChunksPerRow) * E;
        load_chunk<float, VEC>(ra[c], X, stride_x, row0 + r, N, k0 + kk, H);
        load_chunk<float, VEC>(rw[c], W, stride_w, col0 + r, V, k0 + kk, H);
      }
    };
    fetch(0);
    for (int64_t k0 = 0; k0 < H; k0 += kBK) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int id = tid + c * kThreads;
        const int r = id / kChunksPerRow;
        const int kk = (id % kChunksPerRow) * E;
#pragma unroll
        for (int e = 0; e < E; ++e) {
          sm.a[kk + e][r] = ra[c].e[e];
          sm.w[kk + e][r] = rw[c].e[e];
        }
      }
      __syncthreads();
      if (k0 + kBK < H) fetch(k0 + kBK);
#pragma unroll 8
      for (int k = 0; k < kBK; ++k) {
        const float4 a = *reinterpret_cast<const float4*>(&sm.a[k][4 * ty]);
        const float4 b0 = *reinterpret_cast<const float4*>(&sm.w[k][8 * tx]);
        const float4 b1 = *reinterpret_cast<const float4*>(&sm.w[k][8 * tx + 4]);
        const float av[4] = {a.x, a.y, a.z, a.w};
        const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float* row = Cs + (4 * ty + i) * kLdC + 8 * tx;
      *reinterpret_cast<float4*>(row) = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      *reinterpret_cast<float4*>(row + 4) = make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]);
    }
  }
};

template <class T, bool VEC>
struct TileOf {
  using type = MmaTile<T, VEC>;
};
template <bool VEC>
struct TileOf<float, VEC> {
  using type = FmaTile<VEC>;
};

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------------------------------------------------------
// The partial-statistics kernel.
// ---------------------------------------------------------------------------------------------------------------
template <class T, bool VEC>
__global__ void __launch_bounds__(kThreads) partial_kernel(const T* __restrict__ X, int64_t stride_x,
                                                           const T* __restrict__ W, int64_t stride_w,
                                                           const int64_t* __restrict__ targets, int64_t N, int64_t V,
                                                           int64_t H, float inv_tau, int64_t tiles_per_split,
                                                           int64_t n_vtiles, float* __restrict__ part) {
  using Tile = typename TileOf<T, VEC>::type;
  __shared__ __align__(128) typename Tile::Smem stage;
  __shared__ __align__(128) float Cs[kBM * kLdC];

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t split = blockIdx.y;
  const int64_t n_splits = gridDim.y;

  // lane r (< 16) of warp w holds the running statistics of row 16 w + r of the block
  const int64_t my_row = row0 + warp * kRowsPerWarp + lane;
  float m = -__builtin_huge_valf(), s = 0.0f, sd = 0.0f, zt = -__builtin_huge_valf();
  const int64_t my_tgt = (lane < kRowsPerWarp && my_row < N) ? targets[my_row] : int64_t(-1);

  const int64_t t0 = split * tiles_per_split;
  const int64_t t1 = t0 + tiles_per_split < n_vtiles ? t0 + tiles_per_split : n_vtiles;
  for (int64_t vt = t0; vt < t1; ++vt) {
    const int64_t col0 = vt * kBN;
    Tile::run(stage, Cs, X, stride_x, row0, N, W, stride_w, col0, V, H);
    __syncthreads();  // Cs complete

    const bool ok0 = col0 + lane < V;
    const bool ok1 = col0 + lane + 32 < V;
#pragma unroll 4
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const float* zr = Cs + (warp * kRowsPerWarp + r) * kLdC;
      const float z0 = ok0 ? zr[lane] * inv_tau : kNegPad;
      const float z1 = ok1 ? zr[lane + 32] * inv_tau : kNegPad;
      const float m_old = __shfl_sync(0xffffffffu, m, r);
      const float m_new = fmaxf(m_old, warp_max(fmaxf(z0, z1)));
      const float d0 = z0 - m_new, d1 = z1 - m_new;
      const float e0 = expf(d0), e1 = expf(d1);
      const float se = warp_sum(e0 + e1);
      const float sde = warp_sum(e0 * d0 + e1 * d1);
      // the target logit, read from the same tile (so z_t <= m holds exactly)
      const int64_t tgt = __shfl_sync(0xffffffffu, my_tgt, r);
      if (lane == r) {
        mem1_lpe_rescale(m, m_new, &s, &sd);
        m = m_new;
        s += se;
        sd += sde;
        if (tgt >= col0 && tgt < col0 + kBN) zt = zr[tgt - col0] * inv_tau;
      }
    }
    // the next tile's main loop writes Cs only after its own barriers, which every warp reaches after this loop
  }
  if (lane < kRowsPerWarp && my_row < N) {
    const int64_t plane = n_splits * N;
    const int64_t i = split * N + my_row;
    part[i] = m;
    part[plane + i] = s;
    part[2 * plane + i] = sd;
    part[3 * plane + i] = zt;
  }
}

__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const float* __restrict__ part, int64_t N,
                                                                  int64_t n_splits, float* __restrict__ logp,
                                                                  float* __restrict__ entropy,
                                                                  float* __restrict__ stats) {
  const int64_t n = int64_t(blockIdx.x) * kCombineThreads + threadIdx.x;
  if (n >= N) return;
  const int64_t plane = n_splits * N;
  float m = -__builtin_huge_valf(), s = 0.0f, sd = 0.0f, zt = -__builtin_huge_valf();
  for (int64_t k = 0; k < n_splits; ++k) {
    const int64_t i = k * N + n;
    mem1_lpe_merge(&m, &s, &sd, part[i], part[plane + i], part[2 * plane + i]);
    zt = fmaxf(zt, part[3 * plane + i]);
  }
  float lp, ent, logs, mean_d;
  mem1_lpe_finalize(m, s, sd, zt, &lp, &ent, &logs, &mean_d);
  logp[n] = lp;
  entropy[n] = ent;
  stats[n] = m;
  stats[N + n] = logs;
  stats[2 * N + n] = mean_d;
}

// ---------------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------------
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class T>
bool vector_ok(const Mem1LogprobEntropyFwdParams& p) {
  constexpr int64_t E = 16 / sizeof(T);
  return p.H % E == 0 && p.stride_hidden % E == 0 && p.stride_weight % E == 0 &&
         reinterpret_cast<uintptr_t>(p.hidden) % 16 == 0 && reinterpret_cast<uintptr_t>(p.weight) % 16 == 0;
}

template <class T>
cudaError_t launch(const Mem1LogprobEntropyFwdParams* p, cudaStream_t stream) {
  if (p == nullptr || p->N < 0 || p->V < 1 || p->H < 1 || p->splits < 1 || !(p->inv_temperature > 0.0) ||
      p->stride_hidden < p->H || p->stride_weight < p->H || p->splits > 65535) {
    return cudaErrorInvalidValue;
  }
  if (p->N == 0) return cudaSuccess;
  if (!p->hidden || !p->weight || !p->targets || !p->logp || !p->entropy || !p->stats || !p->workspace) {
    return cudaErrorInvalidValue;
  }
  const int64_t n_vtiles = cdiv(p->V, kBN);
  const int64_t want = p->splits < n_vtiles ? p->splits : n_vtiles;
  const int64_t tps = cdiv(n_vtiles, want);
  const int64_t splits = cdiv(n_vtiles, tps);  // <= p->splits, none empty
  const int64_t row_blocks = cdiv(p->N, kBM);
  if (row_blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits));
  const T* X = static_cast<const T*>(p->hidden);
  const T* W = static_cast<const T*>(p->weight);
  const float inv_tau = static_cast<float>(p->inv_temperature);
  auto* partial = vector_ok<T>(*p) ? &partial_kernel<T, true> : &partial_kernel<T, false>;
  MEM1_LPE_LAUNCH(partial, grid, kThreads, stream, X, p->stride_hidden, W, p->stride_weight, p->targets, p->N, p->V,
                  p->H, inv_tau, tps, n_vtiles, p->workspace);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const unsigned combine_blocks = static_cast<unsigned>(cdiv(p->N, kCombineThreads));
  MEM1_LPE_LAUNCH(combine_kernel, combine_blocks, kCombineThreads, stream, p->workspace, p->N, splits, p->logp,
                  p->entropy, p->stats);
  return cudaGetLastError();
}

}  // namespace mem1_lpe

extern "C" {

cudaError_t mem1_logprob_entropy_fwd_f16(const Mem1LogprobEntropyFwdParams* p, cudaStream_t stream) {
  return mem1_lpe::launch<__half>(p, stream);
}

cudaError_t mem1_logprob_entropy_fwd_bf16(const Mem1LogprobEntropyFwdParams* p, cudaStream_t stream) {
  return mem1_lpe::launch<__nv_bfloat16>(p, stream);
}

cudaError_t mem1_logprob_entropy_fwd_f32(const Mem1LogprobEntropyFwdParams* p, cudaStream_t stream) {
  return mem1_lpe::launch<float>(p, stream);
}

int64_t mem1_logprob_entropy_fwd_splits(int64_t N, int64_t V, int64_t num_sms) {
  const int64_t row_blocks = mem1_lpe::cdiv(N > 0 ? N : 1, mem1_lpe::kBM);
  const int64_t n_vtiles = mem1_lpe::cdiv(V > 0 ? V : 1, mem1_lpe::kBN);
  int64_t want = mem1_lpe::cdiv(4 * (num_sms > 0 ? num_sms : 1), row_blocks);
  if (want > n_vtiles) want = n_vtiles;
  if (want > 65535) want = 65535;
  return want < 1 ? 1 : want;
}

int64_t mem1_logprob_entropy_fwd_workspace_bytes(int64_t N, int64_t splits) {
  return 4 * (splits > 0 ? splits : 1) * (N > 0 ? N : 0) * int64_t(sizeof(float));
}

}  // extern "C"
