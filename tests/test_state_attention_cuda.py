"""CUDA C++ state_attention (csrc/cuda/state_attention.cu + bindings_cuda.cpp, backend ops/_cuda_state_attention.py).

What runs here, without a GPU:
* the launcher header compiles in host-only translation units (g++ / gcc; C and C++);
* the torch binding passes `g++ -fsyntax-only` against this torch's headers and the CUDA toolkit's headers;
* the kernels themselves run on a CPU emulator: state_attention.cu compiled by g++ with -DMEM1_SA_EMULATE, where
  the threads of a CUDA block are fibers and the warp collectives (shfl, ldmatrix, mma.m16n8k16) and cp.async are
  emulated from their PTX definitions. Forward and backward are compared with the fp64 oracle on MEM1 layouts,
  GQA, ragged last tiles and strided inputs surrounded by NaN (a read of a row >= T or of a neighbouring column, or
  a write outside the outputs, shows up), with a random thread schedule (a missing barrier or cp.async wait reads
  the emulator's NaN-filled shared memory), deterministic across schedules;
* the "cuda" backend reports itself unavailable.
What the emulator cannot show: the PTX fragment layouts themselves (it implements the documented ones), timing,
bank conflicts, and the real memory model. With a GPU, the tests marked `cuda` run the backend through
ops.state_attention against the oracle (skipped without one; set MEM1_FAST_REQUIRE_CUDA_EXT=1 to fail instead of
skipping when the extension was not built).
"""
from __future__ import annotations

import ctypes
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import oracles
import pytest
import torch

from mem1_fast import _ext
from mem1_fast.consolidation import pack
from mem1_fast.ops import _cuda_state_attention, state_attention
from mem1_fast.ops.state_attention import available_backends
from mem1_fast.trajectory import Trajectory
from mem1_fast.visibility import Visibility, block_map_cache

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
SRC = CUDA_DIR / "state_attention.cu"
HEADER = CUDA_DIR / "state_attention.cuh"
BINDING = CUDA_DIR / "bindings_cuda.cpp"
INCLUDE = ROOT / "csrc" / "include"
BM = BN = 64
CXX = shutil.which("g++")
CC = shutil.which("gcc")
N_PARAM_FIELDS = 44  # Mem1StateAttnParams: every field 8 bytes


CUDA_INCLUDE = _ext.cuda_include_dir()


# ---------------------------------------------------------------------------------------------------------------
# Host-only compile checks
# ---------------------------------------------------------------------------------------------------------------

HOST_TU = """
#include "state_attention.cuh"
#include <stddef.h>
typedef cudaError_t (*launcher)(const Mem1StateAttnParams*, cudaStream_t);
static launcher launchers[] = {mem1_state_attention_fwd_f16, mem1_state_attention_fwd_bf16,
                               mem1_state_attention_bwd_f16, mem1_state_attention_bwd_bf16};
#ifdef __cplusplus
static_assert(sizeof(Mem1StateAttnParams) == 8 * N_FIELDS, "Mem1StateAttnParams: 8-byte fields, no padding");
static_assert(offsetof(Mem1StateAttnParams, scale) == 8 * (N_FIELDS - 1), "scale is the last field");
#else
_Static_assert(sizeof(Mem1StateAttnParams) == 8 * N_FIELDS, "Mem1StateAttnParams: 8-byte fields, no padding");
#endif
int main(void) { return MEM1_SA_BM + MEM1_SA_BN == 128 && launchers[0] != 0 ? 0 : 1; }
"""


@pytest.mark.parametrize("lang,emulate", [("c++", False), ("c", False), ("c++", True)],
                         ids=["cxx-cuda-headers", "c-cuda-headers", "cxx-emulation"])
def test_launcher_header_compiles_host_only(tmp_path, lang, emulate):
    compiler = CXX if lang == "c++" else CC
    if compiler is None:
        pytest.skip(f"no {lang} compiler")
    if not emulate and CUDA_INCLUDE is None:
        pytest.skip("CUDA headers (cuda_runtime_api.h) not found; set CUDA_HOME")
    tu = tmp_path / ("tu.cpp" if lang == "c++" else "tu.c")
    tu.write_text(HOST_TU)
    cmd = [compiler, "-fsyntax-only", "-Wall", "-Werror", f"-DN_FIELDS={N_PARAM_FIELDS}", "-I", str(CUDA_DIR),
           str(tu)]
    cmd += ["-DMEM1_SA_EMULATE"] if emulate else ["-I", str(CUDA_INCLUDE)]
    if lang == "c++":
        cmd.insert(1, "-std=c++17")
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout}{p.stderr}"


def test_cuda_sources_free_of_torch_headers():
    for src in (SRC, HEADER):
        text = src.read_text()
        for bad in ("#include <torch", "#include <ATen", "#include <c10"):
            assert bad not in text, f"{src.name} includes {bad[10:]} headers"


def test_binding_compiles_against_torch_headers(tmp_path):
    """g++ -fsyntax-only of the torch binding with this torch's headers (the CPU wheel ships the c10/cuda ones) and
    the CUDA toolkit's: catches API misuse without a CUDA build of torch (nothing is linked)."""
    if CXX is None or CUDA_INCLUDE is None:
        pytest.skip("needs g++ and the CUDA headers")
    from torch.utils.cpp_extension import include_paths

    cmd = [CXX, "-std=c++20", "-fsyntax-only", "-x", "c++", str(BINDING), "-I", str(CUDA_DIR), "-I", str(INCLUDE),
           "-I", str(CUDA_INCLUDE), "-I", sysconfig.get_paths()["include"], "-DTORCH_EXTENSION_NAME=_C_cuda",
           "-DTORCH_API_INCLUDE_EXTENSION_H", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    for inc in include_paths():
        cmd += ["-I", inc]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stderr[-4000:]}"


def test_backend_unavailable_without_gpu():
    assert not _cuda_state_attention.available("cpu")
    assert "cuda" not in available_backends("cpu")
    if not torch.cuda.is_available():
        assert not _cuda_state_attention.available("cuda")
        assert _cuda_state_attention.unavailable_reason()


# ---------------------------------------------------------------------------------------------------------------
# CPU emulator of the kernels
# ---------------------------------------------------------------------------------------------------------------

def _params_struct():
    fields = []

    def ptr(*names):
        fields.extend((n, ctypes.c_void_p) for n in names)

    def i64(*names):
        fields.extend((n, ctypes.c_int64) for n in names)

    for t in ("q", "k", "v", "out"):
        ptr(t)
        i64(f"{t}_stride_t", f"{t}_stride_h")
    ptr("lse")
    for t in ("dout", "dq", "dk", "dv"):
        ptr(t)
        i64(f"{t}_stride_t", f"{t}_stride_h")
    ptr("workspace")
    i64("T", "Hq", "Hkv", "D")
    ptr("lo", "hi")
    i64("K")
    ptr("partial_ptr", "partial_idx", "full_ptr", "full_idx")
    ptr("t_partial_ptr", "t_partial_idx", "t_full_ptr", "t_full_idx")
    i64("BM", "BN")
    fields.append(("scale", ctypes.c_double))
    assert len(fields) == N_PARAM_FIELDS
    return type("Mem1StateAttnParams", (ctypes.Structure,), {"_fields_": fields})


Params = _params_struct()


class Emulator:
    def __init__(self, lib):
        self.lib = lib
        lib.mem1_state_attention_params_size.restype = ctypes.c_int64
        lib.mem1_state_attention_emu_seed.argtypes = [ctypes.c_uint64]
        for name in ("fwd_f16", "fwd_bf16", "bwd_f16", "bwd_bf16"):
            fn = getattr(lib, f"mem1_state_attention_{name}")
            fn.argtypes = [ctypes.POINTER(Params), ctypes.c_void_p]
            fn.restype = ctypes.c_int

    def call(self, which: str, dtype: torch.dtype, p: Params) -> int:
        tag = {torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
        return getattr(self.lib, f"mem1_state_attention_{which}_{tag}")(ctypes.byref(p), None)

    def seed(self, s: int):
        self.lib.mem1_state_attention_emu_seed(s)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if CXX is None:
        pytest.skip("no g++")
    if platform.system() != "Linux":
        pytest.skip("the emulator uses ucontext fibers (Linux)")
    tmp = tmp_path_factory.mktemp("mem1_sa_emu")
    probe = tmp / "probe.cpp"
    probe.write_text("int main() { _Float16 h = 1; return static_cast<int>(static_cast<float>(h)) - 1; }\n")
    if subprocess.run([CXX, "-std=c++17", str(probe), "-o", str(tmp / "probe")], capture_output=True,
                      check=False).returncode:
        pytest.skip("g++ without _Float16 (needs GCC >= 12 on x86-64 / aarch64)")
    so = tmp / "libmem1_sa_emu.so"
    cmd = [CXX, "-std=c++17", "-O2", "-fPIC", "-shared", "-DMEM1_SA_EMULATE", "-I", str(INCLUDE), "-I", str(CUDA_DIR),
           "-x", "c++", str(SRC), "-o", str(so)]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"emulator build failed:\n{' '.join(cmd)}\n{p.stderr[-4000:]}"
    e = Emulator(ctypes.CDLL(str(so)))
    assert e.lib.mem1_state_attention_params_size() == ctypes.sizeof(Params) == 8 * N_PARAM_FIELDS
    return e


def _guarded(T, H, D, dtype):
    """A [T, H, D] view into a NaN-filled [T + 2, H, 2 D] buffer: strides (2 H D, 2 D, 1), NaN around it."""
    buf = torch.full((T + 2, H, 2 * D), math.nan, dtype=dtype)
    return buf, buf[:T, :, :D]


def _untouched(buf, T, D):
    return bool(torch.isnan(buf[T:]).all()) and bool(torch.isnan(buf[:, :, D:]).all())


def _set(p, name, t):
    setattr(p, name, t.data_ptr())
    setattr(p, f"{name}_stride_t", t.stride(0))
    setattr(p, f"{name}_stride_h", t.stride(1))


def _ptr(t):
    return t.data_ptr() if t.numel() else 0


def _make_params(vis, q, k, v, out, lse, scale):
    T, Hq, D = q.shape
    bm = vis.block_map(BM, BN)
    bt = bm.transpose()
    p = Params()
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        _set(p, name, t)
    p.lse = lse.data_ptr()
    p.T, p.Hq, p.Hkv, p.D = T, Hq, k.shape[1], D
    p.lo, p.hi, p.K = vis.lo.data_ptr(), vis.hi.data_ptr(), vis.K
    keep = [bm, bt]
    p.partial_ptr, p.partial_idx, p.full_ptr, p.full_idx = (
        _ptr(t) for t in (bm.partial_ptr, bm.partial_idx, bm.full_ptr, bm.full_idx))
    p.t_partial_ptr, p.t_partial_idx, p.t_full_ptr, p.t_full_idx = (
        _ptr(t) for t in (bt.partial_ptr, bt.partial_idx, bt.full_ptr, bt.full_idx))
    p.BM, p.BN, p.scale = BM, BN, scale
    return p, keep


def emulate(emu, vis, Hq, Hkv, D, dtype, backward=True, seed=0, schedule=0):
    """Run the emulated forward (and backward) on strided, NaN-guarded inputs drawn from `seed`, threads scheduled
    from `schedule`; returns a dict of tensors."""
    T = vis.T
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(T, h, D, generator=g) for h in (Hq, Hkv, Hkv, Hq)]
    bufs, views = {}, {}
    for name, h, src in (("q", Hq, inputs[0]), ("k", Hkv, inputs[1]), ("v", Hkv, inputs[2]), ("out", Hq, None),
                         ("dout", Hq, inputs[3]), ("dq", Hq, None), ("dk", Hkv, None), ("dv", Hkv, None)):
        bufs[name], views[name] = _guarded(T, h, D, dtype)
        if src is not None:
            views[name].copy_(src)
    lse = torch.full((Hq, T), math.nan)
    p, keep = _make_params(vis, views["q"], views["k"], views["v"], views["out"], lse, 1 / math.sqrt(D))
    emu.seed(schedule)
    assert emu.call("fwd", dtype, p) == 0
    res = {"out": views["out"].clone(), "lse": lse, "inputs": (views["q"], views["k"], views["v"], views["dout"]),
           "fwd_guards": _untouched(bufs["out"], T, D)}
    if backward:
        ws = torch.full((2, Hq, T), math.nan)
        for name in ("dout", "dq", "dk", "dv"):
            _set(p, name, views[name])
        p.workspace = ws.data_ptr()
        assert emu.call("bwd", dtype, p) == 0
        res.update(dq=views["dq"].clone(), dk=views["dk"].clone(), dv=views["dv"].clone(),
                   bwd_guards=all(_untouched(bufs[n], T, D) for n in ("dq", "dk", "dv")))
    del keep
    return res


TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}  # relative to 1 + max|reference|


def check_against_oracle(res, vis, dtype, backward=True):
    q, k, v, dout = (x.double().requires_grad_() for x in res["inputs"])  # the rounded inputs the kernels read
    ref, ref_lse = oracles.attention(q, k, v, vis.dense())
    tol = TOL[dtype]
    assert res["fwd_guards"], "forward wrote outside its output"
    names = [("out", res["out"], ref.detach())]
    if backward:
        (ref * dout.detach()).sum().backward()
        assert res["bwd_guards"], "backward wrote outside its outputs"
        names += [("dq", res["dq"], q.grad), ("dk", res["dk"], k.grad), ("dv", res["dv"], v.grad)]
    for name, a, b in names:
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err = (a.double() - b).abs().max().item()
        bound = tol * (1 + b.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(res["lse"]), finite), "lse: -inf pattern differs"
    assert torch.equal(res["lse"][~finite], ref_lse[~finite].float()), "lse: rows with no visible key must be -inf"
    if finite.any():
        assert (res["lse"][finite].double() - ref_lse[finite]).abs().max() <= 1e-3


def _traj(q, n, turns):
    trip = [("PROMPT", 0, [3] * q)]
    for t in range(turns):
        trip += [("STATE", t, [4] * n), ("ACTION", t, [5] * n)]
        if t < turns - 1:
            trip.append(("OBS", t, [6] * n))
    return Trajectory.from_triples(trip)


def _causal(T):
    return Visibility(torch.zeros(T, 1, dtype=torch.int32), torch.arange(1, T + 1, dtype=torch.int32)[:, None])


CASES = {
    # name: (visibility factory, Hq, Hkv, D, dtype)
    "retain-f16-d64-gqa2": (lambda: pack([_traj(90, 9, 3), _traj(40, 13, 2)], "retain")[0].visibility, 2, 1, 64,
                            torch.float16),
    "recompute-bf16-d128-gqa2": (lambda: pack([_traj(70, 6, 2), _traj(30, 5, 2)], "recompute")[0].visibility, 4, 2,
                                 128, torch.bfloat16),
    "causal-f16-d128-gqa3": (lambda: _causal(150), 3, 1, 128, torch.float16),
    "paper-bf16-d64-mha": (lambda: pack([_traj(70, 6, 2), _traj(30, 5, 2)], "paper")[0].visibility, 2, 2, 64,
                           torch.bfloat16),
    # T = 2 * 64 + 1: the last key block holds one key, and its tile with the last query block is FULL (1 x 1): the
    # only way a full tile can be ragged (hi <= p + 1), where the zero-filled keys beyond T must still be masked
    "causal-bf16-d64-tail": (lambda: _causal(129), 1, 1, 64, torch.bfloat16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_emulated_kernels_match_oracle(emu, case):
    make, Hq, Hkv, D, dtype = CASES[case]
    vis = make().validate()
    assert vis.T % BN != 0, "the cases exercise ragged last tiles"
    res = emulate(emu, vis, Hq, Hkv, D, dtype)
    check_against_oracle(res, vis, dtype)


def test_emulated_cases_cover_full_and_partial_tiles():
    kinds = set()
    for make, *_ in CASES.values():
        vis = make()
        bm = vis.block_map(BM, BN)
        kinds |= {"partial"} if bm.partial_idx.numel() else set()
        kinds |= {"full"} if bm.full_idx.numel() else set()
        nK = bm.num_k_blocks
        last_full = bm.full_idx[bm.full_ptr[-2]:bm.full_ptr[-1]]
        kinds |= {"ragged full"} if vis.T % BN and bool((last_full == nK - 1).any()) else set()
    assert kinds == {"partial", "full", "ragged full"}


def test_emulated_empty_rows_and_unseen_blocks(emu):
    """Rows with no visible key (single ones, and a whole query block) output 0 with lse -inf and get dq = 0; keys
    no row sees (a whole key block) get dk = dv = 0; nothing is NaN."""
    T = 150
    lo = torch.zeros(T, 2, dtype=torch.int32)
    hi = torch.zeros(T, 2, dtype=torch.int32)
    for p in range(T):
        if 64 <= p < 128 or p % 7 == 3:
            continue  # no visible key
        lo[p, 0], hi[p, 0] = 0, min(p + 1, 30)
        if p >= 40:  # rows >= 128 see [0, 30) and their own block: no row sees keys 64..127
            lo[p, 1], hi[p, 1] = 40 if p < 64 else 128, p + 1
    vis = Visibility(lo, hi).validate()
    bm = vis.block_map(BM, BN)
    assert int(bm.partial_ptr[2] - bm.partial_ptr[1]) + int(bm.full_ptr[2] - bm.full_ptr[1]) == 0
    res = emulate(emu, vis, 2, 1, 64, torch.float16)
    check_against_oracle(res, vis, torch.float16)
    empty = (vis.hi.long() - vis.lo.long()).sum(1) == 0
    assert empty.sum() > 64
    assert (res["out"][empty] == 0).all() and torch.isinf(res["lse"][:, empty]).all()
    assert (res["dq"][empty] == 0).all()
    assert (res["dk"][64:128] == 0).all() and (res["dv"][64:128] == 0).all()


def test_emulated_results_do_not_depend_on_the_schedule(emu):
    """Two thread schedules, bitwise the same forward and backward (no atomics, fixed reduction order)."""
    vis = pack([_traj(70, 6, 2)], "recompute")[0].visibility
    a = emulate(emu, vis, 2, 1, 64, torch.bfloat16, schedule=1)
    b = emulate(emu, vis, 2, 1, 64, torch.bfloat16, schedule=2)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert torch.equal(a[name], b[name]), name


def test_emulated_negative_control(emu):
    """The comparison has teeth: the same kernels fed a block map without its full tiles disagree with the oracle."""
    vis = _causal(150)
    bm = vis.block_map(BM, BN)
    broken = Visibility(vis.lo.clone(), vis.hi.clone())
    block_map_cache(broken.lo, broken.hi)[(BM, BN)] = type(bm)(bm.BM, bm.BN, bm.T, bm.partial_ptr, bm.partial_idx,
                                             torch.zeros_like(bm.full_ptr), bm.full_idx[:0])
    assert bm.full_idx.numel() > 0
    res = emulate(emu, broken, 1, 1, 64, torch.float16, backward=False)
    with pytest.raises(AssertionError):
        check_against_oracle(res, vis, torch.float16, backward=False)


SMEM_LIMITS = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}  # opt-in dynamic shared memory per block


def test_shared_memory_per_kernel(emu):
    """ptxas reports 0 bytes for these kernels (their shared memory is dynamic): the launchers' own figures, printed
    (pytest -s) and checked against the A100 / H100 per-block limits for every supported K."""
    smem = emu.lib.mem1_state_attention_smem_bytes
    smem.argtypes = [ctypes.c_int32, ctypes.c_int64, ctypes.c_int64]
    smem.restype = ctypes.c_int64
    print("\nstate_attention.cu dynamic shared memory per block (bytes), K = intervals per row")
    for D in (64, 128):
        for K in (1, 2, 3, 16):
            row = {name: smem(i, D, K) for i, name in enumerate(("fwd", "dkdv", "dq"))}
            print(f"  D={D:<3} K={K:<2} " + "  ".join(f"{n}={b}" for n, b in row.items()))
            assert all(0 < b <= min(SMEM_LIMITS.values()) for b in row.values()), row
    assert smem(0, 64, 2) == 47104 and smem(1, 128, 2) == 125952 and smem(2, 128, 2) == 105472
    assert smem(0, 32, 2) == -1 and smem(0, 64, 17) == -1 and smem(3, 64, 2) == -1


def test_launchers_reject_what_they_do_not_support(emu):
    vis = _causal(70)
    q = torch.zeros(70, 2, 64, dtype=torch.float16)
    k = torch.zeros(70, 1, 64, dtype=torch.float16)
    out, lse = torch.empty_like(q), torch.empty(2, 70)

    def rc(**over):
        p, _keep = _make_params(vis, q, k, k, out, lse, 0.125)  # _keep: tensors alive during the call
        for name, val in over.items():
            setattr(p, name, val)
        return emu.call("fwd", torch.float16, p)

    assert rc() == 0
    assert rc(D=32) == 1  # head dim
    assert rc(BM=32) == 1 and rc(BN=128) == 1  # tiles other than the kernels'
    assert rc(Hkv=3) == 1  # Hq % Hkv
    assert rc(q_stride_t=2 * 64 + 4) == 1  # not a multiple of 8 elements
    assert rc(q=q.data_ptr() + 2) == 1  # not 16-byte aligned
    assert rc(K=17) == 1  # more intervals per row than staged in shared memory
    assert rc(T=0) == 0  # nothing to do


# ---------------------------------------------------------------------------------------------------------------
# On a GPU: the backend through the op front
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def cuda_backend():
    if not _cuda_state_attention.available("cuda"):
        reason = f"mem1_fast._C_cuda not available: {_cuda_state_attention.unavailable_reason()}"
        if os.environ.get("MEM1_FAST_REQUIRE_CUDA_EXT", "") not in ("", "0"):
            pytest.fail(reason)
        pytest.skip(reason)
    return "cuda"


def _cuda_vs_oracle(vis, q, k, v, dtype, leaves=None):
    """Forward + backward through the op front on CUDA, compared with the fp64 oracle; returns (out, lse, grads)."""
    go = torch.randn(q.shape, device="cuda")
    vis = vis.to("cuda")
    out, lse = state_attention(q, k, v, vis, return_lse=True, backend="cuda")
    leaves = leaves or (q, k, v)
    grads = torch.autograd.grad((out.float() * go).sum(), leaves)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = oracles.attention(qd, kd, vd, vis.dense())
    ref_grads = torch.autograd.grad((ref * go.double()).sum(), (qd, kd, vd))
    tol = TOL[dtype]
    got = [("out", out, ref)]
    if leaves == (q, k, v):
        got += [(n, a, b) for n, a, b in zip(("dq", "dk", "dv"), grads, ref_grads)]
    for name, a, b in got:
        assert torch.isfinite(a).all(), name
        err = (a.double() - b).abs().max().item()
        assert err <= tol * (1 + b.abs().max().item()), f"{name}: max error {err:.3e}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite].double() - ref_lse[finite]).abs().max() <= 1e-3
    return out, lse, grads


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", ["recompute", "retain", "causal"])
def test_cuda_backend_matches_oracle(cuda_backend, case, D, dtype):
    if case == "causal":
        vis = _causal(1000)
    else:
        vis = pack([_traj(300, 40, 4), _traj(120, 25, 3), _traj(77, 9, 2)], case)[0].visibility
    T, Hq, Hkv = vis.T, 8, 2
    q, k, v = (torch.randn(T, h, D, device="cuda", dtype=dtype, requires_grad=True) for h in (Hq, Hkv, Hkv))
    _cuda_vs_oracle(vis, q, k, v, dtype)


@pytest.mark.cuda
def test_cuda_empty_rows_strided_inputs_and_determinism(cuda_backend):
    T, Hq, Hkv, D, dtype = 333, 4, 2, 64, torch.bfloat16
    lo = torch.zeros(T, 2, dtype=torch.int32)
    hi = torch.zeros(T, 2, dtype=torch.int32)
    for p in range(T):
        if p % 5 == 2 or 128 <= p < 192:
            continue  # no visible key
        lo[p, 0], hi[p, 0] = 0, min(p + 1, 50)
        if p >= 60:
            lo[p, 1], hi[p, 1] = 60, p + 1
    vis = Visibility(lo, hi).validate()
    qkv = torch.randn(T, Hq + 2 * Hkv, D, device="cuda", dtype=dtype, requires_grad=True)  # fused projection
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]  # strided views
        runs.append(_cuda_vs_oracle(vis, q, k, v, dtype, leaves=(qkv,)))
    (out, lse, (g,)), (out2, lse2, (g2,)) = runs
    empty = ((vis.hi.long() - vis.lo.long()).sum(1) == 0).cuda()
    assert (out[empty] == 0).all() and torch.isinf(lse[:, empty]).all() and (g[empty, :Hq] == 0).all()
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    assert torch.equal(g, g2), "the backward must be deterministic"


@pytest.mark.cuda
def test_cuda_backend_refuses_unsupported(cuda_backend):
    vis = _causal(100).to("cuda")
    with pytest.raises(NotImplementedError):
        state_attention(torch.randn(100, 2, 64, device="cuda"), torch.randn(100, 2, 64, device="cuda"),
                        torch.randn(100, 2, 64, device="cuda"), vis, backend="cuda")  # fp32
    x = torch.randn(100, 2, 32, device="cuda", dtype=torch.float16)
    with pytest.raises(NotImplementedError):
        state_attention(x, x, x, vis, backend="cuda")  # head dim 32


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
