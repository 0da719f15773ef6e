// mem1_fast state_attention -- CUDA kernels (raw pointers + stream; no torch headers). See state_attention.cuh
// for the contract and csrc/cuda/bindings_cuda.cpp for the torch binding.
//
// FlashAttention-2 structure over the block map of an interval visibility spec:
//   fwd   one CUDA block per (query block, query head), 4 warps x 16 query rows: walks the block's key tiles (full
//         ones without masking, partial ones -- and the ragged last key block -- masked in registers through
//         mem1_fast::vis::visible_row on the rows' intervals staged in shared memory), online softmax in base 2
//         (exp2, log2(e) folded into the scale), writes out and the natural-log LSE.
//   pre   one thread per (token, query head): lse2 = lse * log2(e) (+inf for a row with no visible key, so its
//         probabilities recompute to exactly 0) and delta = rowsum(dO * O), into the workspace.
//   dkdv  one CUDA block per (key block, kv head), 8 warps: walks the query blocks of the transposed map and, for
//         each, the G query heads of the GQA group inside the block; S^T, dP^T per (16 keys, 32 queries) warp
//         tile, P^T and dS^T through shared memory, dK / dV per (16 keys, D / 2 columns) warp tile, accumulated
//         in registers (no atomics, fixed order -> deterministic).
//   dq    one CUDA block per (query block, query head), 4 warps x 16 query rows: same walk as fwd, dQ in
//         registers.
//
// Tiles: BM = BN = 64. Tensor cores: mma.sync.m16n8k16 (f16 / bf16 in, f32 accumulate), operands from shared memory
// through ldmatrix(.trans), with a warp's accumulators reused as the next product's A operand (P V, dS K, ...).
// Shared tiles are [rows][D + 8] (16-byte row padding: the 8 rows one ldmatrix reads fall in distinct bank quads,
// no conflicts), filled with cp.async (16 B); rows beyond T are zero-filled, never read from global memory. The
// streamed tiles are double-buffered (the next tile's copy overlaps the current tile's math), except the forward's
// K / V at D = 128 (single buffers, V's copy overlapping Q K^T and the next K's overlapping P V; see kFwdStages).
// Shared memory per block, K intervals per row: fwd_smem / dq_smem / dkdv_smem below.
//
// Fragment conventions (PTX ISA, mma.m16n8k16 .f16/.bf16; g = lane / 4, c = lane % 4):
//   A 16x16 (row-major): reg0 = A[g][2c..2c+1], reg1 = A[g+8][2c..], reg2 = A[g][2c+8..], reg3 = A[g+8][2c+8..]
//   B 16x8 (k x n):      reg0 = B[2c..2c+1][g], reg1 = B[2c+8..2c+9][g]
//   C 16x8 (f32):        c[e] = C[g + 8 * (e / 2)][2c + e % 2]
// (lower 16 bits of a register = lower index). The index math lives in the small functions acc_row / acc_col /
// load_a / load_b_nk / load_b_kn / acc_to_a below and nowhere else.
//
// The same source compiles for a CPU emulator (-DMEM1_SA_EMULATE, g++): threads become fibers, warp collectives
// (shfl, ldmatrix, mma) and cp.async are emulated from the PTX definitions, so tests run these kernels, index math
// and pipeline included, without a GPU (tests/test_state_attention_cuda.py).
#include "state_attention.cuh"

#include "mem1_fast/visibility.h"

namespace mem1_sa {

namespace vis = mem1_fast::vis;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kDkdvThreads = 2 * kThreads;  // the dK / dV kernel: 8 warps, see bwd_dkdv_kernel
constexpr int kBM = MEM1_SA_BM;  // query rows per block (16 per warp)
constexpr int kBN = MEM1_SA_BN;  // keys per tile
constexpr int kPreThreads = 256;
constexpr int kMaxK = 16;  // intervals per row staged in shared memory (D = 128 dkdv: 137 KiB at K = 16)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();
static_assert(kBM == kWarps * 16, "each warp owns 16 rows of the block");
static_assert(kBN % 16 == 0, "key tiles are a multiple of the mma k step");

}  // namespace mem1_sa

// =================================================================================================================
// Primitives: CUDA (inline PTX) or the CPU emulator.
// =================================================================================================================
#if defined(MEM1_SA_EMULATE)

#include "emulator.h"

#define SA_DEV inline
#define SA_GLOBAL(nthreads, min_blocks) inline void
#define SA_UNROLL
#define SA_UNROLL2

namespace mem1_sa {
namespace emu = ::mem1_emu;  // the shared emulator (csrc/cuda/emulator.h)

SA_DEV int thread_id() { return emu::blk().cur; }
SA_DEV int block_x() { return static_cast<int>(emu::blk().bx); }
SA_DEV int block_y() { return static_cast<int>(emu::blk().by); }
template <class T>
SA_DEV T* smem_base() {
  return reinterpret_cast<T*>(emu::blk().smem.data());
}
SA_DEV void sync_threads() { emu::wait_at(emu::kBlockBar); }

SA_DEV float shfl_xor(float v, int mask) {
  uint64_t w;
  uint32_t u;
  std::memcpy(&u, &v, 4);
  w = u;
  const int par = emu::publish(&w, 1);
  u = static_cast<uint32_t>(emu::slot(par, (thread_id() & 31) ^ mask)[0]);
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

// ldmatrix .x4: lane 8 * i + r gives the address of row r of matrix i; lane l receives in register i the two
// elements (row l / 4, cols 2 * (l % 4) + {0, 1}) of matrix i -- or, with .trans, (rows 2 * (l % 4) + {0, 1},
// col l / 4).
inline void ldsm_emulated(uint32_t (&r)[4], const uint16_t* p, bool trans) {
  uint64_t w = reinterpret_cast<uint64_t>(p);
  const int par = emu::publish(&w, 1);
  const int lane = thread_id() & 31;
  for (int i = 0; i < 4; ++i) {
    uint16_t e[2];
    for (int h = 0; h < 2; ++h) {
      const int row = trans ? 2 * (lane % 4) + h : lane / 4;
      const int col = trans ? lane / 4 : 2 * (lane % 4) + h;
      const uint16_t* rowp = reinterpret_cast<const uint16_t*>(emu::slot(par, 8 * i + row)[0]);
      e[h] = rowp[col];
    }
    r[i] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
}
// Shared-memory addresses: plain pointers here, 32-bit shared-window addresses on the GPU.
using saddr_t = uintptr_t;
SA_DEV saddr_t saddr(const void* p) { return reinterpret_cast<uintptr_t>(p); }
SA_DEV void ldsm_x4(uint32_t (&r)[4], saddr_t a) { ldsm_emulated(r, reinterpret_cast<const uint16_t*>(a), false); }
SA_DEV void ldsm_x4_trans(uint32_t (&r)[4], saddr_t a) {
  ldsm_emulated(r, reinterpret_cast<const uint16_t*>(a), true);
}

// mma.m16n8k16, D = A * B + C, from the fragment layouts in the header comment: A[row][k] is half (k % 2) of
// register (row / 8) + 2 (k / 8) of lane 4 (row % 8) + (k % 8) / 2; B[k][n] is half (k % 2) of register k / 8 of
// lane 4 n + (k % 8) / 2.
template <class E>
SA_DEV void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint64_t w[6] = {a[0], a[1], a[2], a[3], b0, b1};
  const int par = emu::publish(w, 6);
  auto elem = [](uint64_t reg, int half) { return E::to_float(static_cast<uint16_t>((reg >> (16 * half)) & 0xffff)); };
  const int lane = thread_id() & 31, g = lane >> 2, c = lane & 3;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * c + (e & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) {
      const float x = elem(emu::slot(par, 4 * (row & 7) + ((k & 7) >> 1))[(row >> 3) + 2 * (k >> 3)], k & 1);
      const float y = elem(emu::slot(par, 4 * col + ((k & 7) >> 1))[4 + (k >> 3)], k & 1);
      acc += x * y;
    }
    d[e] += acc;
  }
}

SA_DEV void cp_async16(saddr_t s, const void* g) {
  emu::blk().pending[thread_id()].push_back({reinterpret_cast<void*>(s), g});
}
SA_DEV void cp_async_commit() {}
SA_DEV void cp_async_wait_all() {
  auto& q = emu::blk().pending[thread_id()];
  for (auto& c : q) std::memcpy(c.first, c.second, 16);
  q.clear();
}
SA_DEV void store_zero16(void* s) { std::memset(s, 0, 16); }
SA_DEV void load16(uint16_t (&x)[8], const uint16_t* g) { std::memcpy(x, g, 16); }
SA_DEV void store_u32(uint16_t* g, uint32_t v) { std::memcpy(g, &v, 4); }
SA_DEV float exp2_approx(float x) { return std::exp2(x); }

struct F16 {
  static uint32_t pack(float lo, float hi) {
    const _Float16 h[2] = {static_cast<_Float16>(lo), static_cast<_Float16>(hi)};
    uint32_t u;
    std::memcpy(&u, h, 4);
    return u;
  }
  static float to_float(uint16_t x) {  // table: the software f16 -> f32 conversion dominates otherwise
    static const std::vector<float> table = [] {
      std::vector<float> t(65536);
      for (uint32_t i = 0; i < 65536; ++i) {
        const uint16_t b = static_cast<uint16_t>(i);
        _Float16 h;
        std::memcpy(&h, &b, 2);
        t[i] = static_cast<float>(h);
      }
      return t;
    }();
    return table[x];
  }
};
struct BF16 {
  static uint32_t bits(float f) {  // round to nearest even
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  }
  static uint32_t pack(float lo, float hi) { return bits(lo) | (bits(hi) << 16); }
  static float to_float(uint16_t x) {
    const uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

#else  // CUDA

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define SA_DEV __device__ __forceinline__
#define SA_GLOBAL(nthreads, min_blocks) __global__ void __launch_bounds__(nthreads, min_blocks)
#define SA_UNROLL _Pragma("unroll")
#define SA_UNROLL2 _Pragma("unroll 2")  // k loops that index no register array: bounds the loads ptxas hoists

namespace mem1_sa {

SA_DEV int thread_id() { return static_cast<int>(threadIdx.x); }
SA_DEV int block_x() { return static_cast<int>(blockIdx.x); }
SA_DEV int block_y() { return static_cast<int>(blockIdx.y); }
template <class T>
SA_DEV T* smem_base() {
  extern __shared__ __align__(16) unsigned char mem1_sa_smem[];
  return reinterpret_cast<T*>(mem1_sa_smem);
}
SA_DEV void sync_threads() { __syncthreads(); }
SA_DEV float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
// Shared-memory addresses: 32-bit addresses in the shared window (cheaper than generic pointers).
using saddr_t = uint32_t;
SA_DEV saddr_t saddr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

SA_DEV void ldsm_x4(uint32_t (&r)[4], saddr_t a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
SA_DEV void ldsm_x4_trans(uint32_t (&r)[4], saddr_t a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

struct F16;
struct BF16;
template <class E>
SA_DEV void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
SA_DEV void mma_16816<F16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
SA_DEV void mma_16816<BF16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

SA_DEV void cp_async16(saddr_t s, const void* g) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(g));
}
SA_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
SA_DEV void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
SA_DEV void store_zero16(void* s) { *reinterpret_cast<uint4*>(s) = make_uint4(0u, 0u, 0u, 0u); }
SA_DEV void load16(uint16_t (&x)[8], const uint16_t* g) {
  const uint4 u = *reinterpret_cast<const uint4*>(g);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
  SA_UNROLL
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = static_cast<uint16_t>(w[i] & 0xffffu);
    x[2 * i + 1] = static_cast<uint16_t>(w[i] >> 16);
  }
}
SA_DEV void store_u32(uint16_t* g, uint32_t v) { *reinterpret_cast<uint32_t*>(g) = v; }
SA_DEV float exp2_approx(float x) {  // ex2.approx(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

struct F16 {
  SA_DEV static uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  SA_DEV static float to_float(uint16_t x) { return __half2float(__ushort_as_half(x)); }
};
struct BF16 {
  SA_DEV static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  SA_DEV static float to_float(uint16_t x) { return __uint_as_float(static_cast<uint32_t>(x) << 16); }
};

#endif  // MEM1_SA_EMULATE

// =================================================================================================================
// Index math: fragments, tiles, tile lists. Shared by all kernels; the only place these formulas appear.
// =================================================================================================================

// Shared-memory tile of `rows` x D elements: row r, column c at r * kPitch<D> + c.
template <int D>
constexpr int kPitch = D + 8;

// Accumulator element e (0..3) of n-tile j: row (of the warp's 16) and column (of the tile).
SA_DEV int acc_row(int lane, int e) { return (lane >> 2) + ((e >> 1) << 3); }
SA_DEV int acc_col(int lane, int j, int e) { return (j << 3) + ((lane & 3) << 1) + (e & 1); }

// A shared tile [rows][kPitch<D>] as the lanes of a warp address it for ldmatrix .x4 (lane 8 i + r gives row r of
// matrix i). Two lane patterns, precomputed once per tile:
//   `rows`: matrices (r, c), (r + 8, c), (r, c + 8), (r + 8, c + 8)  -- A operands, and B operands with .trans
//   `cols`: matrices (r, c), (r, c + 8), (r + 8, c), (r + 8, c + 8)  -- B operands stored [N][K]
template <int D>
struct SmemTile {
  saddr_t rows, cols;
  SA_DEV SmemTile(const uint16_t* tile, int lane)
      : rows(saddr(tile + ((lane & 7) + (lane & 8)) * kPitch<D> + ((lane >> 4) << 3))),
        cols(saddr(tile + ((lane & 7) + ((lane >> 4) << 3)) * kPitch<D> + (lane & 8))) {}
  // byte offset of element (r, c)
  SA_DEV static int at(int r, int c) { return (r * kPitch<D> + c) * 2; }
};

// A operand (16 x 16) from a row-major [M][K] tile: rows r0..r0+15, columns c0..c0+15. ldmatrix matrices
// (r0, c0), (r0 + 8, c0), (r0, c0 + 8), (r0 + 8, c0 + 8) = registers 0..3 of the A fragment.
template <int D>
SA_DEV void load_a(uint32_t (&a)[4], const SmemTile<D>& t, int r0, int c0) {
  ldsm_x4(a, t.rows + SmemTile<D>::at(r0, c0));
}

// B operands of two n-tiles (n0..n0+7 -> b[0], b[1]; n0+8..n0+15 -> b[2], b[3]), k = k0..k0+15, from a tile
// stored [N][K] (B^T row-major, e.g. K[key][d] for S = Q K^T). Matrices: (n0, k0), (n0, k0 + 8), (n0 + 8, k0),
// (n0 + 8, k0 + 8); lane l of matrix (n, k) holds stored[n + l/4][k + 2(l%4)..] = B[k + 2(l%4)..][n + l/4].
template <int D>
SA_DEV void load_b_nk(uint32_t (&b)[4], const SmemTile<D>& t, int n0, int k0) {
  ldsm_x4(b, t.cols + SmemTile<D>::at(n0, k0));
}

// B operands of two n-tiles, k = k0..k0+15, from a tile stored [K][N] (B row-major, e.g. V[key][d] for P V), with
// ldmatrix.trans. Matrices: (k0, n0), (k0 + 8, n0), (k0, n0 + 8), (k0 + 8, n0 + 8); lane l of matrix (k, n) holds
// stored[k + 2(l%4)..][n + l/4] = B[k + 2(l%4)..][n + l/4].
template <int D>
SA_DEV void load_b_kn(uint32_t (&b)[4], const SmemTile<D>& t, int k0, int n0) {
  ldsm_x4_trans(b, t.rows + SmemTile<D>::at(k0, n0));
}

// A operand (16 x 16, k = 16 kk .. 16 kk + 15) from the f32 accumulators of n-tiles 2 kk (c0) and 2 kk + 1 (c1).
template <class E>
SA_DEV void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = E::pack(c0[0], c0[1]);
  a[1] = E::pack(c0[2], c0[3]);
  a[2] = E::pack(c1[0], c1[1]);
  a[3] = E::pack(c1[2], c1[3]);
}

// Copy rows [row0, row0 + ROWS) of a [T, *, D] tensor (`g` already offset to the head) into a shared tile with
// cp.async; rows >= T are zero-filled.
template <int ROWS, int D, int NT = kThreads>
SA_DEV void load_rows_async(uint16_t* s, const uint16_t* g, int64_t row0, int64_t T, int64_t stride_t) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert((ROWS * kChunks) % NT == 0, "tile chunks must split evenly over the threads");
  const int tid = thread_id();
  SA_UNROLL
  for (int it = 0; it < ROWS * kChunks / NT; ++it) {
    const int i = tid + it * NT;
    const int r = i / kChunks, c = i % kChunks;
    uint16_t* dst = s + r * kPitch<D> + c * 8;
    const int64_t row = row0 + r;
    if (row < T) {
      cp_async16(saddr(dst), g + row * stride_t + c * 8);
    } else {
      store_zero16(dst);
    }
  }
}

// The intervals of rows [row0, row0 + kBM), [kBM][K] into shared memory; rows >= T get empty intervals.
template <int NT = kThreads>
SA_DEV void stage_intervals(int32_t* s_lo, int32_t* s_hi, const int32_t* lo, const int32_t* hi, int64_t row0,
                            int64_t T, int64_t K) {
  for (int64_t i = thread_id(); i < kBM * K; i += NT) {
    const bool in = row0 + i / K < T;
    s_lo[i] = in ? lo[row0 * K + i] : 0;
    s_hi[i] = in ? hi[row0 * K + i] : 0;
  }
}

// Does query row `row_local` (of the staged block) see key column `col`? The shared interval logic.
SA_DEV bool staged_visible(const int32_t* s_lo, const int32_t* s_hi, int64_t K, int row_local, int64_t col) {
  return vis::visible_row(s_lo + row_local * K, s_hi + row_local * K, K, col);
}

// The tiles one CSR row of the block map lists: full ones first, then partial ones.
struct TileList {
  const int32_t* full;
  const int32_t* part;
  int nf, np;
  SA_DEV TileList(const int32_t* full_ptr, const int32_t* full_idx, const int32_t* part_ptr, const int32_t* part_idx,
                  int64_t b) {
    const int32_t f0 = full_ptr[b], p0 = part_ptr[b];
    full = full_idx + f0;
    part = part_idx + p0;
    nf = full_ptr[b + 1] - f0;
    np = part_ptr[b + 1] - p0;
  }
  SA_DEV int size() const { return nf + np; }
  SA_DEV bool partial(int i) const { return i >= nf; }
  SA_DEV int64_t block(int i) const { return i < nf ? full[i] : part[i - nf]; }
};

// A tile needs the per-element mask when it is partial, or when it is the ragged last key block (columns >= T
// are not part of a FULL tile's clipped area; their zero-filled keys must not enter the softmax).
SA_DEV bool needs_mask(bool partial, int64_t kb, int64_t T) { return partial || (kb + 1) * kBN > T; }

SA_DEV const uint16_t* head_ptr(const void* base, int64_t h, int64_t stride_h) {
  return static_cast<const uint16_t*>(base) + h * stride_h;
}
SA_DEV uint16_t* head_ptr_mut(void* base, int64_t h, int64_t stride_h) {
  return static_cast<uint16_t*>(base) + h * stride_h;
}

// Store a warp's 16 x W f32 accumulator (W / 8 n-tiles) times `mul` (per row) at rows base_row + acc_row and
// columns col0 + acc_col; rows >= T skipped.
template <int W, class E>
SA_DEV void store_rows(uint16_t* g, int64_t stride_t, int64_t base_row, int col0, int64_t T,
                       const float (&acc)[W / 8][4], const float (&mul)[2], int lane) {
  SA_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int64_t row = base_row + acc_row(lane, 2 * r);
    if (row >= T) continue;
    uint16_t* dst = g + row * stride_t + col0;
    SA_UNROLL
    for (int j = 0; j < W / 8; ++j) {
      store_u32(dst + acc_col(lane, j, 2 * r), E::pack(acc[j][2 * r] * mul[r], acc[j][2 * r + 1] * mul[r]));
    }
  }
}

// =================================================================================================================
// Kernels
// =================================================================================================================

// Shared memory of each kernel, in bytes (K = intervals per row).
template <int D>
constexpr int64_t tile_bytes(int rows) {
  return static_cast<int64_t>(rows) * kPitch<D> * 2;
}
// K / V buffers of the forward: double-buffered (the next tile's copy overlaps the whole current tile) at D = 64;
// single at D = 128 (V's copy overlaps S = Q K^T, the next K's copy overlaps P V, as in FlashAttention-2), which
// halves that kernel's shared memory (86 -> 52 KiB) so that two blocks fit on an A100 SM, as its registers allow.
template <int D>
constexpr int kFwdStages = D <= 64 ? 2 : 1;

template <int D>
int64_t fwd_smem(int64_t K) {
  return tile_bytes<D>(kBM) + 2 * kFwdStages<D> * tile_bytes<D>(kBN) + 2 * kBM * K * 4;
}
template <int D>
int64_t dq_smem(int64_t K) {
  return 2 * tile_bytes<D>(kBM) + 4 * tile_bytes<D>(kBN) + 2 * kBM * K * 4;
}
template <int D>
int64_t dkdv_smem(int64_t K) {
  return 2 * tile_bytes<D>(kBN) + 4 * tile_bytes<D>(kBM) + 2 * tile_bytes<kBM>(kBN) + 4 * kBM * 4 + 4 * kBM * K * 4;
}

// Keys per inner step of the dQ kernel: bounds the live S / dP accumulators next to the dQ ones (D / 2 floats per
// thread), so that nothing spills.
template <int D>
constexpr int kDqChunk = 32;

// ---- forward ------------------------------------------------------------------------------------------------
template <int D, class E>
SA_GLOBAL(kThreads, 1) fwd_kernel(const Mem1StateAttnParams p) {
  constexpr int P = kPitch<D>;
  constexpr int NS = kBN / 8;  // n-tiles of S (keys)
  constexpr int NO = D / 8;    // n-tiles of O (head dim)
  constexpr int KD = D / 16;   // k-steps over the head dim
  constexpr int S = kFwdStages<D>;
  const int64_t T = p.T, K = p.K;
  uint16_t* sQ = smem_base<uint16_t>();
  uint16_t* sK = sQ + kBM * P;      // [S][kBN * P]
  uint16_t* sV = sK + S * kBN * P;  // [S][kBN * P]
  int32_t* sLo = reinterpret_cast<int32_t*>(sV + S * kBN * P);
  int32_t* sHi = sLo + kBM * K;

  const int64_t qb = block_x(), h = block_y();
  const int64_t kvh = h / (p.Hq / p.Hkv);
  const int tid = thread_id(), warp = tid >> 5, lane = tid & 31;
  const int64_t q0 = qb * kBM;
  const uint16_t* qg = head_ptr(p.q, h, p.q_stride_h);
  const uint16_t* kg = head_ptr(p.k, kvh, p.k_stride_h);
  const uint16_t* vg = head_ptr(p.v, kvh, p.v_stride_h);
  const TileList tiles(p.full_ptr, p.full_idx, p.partial_ptr, p.partial_idx, qb);
  const int n = tiles.size();
  const float sl2 = static_cast<float>(p.scale) * kLog2e;

  stage_intervals(sLo, sHi, p.lo, p.hi, q0, T, K);
  load_rows_async<kBM, D>(sQ, qg, q0, T, p.q_stride_t);
  if (n > 0) {
    load_rows_async<kBN, D>(sK, kg, tiles.block(0) * kBN, T, p.k_stride_t);
    if (S == 2) load_rows_async<kBN, D>(sV, vg, tiles.block(0) * kBN, T, p.v_stride_t);
  }
  cp_async_commit();
  cp_async_wait_all();
  sync_threads();

  const SmemTile<D> tQ(sQ, lane);

  float o[NO][4];
  SA_UNROLL
  for (int j = 0; j < NO; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m[2] = {-kInf, -kInf}, l[2] = {0.f, 0.f};  // running max (log2 units) and this thread's partial sums

  for (int i = 0; i < n; ++i) {
    const int buf = S == 2 ? (i & 1) : 0;
    const int64_t kb = tiles.block(i);
    if (i > 0) {  // K (2 stages: K and V) of tile i has landed; every thread is done with tile i - 1
      cp_async_wait_all();
      sync_threads();
    }
    if (S == 2) {  // prefetch tile i + 1 into the other buffer
      if (i + 1 < n) {
        const int64_t kn = tiles.block(i + 1) * kBN;
        load_rows_async<kBN, D>(sK + (buf ^ 1) * kBN * P, kg, kn, T, p.k_stride_t);
        load_rows_async<kBN, D>(sV + (buf ^ 1) * kBN * P, vg, kn, T, p.v_stride_t);
      }
    } else {  // V of tile i, while S is computed
      load_rows_async<kBN, D>(sV, vg, kb * kBN, T, p.v_stride_t);
    }
    cp_async_commit();
    const SmemTile<D> tK(sK + buf * kBN * P, lane), tV(sV + buf * kBN * P, lane);

    // S = Q K^T (log2 units)
    float s[NS][4];
    SA_UNROLL
    for (int j = 0; j < NS; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    SA_UNROLL2
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t a[4];
      load_a<D>(a, tQ, warp * 16, kk * 16);
      SA_UNROLL
      for (int jn = 0; jn < NS / 2; ++jn) {
        uint32_t b[4];
        load_b_nk<D>(b, tK, jn * 16, kk * 16);
        mma_16816<E>(s[2 * jn], a, b[0], b[1]);
        mma_16816<E>(s[2 * jn + 1], a, b[2], b[3]);
      }
    }
    SA_UNROLL
    for (int j = 0; j < NS; ++j) {
      SA_UNROLL
      for (int e = 0; e < 4; ++e) s[j][e] *= sl2;
    }
    if (needs_mask(tiles.partial(i), kb, T)) {
      SA_UNROLL
      for (int j = 0; j < NS; ++j) {
        SA_UNROLL
        for (int e = 0; e < 4; ++e) {
          if (!staged_visible(sLo, sHi, K, warp * 16 + acc_row(lane, e), kb * kBN + acc_col(lane, j, e))) {
            s[j][e] = -kInf;
          }
        }
      }
    }

    // online softmax: the row max over the quad (4 lanes share a row), rescale, exponentiate
    float mx[2] = {m[0], m[1]};
    SA_UNROLL
    for (int j = 0; j < NS; ++j) {
      SA_UNROLL
      for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
    }
    float m_use[2];
    SA_UNROLL
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], shfl_xor(mx[r], 1));
      mx[r] = fmaxf(mx[r], shfl_xor(mx[r], 2));
      m_use[r] = mx[r] == -kInf ? 0.f : mx[r];  // nothing seen yet: exp2(-inf - 0) = 0, never NaN
      const float alpha = exp2_approx(m[r] - m_use[r]);
      m[r] = mx[r];
      l[r] *= alpha;
      SA_UNROLL
      for (int j = 0; j < NO; ++j) {
        o[j][2 * r] *= alpha;
        o[j][2 * r + 1] *= alpha;
      }
    }
    SA_UNROLL
    for (int j = 0; j < NS; ++j) {
      SA_UNROLL
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2_approx(s[j][e] - m_use[e >> 1]);
        l[e >> 1] += s[j][e];
      }
    }

    if (S == 1) {
      cp_async_wait_all();  // V of tile i has landed ...
      sync_threads();       // ... for every thread, and every thread is done with K of tile i
      if (i + 1 < n) load_rows_async<kBN, D>(sK, kg, tiles.block(i + 1) * kBN, T, p.k_stride_t);
      cp_async_commit();  // K of tile i + 1, while P V is computed
    }

    // O += P V
    SA_UNROLL
    for (int kc = 0; kc < NS / 2; ++kc) {
      uint32_t a[4];
      acc_to_a<E>(a, s[2 * kc], s[2 * kc + 1]);
      SA_UNROLL
      for (int jd = 0; jd < NO / 2; ++jd) {
        uint32_t b[4];
        load_b_kn<D>(b, tV, kc * 16, jd * 16);
        mma_16816<E>(o[2 * jd], a, b[0], b[1]);
        mma_16816<E>(o[2 * jd + 1], a, b[2], b[3]);
      }
    }
  }

  // epilogue: full row sums, normalize, LSE (natural log); a row that saw nothing: out 0, lse -inf
  float inv[2];
  SA_UNROLL
  for (int r = 0; r < 2; ++r) {
    l[r] += shfl_xor(l[r], 1);
    l[r] += shfl_xor(l[r], 2);
    inv[r] = l[r] == 0.f ? 0.f : 1.f / l[r];
  }
  SA_UNROLL
  for (int r = 0; r < 2; ++r) {
    if (l[r] == 0.f) {  // o may hold 0 * (non-finite V) of masked columns: force the defined 0
      SA_UNROLL
      for (int j = 0; j < NO; ++j) o[j][2 * r] = o[j][2 * r + 1] = 0.f;
    }
  }
  const int64_t row_base = q0 + warp * 16;
  store_rows<D, E>(head_ptr_mut(p.out, h, p.out_stride_h), p.out_stride_t, row_base, 0, T, o, inv, lane);
  if ((lane & 3) == 0) {
    SA_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int64_t row = row_base + acc_row(lane, 2 * r);
      if (row < T) p.lse[h * T + row] = l[r] == 0.f ? -kInf : (m[r] + log2f(l[r])) * kLn2;
    }
  }
}

// ---- backward: preprocess -----------------------------------------------------------------------------------
// workspace[0][h][t] = lse2 = lse * log2(e) (+inf where lse = -inf: that row's probabilities recompute to 0),
// workspace[1][h][t] = delta = sum_d dO * O.
template <int D, class E>
SA_GLOBAL(kPreThreads, 4) bwd_pre_kernel(const Mem1StateAttnParams p) {
  const int64_t idx = static_cast<int64_t>(block_x()) * kPreThreads + thread_id();
  if (idx >= p.T * p.Hq) return;
  const int64_t t = idx / p.Hq, h = idx % p.Hq;
  const uint16_t* dorow = head_ptr(p.dout, h, p.dout_stride_h) + t * p.dout_stride_t;
  const uint16_t* orow = head_ptr(p.out, h, p.out_stride_h) + t * p.out_stride_t;
  float acc = 0.f;
  SA_UNROLL
  for (int c = 0; c < D; c += 8) {
    uint16_t x[8], y[8];
    load16(x, dorow + c);
    load16(y, orow + c);
    SA_UNROLL
    for (int e = 0; e < 8; ++e) acc += E::to_float(x[e]) * E::to_float(y[e]);
  }
  const float lse = p.lse[h * p.T + t];
  p.workspace[h * p.T + t] = lse == -kInf ? kInf : lse * kLog2e;
  p.workspace[p.Hq * p.T + h * p.T + t] = acc;
}

// ---- backward: dK, dV -----------------------------------------------------------------------------------------
// One CUDA block per (key block kb, kv head), 8 warps; warp w has key group kg = w % 4 (keys k0 + 16 kg .. + 15)
// and half = w / 4. Per work item (query block of the transposed map, query head of the GQA group):
//   1. warp (kg, half) computes, for its 16 keys and the query half [32 half, 32 half + 32):
//        S^T = K Q^T, P^T = exp2(S^T * scale * log2e - lse2) (masked -> 0), dP^T = V dO^T,
//        dS^T = P^T (dP^T - delta), and writes P^T and dS^T (f16 / bf16) to shared tiles [64 keys][64 queries];
//   2. barrier; warp (kg, half) accumulates, for its 16 keys and the head-dim half [D/2 half, D/2 half + D/2):
//        dV += P^T dO, dK += dS^T Q  (k = all 64 queries of the item).
// Splitting the head dim in step 2 halves the dK / dV accumulators per thread (FlashAttention-2's layout); no
// atomics, a fixed order over items -> deterministic. Finally dK *= scale.
template <int D, class E>
SA_GLOBAL(kDkdvThreads, 1) bwd_dkdv_kernel(const Mem1StateAttnParams p) {
  constexpr int NT = kDkdvThreads;
  constexpr int P = kPitch<D>;
  constexpr int PS = kPitch<kBM>;  // P^T / dS^T tiles: [kBN keys][kBM queries]
  constexpr int QH = kBM / 2;      // queries per warp in step 1
  constexpr int NQ = QH / 8;       // n-tiles of S^T per warp
  constexpr int DH = D / 2;        // head-dim columns per warp in step 2
  constexpr int NO = DH / 8;       // n-tiles of dK / dV per warp
  constexpr int KD = D / 16;       // k-steps over the head dim (step 1)
  constexpr int KQ = kBM / 16;     // k-steps over the queries (step 2)
  static_assert(kBN == 4 * 16, "four key groups of 16");
  const int64_t T = p.T, K = p.K;
  uint16_t* sK = smem_base<uint16_t>();
  uint16_t* sV = sK + kBN * P;
  uint16_t* sQ = sV + kBN * P;       // [2][kBM * P]
  uint16_t* sdO = sQ + 2 * kBM * P;  // [2][kBM * P]
  uint16_t* sPt = sdO + 2 * kBM * P;  // [kBN * PS]
  uint16_t* sdSt = sPt + kBN * PS;    // [kBN * PS]
  float* sL = reinterpret_cast<float*>(sdSt + kBN * PS);  // [2][kBM] lse2
  float* sDel = sL + 2 * kBM;                               // [2][kBM] delta
  int32_t* sLo = reinterpret_cast<int32_t*>(sDel + 2 * kBM);  // [2][kBM * K]
  int32_t* sHi = sLo + 2 * kBM * K;

  const int64_t kb = block_x(), kvh = block_y();
  const int G = static_cast<int>(p.Hq / p.Hkv);
  const int tid = thread_id(), warp = tid >> 5, lane = tid & 31;
  const int kg = warp & 3, half = warp >> 2;
  const int64_t k0 = kb * kBN;
  const TileList tiles(p.t_full_ptr, p.t_full_idx, p.t_partial_ptr, p.t_partial_idx, kb);
  const int n_tiles = tiles.size();
  const float sl2 = static_cast<float>(p.scale) * kLog2e;
  const float* ws_lse2 = p.workspace;
  const float* ws_delta = p.workspace + p.Hq * T;

  // Work items: (tile i of the list, head hh of the GQA group), hh fastest.
  auto load_item = [&](int i, int hh, int buf) {
    const int64_t qb = tiles.block(i);
    const int64_t h = kvh * G + hh;
    const int64_t row0 = qb * kBM;
    load_rows_async<kBM, D, NT>(sQ + buf * kBM * P, head_ptr(p.q, h, p.q_stride_h), row0, T, p.q_stride_t);
    load_rows_async<kBM, D, NT>(sdO + buf * kBM * P, head_ptr(p.dout, h, p.dout_stride_h), row0, T,
                                p.dout_stride_t);
    for (int r = tid; r < kBM; r += NT) {
      const int64_t row = row0 + r;
      sL[buf * kBM + r] = row < T ? ws_lse2[h * T + row] : kInf;
      sDel[buf * kBM + r] = row < T ? ws_delta[h * T + row] : 0.f;
    }
    stage_intervals<NT>(sLo + buf * kBM * K, sHi + buf * kBM * K, p.lo, p.hi, row0, T, K);
  };

  load_rows_async<kBN, D, NT>(sK, head_ptr(p.k, kvh, p.k_stride_h), k0, T, p.k_stride_t);
  load_rows_async<kBN, D, NT>(sV, head_ptr(p.v, kvh, p.v_stride_h), k0, T, p.v_stride_t);
  if (n_tiles > 0) load_item(0, 0, 0);
  cp_async_commit();

  const SmemTile<D> tK(sK, lane), tV(sV, lane);
  const SmemTile<kBM> tPt(sPt, lane), tdSt(sdSt, lane);
  float dk[NO][4], dv[NO][4];
  SA_UNROLL
  for (int j = 0; j < NO; ++j) {
    dk[j][0] = dk[j][1] = dk[j][2] = dk[j][3] = 0.f;
    dv[j][0] = dv[j][1] = dv[j][2] = dv[j][3] = 0.f;
  }

  int buf = 0;
  for (int i = 0; i < n_tiles; ++i) {
    const bool masked = needs_mask(tiles.partial(i), kb, T);
    for (int hh = 0; hh < G; ++hh, buf ^= 1) {
      cp_async_wait_all();  // this item has landed (and, for the first one, K / V)
      sync_threads();       // ... for every thread; everyone is done with the previous item (its Q / dO buffer
                            // and the P^T / dS^T tiles are free)
      if (hh + 1 < G) {
        load_item(i, hh + 1, buf ^ 1);
      } else if (i + 1 < n_tiles) {
        load_item(i + 1, 0, buf ^ 1);
      }
      cp_async_commit();
      const SmemTile<D> tQ(sQ + buf * kBM * P, lane), tdO(sdO + buf * kBM * P, lane);
      const float* tL = sL + buf * kBM;
      const float* tDel = sDel + buf * kBM;
      const int32_t* tLo = sLo + buf * kBM * K;
      const int32_t* tHi = sHi + buf * kBM * K;

      // step 1: S^T = K Q^T for keys 16 kg.. and queries QH half..
      float st[NQ][4];
      SA_UNROLL
      for (int j = 0; j < NQ; ++j) st[j][0] = st[j][1] = st[j][2] = st[j][3] = 0.f;
      SA_UNROLL2
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t a[4];
        load_a<D>(a, tK, kg * 16, kk * 16);
        SA_UNROLL
        for (int jn = 0; jn < NQ / 2; ++jn) {
          uint32_t b[4];
          load_b_nk<D>(b, tQ, half * QH + jn * 16, kk * 16);
          mma_16816<E>(st[2 * jn], a, b[0], b[1]);
          mma_16816<E>(st[2 * jn + 1], a, b[2], b[3]);
        }
      }
      // P^T
      SA_UNROLL
      for (int j = 0; j < NQ; ++j) {
        SA_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int qi = half * QH + acc_col(lane, j, e);  // query row within the block
          float pe = exp2_approx(fmaf(st[j][e], sl2, -tL[qi]));
          if (masked && !staged_visible(tLo, tHi, K, qi, k0 + kg * 16 + acc_row(lane, e))) pe = 0.f;
          st[j][e] = pe;
        }
      }
      // dP^T = V dO^T
      float dpt[NQ][4];
      SA_UNROLL
      for (int j = 0; j < NQ; ++j) dpt[j][0] = dpt[j][1] = dpt[j][2] = dpt[j][3] = 0.f;
      SA_UNROLL2
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t a[4];
        load_a<D>(a, tV, kg * 16, kk * 16);
        SA_UNROLL
        for (int jn = 0; jn < NQ / 2; ++jn) {
          uint32_t b[4];
          load_b_nk<D>(b, tdO, half * QH + jn * 16, kk * 16);
          mma_16816<E>(dpt[2 * jn], a, b[0], b[1]);
          mma_16816<E>(dpt[2 * jn + 1], a, b[2], b[3]);
        }
      }
      // dS^T = P^T (dP^T - delta), exactly 0 where P^T is 0 (masked, or a row that takes no part); publish both
      SA_UNROLL
      for (int j = 0; j < NQ; ++j) {
        SA_UNROLL
        for (int r = 0; r < 2; ++r) {
          float ds[2];
          SA_UNROLL
          for (int c = 0; c < 2; ++c) {
            const int e = 2 * r + c;
            const int qi = half * QH + acc_col(lane, j, e);
            ds[c] = st[j][e] == 0.f ? 0.f : st[j][e] * (dpt[j][e] - tDel[qi]);
          }
          const int off = (kg * 16 + acc_row(lane, 2 * r)) * PS + half * QH + acc_col(lane, j, 2 * r);
          store_u32(sPt + off, E::pack(st[j][2 * r], st[j][2 * r + 1]));
          store_u32(sdSt + off, E::pack(ds[0], ds[1]));
        }
      }
      sync_threads();  // P^T / dS^T of all 64 queries are in shared memory

      // step 2: dV += P^T dO, dK += dS^T Q for keys 16 kg.. and head-dim columns DH half..
      SA_UNROLL
      for (int kq = 0; kq < KQ; ++kq) {
        uint32_t a[4];
        load_a<kBM>(a, tPt, kg * 16, kq * 16);
        SA_UNROLL
        for (int jd = 0; jd < NO / 2; ++jd) {
          uint32_t b[4];
          load_b_kn<D>(b, tdO, kq * 16, half * DH + jd * 16);
          mma_16816<E>(dv[2 * jd], a, b[0], b[1]);
          mma_16816<E>(dv[2 * jd + 1], a, b[2], b[3]);
        }
      }
      SA_UNROLL
      for (int kq = 0; kq < KQ; ++kq) {
        uint32_t a[4];
        load_a<kBM>(a, tdSt, kg * 16, kq * 16);
        SA_UNROLL
        for (int jd = 0; jd < NO / 2; ++jd) {
          uint32_t b[4];
          load_b_kn<D>(b, tQ, kq * 16, half * DH + jd * 16);
          mma_16816<E>(dk[2 * jd], a, b[0], b[1]);
          mma_16816<E>(dk[2 * jd + 1], a, b[2], b[3]);
        }
      }
    }
  }

  const float scale = static_cast<float>(p.scale);
  const float mul_k[2] = {scale, scale}, mul_v[2] = {1.f, 1.f};
  const int64_t key_base = k0 + kg * 16;
  store_rows<DH, E>(head_ptr_mut(p.dk, kvh, p.dk_stride_h), p.dk_stride_t, key_base, half * DH, T, dk, mul_k, lane);
  store_rows<DH, E>(head_ptr_mut(p.dv, kvh, p.dv_stride_h), p.dv_stride_t, key_base, half * DH, T, dv, mul_v, lane);
}

// ---- backward: dQ ---------------------------------------------------------------------------------------------
// Warp w owns query rows q0 + 16 w .. + 15; per key tile and chunk of KC keys: S = Q K^T, P = exp2(S * scale *
// log2e - lse2) (masked -> 0), dP = dO V^T, dS = P (dP - delta), dQ += dS K; finally dQ *= scale.
template <int D, class E>
SA_GLOBAL(kThreads, 1) bwd_dq_kernel(const Mem1StateAttnParams p) {
  constexpr int P = kPitch<D>;
  constexpr int KC = kDqChunk<D>;  // keys per step
  constexpr int NC = KC / 8;
  constexpr int NO = D / 8;
  constexpr int KD = D / 16;
  static_assert(kBN % KC == 0 && KC % 16 == 0, "key chunk");
  const int64_t T = p.T, K = p.K;
  uint16_t* sQ = smem_base<uint16_t>();
  uint16_t* sdO = sQ + kBM * P;
  uint16_t* sK = sdO + kBM * P;     // [2][kBN * P]
  uint16_t* sV = sK + 2 * kBN * P;  // [2][kBN * P]
  int32_t* sLo = reinterpret_cast<int32_t*>(sV + 2 * kBN * P);
  int32_t* sHi = sLo + kBM * K;

  const int64_t qb = block_x(), h = block_y();
  const int64_t kvh = h / (p.Hq / p.Hkv);
  const int tid = thread_id(), warp = tid >> 5, lane = tid & 31;
  const int64_t q0 = qb * kBM;
  const uint16_t* kg = head_ptr(p.k, kvh, p.k_stride_h);
  const uint16_t* vg = head_ptr(p.v, kvh, p.v_stride_h);
  const TileList tiles(p.full_ptr, p.full_idx, p.partial_ptr, p.partial_idx, qb);
  const int n = tiles.size();
  const float sl2 = static_cast<float>(p.scale) * kLog2e;

  float lse2[2], delta[2];  // of this thread's two rows
  SA_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int64_t row = q0 + warp * 16 + acc_row(lane, 2 * r);
    lse2[r] = row < T ? p.workspace[h * T + row] : kInf;
    delta[r] = row < T ? p.workspace[p.Hq * T + h * T + row] : 0.f;
  }

  stage_intervals(sLo, sHi, p.lo, p.hi, q0, T, K);
  load_rows_async<kBM, D>(sQ, head_ptr(p.q, h, p.q_stride_h), q0, T, p.q_stride_t);
  load_rows_async<kBM, D>(sdO, head_ptr(p.dout, h, p.dout_stride_h), q0, T, p.dout_stride_t);
  if (n > 0) {
    load_rows_async<kBN, D>(sK, kg, tiles.block(0) * kBN, T, p.k_stride_t);
    load_rows_async<kBN, D>(sV, vg, tiles.block(0) * kBN, T, p.v_stride_t);
  }
  cp_async_commit();

  const SmemTile<D> tQ(sQ, lane), tdO(sdO, lane);
  float dq[NO][4];
  SA_UNROLL
  for (int j = 0; j < NO; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;

  for (int i = 0; i < n; ++i) {
    const int buf = i & 1;
    cp_async_wait_all();  // tile i has landed (and, at i = 0, Q / dO)
    sync_threads();       // ... for every thread; and everyone is done with tile i - 1's buffer
    if (i + 1 < n) {
      const int64_t kn = tiles.block(i + 1) * kBN;
      load_rows_async<kBN, D>(sK + (buf ^ 1) * kBN * P, kg, kn, T, p.k_stride_t);
      load_rows_async<kBN, D>(sV + (buf ^ 1) * kBN * P, vg, kn, T, p.v_stride_t);
    }
    cp_async_commit();
    const SmemTile<D> tK(sK + buf * kBN * P, lane), tV(sV + buf * kBN * P, lane);
    const int64_t kb = tiles.block(i);
    const bool masked = needs_mask(tiles.partial(i), kb, T);

    SA_UNROLL
    for (int kc = 0; kc < kBN / KC; ++kc) {
      // S = Q K^T for this warp's 16 rows and KC keys
      float s[NC][4];
      SA_UNROLL
      for (int j = 0; j < NC; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      SA_UNROLL2
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t a[4];
        load_a<D>(a, tQ, warp * 16, kk * 16);
        SA_UNROLL
        for (int jn = 0; jn < NC / 2; ++jn) {
          uint32_t b[4];
          load_b_nk<D>(b, tK, kc * KC + jn * 16, kk * 16);
          mma_16816<E>(s[2 * jn], a, b[0], b[1]);
          mma_16816<E>(s[2 * jn + 1], a, b[2], b[3]);
        }
      }
      // P
      SA_UNROLL
      for (int j = 0; j < NC; ++j) {
        SA_UNROLL
        for (int e = 0; e < 4; ++e) {
          float pe = exp2_approx(fmaf(s[j][e], sl2, -lse2[e >> 1]));
          const int64_t col = kb * kBN + kc * KC + acc_col(lane, j, e);
          if (masked && !staged_visible(sLo, sHi, K, warp * 16 + acc_row(lane, e), col)) pe = 0.f;
          s[j][e] = pe;
        }
      }
      // dP = dO V^T
      float dp[NC][4];
      SA_UNROLL
      for (int j = 0; j < NC; ++j) dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
      SA_UNROLL2
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t a[4];
        load_a<D>(a, tdO, warp * 16, kk * 16);
        SA_UNROLL
        for (int jn = 0; jn < NC / 2; ++jn) {
          uint32_t b[4];
          load_b_nk<D>(b, tV, kc * KC + jn * 16, kk * 16);
          mma_16816<E>(dp[2 * jn], a, b[0], b[1]);
          mma_16816<E>(dp[2 * jn + 1], a, b[2], b[3]);
        }
      }
      // dS = P (dP - delta)
      SA_UNROLL
      for (int j = 0; j < NC; ++j) {
        SA_UNROLL
        for (int e = 0; e < 4; ++e) dp[j][e] = s[j][e] == 0.f ? 0.f : s[j][e] * (dp[j][e] - delta[e >> 1]);
      }
      // dQ += dS K
      SA_UNROLL
      for (int c2 = 0; c2 < NC / 2; ++c2) {
        uint32_t a[4];
        acc_to_a<E>(a, dp[2 * c2], dp[2 * c2 + 1]);
        SA_UNROLL
        for (int jd = 0; jd < NO / 2; ++jd) {
          uint32_t b[4];
          load_b_kn<D>(b, tK, kc * KC + c2 * 16, jd * 16);
          mma_16816<E>(dq[2 * jd], a, b[0], b[1]);
          mma_16816<E>(dq[2 * jd + 1], a, b[2], b[3]);
        }
      }
    }
  }

  const float scale = static_cast<float>(p.scale);
  const float mul[2] = {scale, scale};
  store_rows<D, E>(head_ptr_mut(p.dq, h, p.dq_stride_h), p.dq_stride_t, q0 + warp * 16, 0, T, dq, mul, lane);
}

// =================================================================================================================
// Launchers
// =================================================================================================================

template <class Kern>
cudaError_t launch(Kern kernel, int64_t gx, int64_t gy, int nthreads, int64_t smem, cudaStream_t stream,
                   const Mem1StateAttnParams& p) {
  if (gx <= 0 || gy <= 0) return cudaSuccess;
  if (gx > 0x7fffffff || gy > 65535) return cudaErrorInvalidValue;
#if defined(MEM1_SA_EMULATE)
  (void)stream;
  emu::launch(static_cast<unsigned>(gx), static_cast<unsigned>(gy), nthreads, static_cast<size_t>(smem),
              [&] { kernel(p); });
  return cudaSuccess;
#else
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), nthreads, static_cast<size_t>(smem),
           stream>>>(p);
  return cudaGetLastError();
#endif
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }
inline bool strides_ok(int64_t st, int64_t sh) { return st % 8 == 0 && sh % 8 == 0; }

inline bool common_ok(const Mem1StateAttnParams* p) {
  if (p == nullptr) return false;
  if (p->T < 0 || p->Hq <= 0 || p->Hkv <= 0 || p->Hq % p->Hkv != 0 || p->K < 0 || p->K > kMaxK) return false;
  if (p->BM != kBM || p->BN != kBN) return false;
  if (p->D != 64 && p->D != 128) return false;
  if (!aligned16(p->q) || !aligned16(p->k) || !aligned16(p->v) || !aligned16(p->out)) return false;
  if (!strides_ok(p->q_stride_t, p->q_stride_h) || !strides_ok(p->k_stride_t, p->k_stride_h) ||
      !strides_ok(p->v_stride_t, p->v_stride_h) || !strides_ok(p->out_stride_t, p->out_stride_h)) {
    return false;
  }
  return true;
}

template <int D, class E>
cudaError_t fwd_impl(const Mem1StateAttnParams& p, cudaStream_t stream) {
  const int64_t nQ = vis::num_blocks(p.T, kBM);
  return launch(fwd_kernel<D, E>, nQ, p.Hq, kThreads, fwd_smem<D>(p.K), stream, p);
}

template <int D, class E>
cudaError_t bwd_impl(const Mem1StateAttnParams& p, cudaStream_t stream) {
  const int64_t nQ = vis::num_blocks(p.T, kBM), nK = vis::num_blocks(p.T, kBN);
  cudaError_t err = launch(bwd_pre_kernel<D, E>, vis::ceil_div(p.T * p.Hq, kPreThreads), 1, kPreThreads, 0, stream, p);
  if (err != cudaSuccess) return err;
  err = launch(bwd_dkdv_kernel<D, E>, nK, p.Hkv, kDkdvThreads, dkdv_smem<D>(p.K), stream, p);
  if (err != cudaSuccess) return err;
  return launch(bwd_dq_kernel<D, E>, nQ, p.Hq, kThreads, dq_smem<D>(p.K), stream, p);
}

template <class E>
cudaError_t fwd_dispatch(const Mem1StateAttnParams* p, cudaStream_t stream) {
  if (!common_ok(p) || p->lse == nullptr) return cudaErrorInvalidValue;
  if (p->T == 0) return cudaSuccess;
  return p->D == 64 ? fwd_impl<64, E>(*p, stream) : fwd_impl<128, E>(*p, stream);
}

template <class E>
cudaError_t bwd_dispatch(const Mem1StateAttnParams* p, cudaStream_t stream) {
  if (!common_ok(p) || p->lse == nullptr || p->workspace == nullptr) return cudaErrorInvalidValue;
  if (!aligned16(p->dout) || !strides_ok(p->dout_stride_t, p->dout_stride_h) ||
      !strides_ok(p->dq_stride_t, p->dq_stride_h) || !strides_ok(p->dk_stride_t, p->dk_stride_h) ||
      !strides_ok(p->dv_stride_t, p->dv_stride_h) || !aligned16(p->dq) || !aligned16(p->dk) || !aligned16(p->dv)) {
    return cudaErrorInvalidValue;
  }
  if (p->T == 0) return cudaSuccess;
  return p->D == 64 ? bwd_impl<64, E>(*p, stream) : bwd_impl<128, E>(*p, stream);
}

}  // namespace mem1_sa

extern "C" {

int64_t mem1_state_attention_params_size(void) { return static_cast<int64_t>(sizeof(Mem1StateAttnParams)); }

int64_t mem1_state_attention_smem_bytes(int32_t kernel, int64_t D, int64_t K) {
  if ((D != 64 && D != 128) || K < 0 || K > mem1_sa::kMaxK) return -1;
  switch (kernel) {
    case 0:
      return D == 64 ? mem1_sa::fwd_smem<64>(K) : mem1_sa::fwd_smem<128>(K);
    case 1:
      return D == 64 ? mem1_sa::dkdv_smem<64>(K) : mem1_sa::dkdv_smem<128>(K);
    case 2:
      return D == 64 ? mem1_sa::dq_smem<64>(K) : mem1_sa::dq_smem<128>(K);
    default:
      return -1;
  }
}

cudaError_t mem1_state_attention_fwd_f16(const Mem1StateAttnParams* p, cudaStream_t stream) {
  return mem1_sa::fwd_dispatch<mem1_sa::F16>(p, stream);
}
cudaError_t mem1_state_attention_fwd_bf16(const Mem1StateAttnParams* p, cudaStream_t stream) {
  return mem1_sa::fwd_dispatch<mem1_sa::BF16>(p, stream);
}
cudaError_t mem1_state_attention_bwd_f16(const Mem1StateAttnParams* p, cudaStream_t stream) {
  return mem1_sa::bwd_dispatch<mem1_sa::F16>(p, stream);
}
cudaError_t mem1_state_attention_bwd_bf16(const Mem1StateAttnParams* p, cudaStream_t stream) {
  return mem1_sa::bwd_dispatch<mem1_sa::BF16>(p, stream);
}

#if defined(MEM1_SA_EMULATE)
// Emulator only: seed of the fiber scheduling order of the next launches.
void mem1_state_attention_emu_seed(uint64_t s) { mem1_sa::emu::seed() = s; }
#endif

}  // extern "C"
