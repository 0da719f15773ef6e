// The CPU emulator of the CUDA kernels: one for every .cu under csrc/cuda, compiled by g++ in the tests
// (tests/test_state_attention_cuda.py, tests/test_logprob_entropy_cuda.py) so the kernels' index math, barriers and
// warp collectives run without a GPU, against the fp64 oracles.
//
// One CUDA block at a time: its threads are ucontext fibers on the calling OS thread. A fiber runs until it reaches
// a barrier (block barrier, or the warp barrier inside a warp collective); the scheduler resumes fibers in a random
// order per round and releases a barrier once every live thread it concerns has arrived. Divergent barriers
// (a warp waiting for a lane that is stuck at a block barrier) abort. Dynamic shared memory starts as 0xFF bytes
// (NaN in f16 / bf16 / f32), so reading a tile before it is written shows up in the results.
//
// Two layers: `mem1_emu` (blocks, barriers, the warp exchange `publish` / `slot`, `launch`), on which a kernel may
// build its own PTX-level primitives (state_attention.cu: ldmatrix, mma.sync, cp.async); and below it the CUDA C
// names a plain kernel uses (threadIdx, __syncthreads, __shfl_*_sync, __half, wmma on whole 16 x 16 tiles, ...),
// with MEM1_EMU_LAUNCH(kernel, grid, block, args...) for kernel<<<grid, block>>>(args...).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

namespace mem1_emu {

// One CUDA block at a time: its threads are ucontext fibers on the calling OS thread. A fiber runs until it reaches
// a barrier (block barrier, or the warp barrier inside a warp collective); the scheduler resumes fibers in a random
// order per round and releases a barrier once every live thread it concerns has arrived. Divergent barriers
// (a warp waiting for a lane that is stuck at a block barrier) abort. Dynamic shared memory starts as 0xFF bytes
// (NaN in f16 / bf16 / f32), cp.async copies are deferred until the issuing thread's wait, so reading a tile
// before its wait + barrier reads garbage and shows up in the results.
enum State { kRun = 0, kWarpBar = 1, kBlockBar = 2, kDone = 3 };
constexpr int kSlot = 8;  // 64-bit words a lane can publish per collective
constexpr size_t kStack = 256 * 1024;

struct Block {
  int nthreads = 0;
  unsigned bx = 0, by = 0;
  std::vector<unsigned char> smem;
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  std::vector<int> state, parity;
  std::vector<uint64_t> xch;  // [warp][parity][lane][kSlot]
  std::vector<std::vector<std::pair<void*, const void*>>> pending;
  ucontext_t sched;
  int cur = 0;
  const std::function<void()>* body = nullptr;
};

inline Block& blk() {
  static Block b;
  return b;
}
inline uint64_t& seed() {
  static uint64_t s = 12345;
  return s;
}

inline void entry() {
  Block& b = blk();
  (*b.body)();
  b.pending[b.cur].clear();  // copies never waited for are dropped (no one reads them)
  b.state[b.cur] = kDone;
}  // returns to b.sched through uc_link

inline void wait_at(int st) {
  Block& b = blk();
  const int me = b.cur;
  b.state[me] = st;
  swapcontext(&b.ctx[me], &b.sched);
}

inline void run_block(int nthreads, size_t smem_bytes, unsigned bx, unsigned by, const std::function<void()>& body,
                      std::mt19937_64& rng) {
  Block& b = blk();
  b.nthreads = nthreads;
  b.bx = bx;
  b.by = by;
  b.body = &body;
  b.smem.assign(smem_bytes + 16, 0xFF);
  b.ctx.resize(nthreads);
  if (static_cast<int>(b.stacks.size()) < nthreads) b.stacks.resize(nthreads);
  b.state.assign(nthreads, kRun);
  b.parity.assign(nthreads, 0);
  b.pending.assign(nthreads, {});
  b.xch.assign(static_cast<size_t>((nthreads + 31) / 32) * 2 * 32 * kSlot, 0);
  for (int t = 0; t < nthreads; ++t) {
    if (b.stacks[t].size() < kStack) b.stacks[t].resize(kStack);
    getcontext(&b.ctx[t]);
    b.ctx[t].uc_stack.ss_sp = b.stacks[t].data();
    b.ctx[t].uc_stack.ss_size = kStack;
    b.ctx[t].uc_link = &b.sched;
    makecontext(&b.ctx[t], entry, 0);
  }
  std::vector<int> order(nthreads);
  std::iota(order.begin(), order.end(), 0);
  const int nwarps = (nthreads + 31) / 32;
  std::vector<char> pick(nwarps);
  std::vector<int> runnable;
  for (;;) {
    // Each round resumes a random non-empty subset of the warps that can run, so warps drift apart between block
    // barriers: reading another warp's shared-memory writes without a barrier in between gets caught.
    runnable.clear();
    for (int w = 0; w < nwarps; ++w) {
      pick[w] = 0;
      for (int t = w * 32; t < std::min(nthreads, w * 32 + 32); ++t) {
        if (b.state[t] == kRun) {
          runnable.push_back(w);
          break;
        }
      }
    }
    int picked = 0;
    for (int w : runnable) picked += pick[w] = static_cast<char>(rng() & 1);
    if (picked == 0 && !runnable.empty()) pick[runnable[rng() % runnable.size()]] = 1;
    std::shuffle(order.begin(), order.end(), rng);
    for (int t : order) {
      if (b.state[t] != kRun || !pick[t / 32]) continue;
      b.cur = t;
      swapcontext(&b.sched, &b.ctx[t]);
    }
    int live = 0, at_block = 0;
    for (int t = 0; t < nthreads; ++t) {
      live += b.state[t] != kDone;
      at_block += b.state[t] == kBlockBar;
    }
    if (live == 0) break;
    bool released = false;
    if (at_block == live) {
      for (int t = 0; t < nthreads; ++t)
        if (b.state[t] == kBlockBar) b.state[t] = kRun;
      released = true;
    } else {
      for (int w = 0; w * 32 < nthreads; ++w) {
        const int t1 = std::min(nthreads, w * 32 + 32);
        int live_w = 0, at_w = 0;
        for (int t = w * 32; t < t1; ++t) {
          live_w += b.state[t] != kDone;
          at_w += b.state[t] == kWarpBar;
        }
        if (at_w > 0 && at_w == live_w) {
          for (int t = w * 32; t < t1; ++t)
            if (b.state[t] == kWarpBar) b.state[t] = kRun;
          released = true;
        }
      }
    }
    bool runnable = false;
    for (int t = 0; t < nthreads; ++t) runnable = runnable || b.state[t] == kRun;
    if (!released && !runnable) {
      std::fprintf(stderr, "mem1 CUDA emulator: deadlock (divergent barriers) in block (%u, %u)\n", bx, by);
      std::abort();
    }
  }
}

inline void launch(unsigned gx, unsigned gy, int nthreads, size_t smem, const std::function<void()>& body) {
  std::mt19937_64 rng(seed()++);
  for (unsigned y = 0; y < gy; ++y)
    for (unsigned x = 0; x < gx; ++x) run_block(nthreads, smem, x, y, body, rng);
}

// Publish up to kSlot words for the current collective, wait for the warp, return the parity slot to read from.
// Two parities: a lane can only overwrite a slot after the next collective's barrier, which every lane passes only
// after reading this one.
inline int publish(const uint64_t* w, int n) {
  Block& b = blk();
  const int t = b.cur;
  const int par = b.parity[t];
  b.parity[t] ^= 1;
  uint64_t* s = &b.xch[((static_cast<size_t>(t / 32) * 2 + par) * 32 + t % 32) * kSlot];
  for (int i = 0; i < n; ++i) s[i] = w[i];
  wait_at(kWarpBar);
  return par;
}
inline const uint64_t* slot(int par, int lane) {
  Block& b = blk();
  return &b.xch[((static_cast<size_t>(b.cur / 32) * 2 + par) * 32 + lane) * kSlot];
}

}  // namespace mem1_emu

// ----- CUDA C names ------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time, so a function's statics are its block's shared memory
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint4 {
  unsigned x, y, z, w;
};
struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline int cudaGetLastError() { return 0; }

struct __half {
  _Float16 v;
  __half() = default;
  __half(float f) : v(static_cast<_Float16>(f)) {}
  operator float() const { return static_cast<float>(v); }
};
struct __nv_bfloat16 {
  uint16_t b;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {  // round to nearest even
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    b = static_cast<uint16_t>(u >> 16);
  }
  operator float() const {
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

namespace mem1_emu {
struct GridDim {
  unsigned x = 1, y = 1, z = 1;
};
inline GridDim& grid_dim() {
  static GridDim g;
  return g;
}
inline dim3 thread_idx() { return dim3(static_cast<unsigned>(blk().cur)); }
inline dim3 block_idx() { return dim3(blk().bx, blk().by); }
inline int lane() { return blk().cur & 31; }

// A warp shuffle: every lane publishes its value, the warp meets at the warp barrier, each reads its source's.
template <class T>
T shfl(T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffles move up to 8 bytes");
  uint64_t w = 0;
  std::memcpy(&w, &v, sizeof(T));
  const int par = publish(&w, 1);
  T r;
  std::memcpy(&r, slot(par, src & 31), sizeof(T));
  return r;
}

template <class F>
void launch_grid(dim3 grid, dim3 block, F&& f) {
  grid_dim() = {grid.x, grid.y, grid.z};
  launch(grid.x, grid.y, static_cast<int>(block.x), 0, std::function<void()>(std::forward<F>(f)));
}
}  // namespace mem1_emu

#define threadIdx (::mem1_emu::thread_idx())
#define blockIdx (::mem1_emu::block_idx())
#define gridDim (::mem1_emu::grid_dim())
inline void __syncthreads() { ::mem1_emu::wait_at(::mem1_emu::kBlockBar); }
template <class T>
inline T __shfl_sync(unsigned, T v, int src) {
  return ::mem1_emu::shfl(v, src);
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
  return ::mem1_emu::shfl(v, ::mem1_emu::lane() ^ mask);
}
#define MEM1_EMU_LAUNCH(kernel, grid, block, ...) ::mem1_emu::launch_grid(dim3(grid), dim3(block), [&] { kernel(__VA_ARGS__); })

// wmma on whole 16 x 16 tiles: every lane holds the full tile (a fragment's element layout is opaque in CUDA, so
// kernels only load, multiply-accumulate and store fragments); lane 0 stores.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class L = void>
struct fragment {
  float x[256];
};
template <class U, class T, class L>
void fill_fragment(fragment<U, 16, 16, 16, T, L>& f, float v) {
  for (float& e : f.x) e = v;
}
template <class T>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ld) {
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k) f.x[i * 16 + k] = float(p[i * ld + k]);
}
template <class T>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ld) {
  for (int k = 0; k < 16; ++k)
    for (int j = 0; j < 16; ++j) f.x[k * 16 + j] = float(p[k + j * ld]);
}
template <class T>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
              const fragment<matrix_b, 16, 16, 16, T, col_major>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float r[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) s = std::fma(a.x[i * 16 + k], b.x[k * 16 + j], s);
      r[i * 16 + j] = s;
    }
  std::memcpy(d.x, r, sizeof(r));
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld, layout_t) {
  if (::mem1_emu::lane() != 0) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) p[i * ld + j] = f.x[i * 16 + j];
}
}  // namespace wmma
}  // namespace nvcuda
