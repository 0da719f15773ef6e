"""The CUDA C++ forward of logprob_entropy (csrc/cuda/logprob_entropy.cu), without a GPU and on one.

Host side: its launcher header compiles host-only (C and C++) and its reduction helpers (shared by the kernels) are
checked on the host. The kernels run on the shared CPU emulator (csrc/cuda/emulator.h: the .cu compiled by g++ with
-DMEM1_LPE_EMULATE, CUDA threads as fibers, warp barriers inside the shuffles) against the fp64 oracle. With a CUDA
device, the tests marked `cuda` run the .cu built with nvcc into a shared library, called through ctypes. The nvcc
compile (sm_80 / sm_90a, no spills) is tests/test_csrc_build.py.
"""
from __future__ import annotations

import ctypes
import itertools
import math
import shutil
import subprocess
from pathlib import Path

import oracles
import pytest
import torch
from oracles import logprob_case as case

from mem1_fast.ops.logprob_entropy import backend_module

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"


def _triton():
    """The Triton backend, to compare statistics with when it runs here (None when it does not import)."""
    try:
        return backend_module("triton")
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# CUDA C++ forward (csrc/cuda/logprob_entropy.cu): host-side checks
# ---------------------------------------------------------------------------------------------------------------

N_PARAM_FIELDS = 14  # Mem1LogprobEntropyFwdParams: every field 8 bytes

HOST_TU = """
#include "logprob_entropy.cuh"
#include <stddef.h>
typedef cudaError_t (*launcher)(const Mem1LogprobEntropyFwdParams*, cudaStream_t);
static launcher launchers[] = {mem1_logprob_entropy_fwd_f16, mem1_logprob_entropy_fwd_bf16,
                               mem1_logprob_entropy_fwd_f32};
#ifdef __cplusplus
static_assert(sizeof(Mem1LogprobEntropyFwdParams) == 8 * N_FIELDS, "8-byte fields, no padding");
static_assert(offsetof(Mem1LogprobEntropyFwdParams, splits) == 8 * (N_FIELDS - 1), "splits is the last field");
#else
_Static_assert(sizeof(Mem1LogprobEntropyFwdParams) == 8 * N_FIELDS, "8-byte fields, no padding");
#endif
int main(void) { return MEM1_LPE_BM == 64 && launchers[0] != 0 ? 0 : 1; }
"""


@pytest.mark.parametrize("lang", ["c++", "c"])
def test_cu_header_compiles_host_only(tmp_path, lang):
    compiler = shutil.which("g++" if lang == "c++" else "gcc")
    from mem1_fast import _ext

    inc = _ext.cuda_include_dir()
    if compiler is None or inc is None:
        pytest.skip("needs a host compiler and the CUDA headers")
    tu = tmp_path / ("tu.cpp" if lang == "c++" else "tu.c")
    tu.write_text(HOST_TU)
    cmd = [compiler, "-fsyntax-only", "-Wall", "-Werror", f"-DN_FIELDS={N_PARAM_FIELDS}", "-I", str(CUDA_DIR),
           "-I", str(inc), str(tu)] + (["-std=c++17"] if lang == "c++" else ["-std=c11"])
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout}{p.stderr}"


REDUCE_TU = """
#define MEM1_LPE_HOST_ONLY 1
#include "logprob_entropy.cuh"
extern "C" void merge_rows(const float* part, long n_splits, long n, float* out) {
  // part [4, n_splits, n] as the kernels write it; out [5, n]: logp, entropy, m, logs, mean_d
  for (long r = 0; r < n; ++r) {
    float m = -__builtin_huge_valf(), s = 0.0f, sd = 0.0f, zt = -__builtin_huge_valf();
    for (long k = 0; k < n_splits; ++k) {
      const long i = k * n + r, plane = n_splits * n;
      mem1_lpe_merge(&m, &s, &sd, part[i], part[plane + i], part[2 * plane + i]);
      zt = part[3 * plane + i] > zt ? part[3 * plane + i] : zt;
    }
    mem1_lpe_finalize(m, s, sd, zt, out + r, out + n + r, out + 3 * n + r, out + 4 * n + r);
    out[2 * n + r] = m;
  }
}
"""


def test_cu_reduction_helpers_on_host(tmp_path):
    """The header's online-softmax helpers (used by both .cu kernels) merge per-split partial statistics into the
    exact logp / entropy / (m, logs, mean_d), for logits at 1 and 1e4 scale, splits of unequal size."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++")
    src = tmp_path / "reduce.cpp"
    src.write_text(REDUCE_TU)
    lib = tmp_path / "libreduce.so"
    p = subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-I", str(CUDA_DIR), str(src), "-o", str(lib)],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    fn = ctypes.CDLL(str(lib)).merge_rows
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e4):
        n, V = 9, 300
        z = (torch.randn(n, V, generator=g, dtype=torch.float64) * scale).float()
        t = torch.randint(0, V, (n,), generator=g)
        bounds = [0, 7, 150, 151, V]  # splits of 7, 143, 1, 149 columns
        part = torch.empty(4, len(bounds) - 1, n)
        for k, (a, b) in enumerate(itertools.pairwise(bounds)):
            zs = z[:, a:b]
            m = zs.max(1).values
            e = torch.exp(zs - m[:, None])
            part[0, k], part[1, k], part[2, k] = m, e.sum(1), (e * (zs - m[:, None])).sum(1)
            inside = (t >= a) & (t < b)
            part[3, k] = torch.where(inside, z.gather(1, t[:, None])[:, 0], -math.inf)
        out = torch.empty(5, n)
        fn(ctypes.c_void_p(part.data_ptr()), ctypes.c_long(part.shape[1]), ctypes.c_long(n),
           ctypes.c_void_p(out.data_ptr()))
        zd = z.double()
        lse = torch.logsumexp(zd, 1)
        p_ = torch.softmax(zd, 1)
        ref_lp = zd.gather(1, t[:, None])[:, 0] - lse
        ref_ent = lse - (p_ * zd).sum(1)
        tol = 1e-6 * max(1.0, scale)
        assert (out[0].double() - ref_lp).abs().max() <= tol and (out[0] <= 0).all()
        assert (out[1].double() - ref_ent).abs().max() <= tol and (out[1] >= 0).all()
        assert torch.equal(out[2], z.max(1).values)
        assert (out[2].double() + out[3] - lse).abs().max() <= tol
        assert (out[2].double() + out[4] - (p_ * zd).sum(1)).abs().max() <= tol


# ---------------------------------------------------------------------------------------------------------------
# On the CPU emulator (csrc/cuda/emulator.h). The CUDA threads of a block are fibers scheduled in a random order
# between barriers, blocks run one after another (so `__shared__` can be `static`), wmma fragments hold whole
# 16 x 16 tiles (every lane computes the tile; lane 0 stores it), __half / __nv_bfloat16 are 2-byte storage types
# with the real bit layouts. It runs the kernels' tiling, index math, ragged masks, vector / scalar load paths,
# warp-level online softmax, splits and merge. It cannot show: the real fragment layouts (the wmma API hides them),
# timing, the memory model.
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++")
    lib = tmp_path_factory.mktemp("lpe_emu") / "liblpe_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-DMEM1_LPE_EMULATE", "-I",
           str(CUDA_DIR), "-x", "c++", str(CUDA_DIR / "logprob_entropy.cu"), "-o", str(lib)]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stderr[-6000:]}"
    return ctypes.CDLL(str(lib))


def _cu_forward(lib, hidden, weight, targets, temperature, splits, stream=None):
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    logp, ent = torch.full((N,), math.nan, device=dev), torch.full((N,), math.nan, device=dev)
    stats = torch.full((3, N), math.nan, device=dev)
    ws = torch.full((4 * splits * max(N, 1),), math.nan, device=dev)
    p = _FwdParams(hidden.data_ptr(), hidden.stride(0), weight.data_ptr(), weight.stride(0), targets.data_ptr(), N,
                   V, H, 1 / temperature, logp.data_ptr(), ent.data_ptr(), stats.data_ptr(), ws.data_ptr(), splits)
    fn = {torch.bfloat16: lib.mem1_logprob_entropy_fwd_bf16, torch.float16: lib.mem1_logprob_entropy_fwd_f16,
          torch.float32: lib.mem1_logprob_entropy_fwd_f32}[hidden.dtype]
    err = fn(ctypes.byref(p), ctypes.c_void_p(stream))
    return err, logp, ent, stats


class _FwdParams(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_void_p), ("stride_hidden", ctypes.c_int64), ("weight", ctypes.c_void_p),
                ("stride_weight", ctypes.c_int64), ("targets", ctypes.c_void_p), ("N", ctypes.c_int64),
                ("V", ctypes.c_int64), ("H", ctypes.c_int64), ("inv_temperature", ctypes.c_double),
                ("logp", ctypes.c_void_p), ("entropy", ctypes.c_void_p), ("stats", ctypes.c_void_p),
                ("workspace", ctypes.c_void_p), ("splits", ctypes.c_int64)]


def _check_cu_against_oracle(lib, hidden, weight, targets, temperature, splits, tol, stream=None):
    err, logp, ent, stats = _cu_forward(lib, hidden, weight, targets, temperature, splits, stream)
    assert err == 0
    if hidden.is_cuda:
        torch.cuda.synchronize()
    rlp, rent = oracles.logprob_entropy(hidden.double(), weight.double(), targets, temperature)
    for name, a, b in (("logp", logp, rlp), ("entropy", ent, rent)):
        assert torch.isfinite(a).all(), name
        rel = ((a.double() - b).abs().max() / b.abs().max().clamp(min=1.0)).item()
        assert rel <= tol, f"{name}: relative error {rel:.2e}"
    assert (logp <= 0).all() and (ent >= 0).all()
    z = hidden.double() @ weight.double().T / temperature
    lse = torch.logsumexp(z, 1)
    assert (stats[0].double() - z.max(1).values).abs().max() <= 1e-5 * max(1.0, z.abs().max().item())
    assert ((stats[0].double() + stats[1] - lse).abs() / lse.abs().clamp(min=1.0)).max() <= tol
    return stats


@pytest.mark.parametrize("dtype,N,H,V,hstride,splits", [
    (torch.float32, 70, 40, 300, 40, 3), (torch.float16, 70, 40, 300, 40, 3), (torch.bfloat16, 70, 40, 300, 40, 3),
    (torch.float32, 20, 64, 130, 72, 2), (torch.float16, 20, 64, 130, 72, 2), (torch.bfloat16, 20, 64, 130, 72, 2),
    (torch.float16, 3, 8, 5, 8, 4)],
    ids=["fp32-scalar-loads", "fp16-scalar-loads", "bf16-scalar-loads", "fp32-vector-loads", "fp16-vector-loads",
         "bf16-vector-loads", "fp16-tiny"])
def test_cu_forward_on_cpu_emulator(emu_lib, dtype, N, H, V, hstride, splits):
    """2 row blocks (ragged) x 5 vocabulary tiles (ragged) x 2 hidden steps (ragged at H = 40: the element-wise
    load path), 3 splits of 2 / 2 / 1 tiles; H = 64 with row stride 72: the 16-byte path; against the fp64 oracle;
    the statistics match the Triton backend's (m, log s, mean_d)."""
    hidden, weight, targets, _, _ = case(N, hstride, V, dtype=dtype)
    hidden, weight = hidden[:, :H], weight[:, :H]
    stats = _check_cu_against_oracle(emu_lib, hidden, weight, targets, 0.7, splits, 1e-5)
    tk = _triton()
    if tk is not None and tk.available("cpu") and dtype != torch.bfloat16:
        _, _, stats_t = tk.forward(hidden, weight, targets, 0.7)
        assert torch.allclose(stats, stats_t, rtol=1e-5, atol=1e-5)


def test_cu_forward_on_cpu_emulator_extreme_and_invalid(emu_lib):
    hidden, weight, targets, _, _ = case(20, 32, 130, scale=1e4)
    err, logp, ent, _ = _cu_forward(emu_lib, hidden, weight, targets, 1.0, 2)
    assert err == 0 and torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert (logp <= 0).all() and (ent >= 0).all()
    rlp, rent = oracles.logprob_entropy(hidden.double(), weight.double(), targets)
    zscale = (hidden.double() @ weight.double().T).abs().max().item()
    assert (logp.double() - rlp).abs().max() <= 1e-6 * zscale and (ent.double() - rent).abs().max() <= 1e-6 * zscale
    # invalid arguments are refused before any launch
    assert _cu_forward(emu_lib, hidden, weight, targets, 1.0, 0)[0] == 1  # splits < 1
    assert _cu_forward(emu_lib, hidden[:, :0], weight[:, :0], targets, 1.0, 1)[0] == 1  # H = 0
    assert _cu_forward(emu_lib, hidden[:0], weight, targets, 1.0, 1)[0] == 0  # N = 0: nothing to do
    emu_lib.mem1_logprob_entropy_fwd_splits.restype = ctypes.c_int64
    emu_lib.mem1_logprob_entropy_fwd_workspace_bytes.restype = ctypes.c_int64
    assert emu_lib.mem1_logprob_entropy_fwd_splits(ctypes.c_int64(100000), ctypes.c_int64(152064),
                                                   ctypes.c_int64(132)) == 1
    assert emu_lib.mem1_logprob_entropy_fwd_splits(ctypes.c_int64(100), ctypes.c_int64(152064),
                                                   ctypes.c_int64(132)) == 264
    assert emu_lib.mem1_logprob_entropy_fwd_workspace_bytes(ctypes.c_int64(10), ctypes.c_int64(3)) == 480


# ---------------------------------------------------------------------------------------------------------------
# On a CUDA device
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cu_lib(tmp_path_factory):
    from mem1_fast import _ext
    nvcc = _ext.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    cap = torch.cuda.get_device_capability()
    out = tmp_path_factory.mktemp("lpe_cu") / "liblpe.so"
    cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-arch=sm_{cap[0]}{cap[1]}", "-I",
           str(CUDA_DIR), str(CUDA_DIR / "logprob_entropy.cu"), "-o", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    return ctypes.CDLL(str(out))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-4), (torch.float16, 1e-4), (torch.float32, 1e-5)])
@pytest.mark.parametrize("N,H,V,hstride", [(300, 1024, 32003, 1024), (7, 100, 1000, 104), (130, 48, 9000, 53)])
def test_cu_forward_against_oracle(cu_lib, dtype, tol, N, H, V, hstride):
    """The .cu forward on the GPU (16-byte and element-wise load paths, ragged tiles, several splits) against the
    fp64 oracle; its statistics against the Triton backend's when that one runs here."""
    big, weight, targets, _, _ = case(N, hstride, V, dtype=dtype)
    hidden, weight, targets = big.cuda()[:, :H], weight.cuda()[:, :H], targets.cuda()
    cu_lib.mem1_logprob_entropy_fwd_splits.restype = ctypes.c_int64
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = cu_lib.mem1_logprob_entropy_fwd_splits(ctypes.c_int64(N), ctypes.c_int64(V), ctypes.c_int64(sms))
    stats = _check_cu_against_oracle(cu_lib, hidden, weight, targets, 0.7, splits, tol,
                                     torch.cuda.current_stream().cuda_stream)
    tk = _triton()
    if tk is not None and tk.available("cuda"):
        _, _, stats_t = tk.forward(hidden, weight, targets, 0.7)
        assert torch.allclose(stats, stats_t, rtol=1e-4, atol=1e-4)
