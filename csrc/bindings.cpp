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
  // Block map of an interval visibility spec (DESIGN.md §4).
  //   lo, hi: int32 [T, K]; row p sees the union over k of [lo[p,k], hi[p,k]), 0 <= lo <= hi <= p+1,
  //           non-empty intervals of a row sorted and disjoint.
  //   BM, BN: query rows / keys per tile.
  // Returns (partial_ptr [nQ+1], partial_idx [nnzP], full_ptr [nQ+1], full_idx [nnzF]), int32 CSR over query
  // blocks, key-block indices ascending within each query block; tiles with no visible pair are not listed.
  m.def("block_map(Tensor lo, Tensor hi, int BM, int BN) -> (Tensor, Tensor, Tensor, Tensor)");
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
