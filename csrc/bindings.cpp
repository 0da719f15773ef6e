// mem1_fast C++ extension: operator schemas and the Python module entry point.
//
// Every op of the extension is declared here, in the one TORCH_LIBRARY(mem1_fast, m) block; each backend registers
// its kernel with TORCH_LIBRARY_IMPL(mem1_fast, <DispatchKey>, m) in its own file (csrc/cpu/*.cpp, later a CUDA
// binding .cpp calling the raw launchers of csrc/cuda/*.cuh). Ops are called as torch.ops.mem1_fast.<name>.
//
// The Python module itself is empty: importing it (mem1_fast._C, or the JIT-built copy, see mem1_fast/_ext.py)
// runs the static registrations above. It is written against the plain CPython API, so the extension needs no
// pybind11 and does not link libtorch_python.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mem1_fast, m) {
  // Block map of an interval visibility spec (docs/design.md §4).
  //   lo, hi: int32 [T, K]; row p sees the union over k of [lo[p,k], hi[p,k]), 0 <= lo <= hi <= p+1,
  //           non-empty intervals of a row sorted and disjoint.
  //   BM, BN: query rows / keys per tile.
  // Returns (partial_ptr [nQ+1], partial_idx [nnzP], full_ptr [nQ+1], full_idx [nnzF]), int32 CSR over query
  // blocks, key-block indices ascending within each query block; tiles with no visible pair are not listed.
  m.def("block_map(Tensor lo, Tensor hi, int BM, int BN) -> (Tensor, Tensor, Tensor, Tensor)");

  // State-visibility attention (docs/design.md §5), CPU kernels in csrc/cpu/state_attention.cpp.
  //   q [T, Hq, D], k/v [T, Hkv, D] (Hq % Hkv == 0; float32/float16/bfloat16/float64), lo/hi int32 [T, K], and
  //   the block map of block_map(lo, hi, BM, BN) (partial_ptr, partial_idx, full_ptr, full_idx); the backward
  //   transposes it itself. isa: -1 auto, 0 generic, 1 avx2, 2 avx512; schedule (bwd): -1 auto, 0 two-pass,
  //   1 fused (both give bit-identical gradients; the arguments exist for tests and benchmarks).
  // fwd returns (out [T, Hq, D] in q's dtype, lse float32 [Hq, T], natural log, -inf for rows with no visible key);
  // bwd returns (dq, dk, dv) in the input dtypes (deterministic by construction: `deterministic` is accepted).
  m.def("state_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor lo, Tensor hi, Tensor partial_ptr, "
        "Tensor partial_idx, Tensor full_ptr, Tensor full_idx, float scale, int BM, int BN, int isa=-1) "
        "-> (Tensor, Tensor)");
  m.def("state_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor lo, "
        "Tensor hi, Tensor partial_ptr, Tensor partial_idx, Tensor full_ptr, Tensor full_idx, float scale, int BM, "
        "int BN, bool deterministic=False, int isa=-1, int schedule=-1) -> (Tensor, Tensor, Tensor)");
  // Which kernel body `isa` resolves to for probe's dtype: "avx512", "avx2" or "generic".
  m.def("state_attention_cpu_isa(Tensor probe, int isa=-1) -> str");

  // logprob_entropy / fused PPO loss (docs/design.md §5), CPU kernels in csrc/cpu/logprob_entropy.cpp.
  //   hidden [N, H], weight [V, H] (float32/float16/bfloat16/float64, fp32 accumulation; fp64 if either is fp64),
  //   targets int64 [N]. tile_rows / tile_cols: the logits tile (0: automatic; the fused op holds [tile_rows, V]).
  //   isa: -1 auto, 0 generic, 1 avx2, 2 avx512 (tests).
  // fwd returns (logp, entropy, lse, E_p[z]), each [N] in the accumulation dtype; bwd takes the last two back and
  // returns (d_hidden, d_weight) in the input dtypes (None when not needed).
  m.def("logprob_entropy_fwd(Tensor hidden, Tensor weight, Tensor targets, float temperature, int tile_rows=0, "
        "int tile_cols=0, int isa=-1) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("logprob_entropy_bwd(Tensor? g_logp, Tensor? g_ent, Tensor hidden, Tensor weight, Tensor targets, "
        "Tensor lse, Tensor ez, float temperature, bool need_hidden, bool need_weight, int tile_rows=0, "
        "int tile_cols=0, int isa=-1) -> (Tensor, Tensor)");
  // Fused PPO loss (ops/ppo_loss.py): returns (loss 0-dim, logp [N], entropy [N], d_hidden, d_weight), the
  // gradients of loss computed in the same single pass over the vocabulary (None when not needed).
  m.def("ppo_loss_fused(Tensor hidden, Tensor weight, Tensor targets, Tensor old_logp, Tensor advantages, "
        "Tensor? ref_logp, float temperature, float clip_eps, float entropy_coef, float kl_coef, float normalizer, "
        "bool need_hidden=True, bool need_weight=True, int tile_rows=0, int tile_cols=0, int isa=-1, "
        "Tensor? token_weights=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Which row-kernel body `isa` resolves to for probe's dtype: "avx512", "avx2" or "generic".
  m.def("logprob_entropy_cpu_isa(Tensor probe, int isa=-1) -> str");

  // Attention of new tokens over a paged KV cache (mem1_fast/ops/paged_attention.py), CPU kernel in
  // csrc/cpu/paged_attention.cpp. q [T, Hq, D], k_cache/v_cache [num_blocks, block_size, Hkv, D] (contiguous),
  // block_table int32 [B, max_blocks] (-1 past a sequence's end), seq int32 [T], lo/hi int32 [T, K] slot intervals.
  // Returns out [T, Hq, D] in q's dtype (0 for a row that sees no slot).
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq, Tensor lo, "
        "Tensor hi, float scale) -> Tensor");
}

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define MEM1_STR_(x) #x
#define MEM1_STR(x) MEM1_STR_(x)
#define MEM1_CAT_(a, b) a##b
#define MEM1_CAT(a, b) MEM1_CAT_(a, b)

extern "C" {
PyMODINIT_FUNC MEM1_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      MEM1_STR(TORCH_EXTENSION_NAME), /* m_name */
      "mem1_fast C++ ops (registered under torch.ops.mem1_fast)", /* m_doc */
      -1, /* m_size */
      nullptr, /* m_methods */
  };
  return PyModule_Create(&module_def);
}
}
