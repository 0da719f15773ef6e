"""Triton backend of logprob_entropy and of the fused PPO loss (triton_kernels/logprob_entropy.py, ppo_loss.py), and
the CUDA C++ forward (csrc/cuda/logprob_entropy.cu).

Under the interpreter (TRITON_INTERPRET=1, set by conftest.py): every tile path with small forced tiles (ragged rows,
vocabulary and hidden tiles, several vocabulary splits, backward chunks along rows and along the vocabulary with the
fp32 accumulation across chunks), dtypes (fp16, bf16, mixed), strides, determinism, extreme logits, the fused PPO
loss -- all against the fp64 oracle. tests/test_logprob_entropy.py and tests/test_ppo_loss.py run the backend at the
shared shapes too.
GPU readiness without a GPU: the kernels compile for sm_80 and sm_90a with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))` in a subprocess without TRITON_INTERPRET, registers / spills / shared memory are
printed (`pytest -s`), and the main configuration (bf16, H = 4096) must not spill.

    MEM1_FAST_TEST_TRITON_COMPILE=all python -m pytest tests/test_logprob_entropy_triton.py -q -s -k compile
compiles every shipped configuration (fp16 / bf16 / fp32 x H = 1024 / 4096 / 8192; minutes on 2 cores).
The .cu forward: nvcc compile (sm_80 / sm_90a, no spills) is tests/test_csrc_build.py; here its header compiles
host-only, its reduction helpers (shared by the kernels) are checked on the host, and the kernels themselves run on a
CPU emulator (the .cu compiled by g++ with -DMEM1_LPE_EMULATE, CUDA threads as fibers) against the fp64 oracle. With a
CUDA device, the tests marked `cuda` run the Triton backend and the .cu (built with nvcc into a shared library, called
through ctypes) against the oracle.
"""
from __future__ import annotations

import ctypes
import itertools
import math
import os
import shutil
import subprocess
from pathlib import Path

import oracles
import pytest
import torch
from triton_compile import SMEM_LIMIT, compile_rows, report

from mem1_fast.ops import logprob_entropy
from mem1_fast.ops.ppo_loss import ppo_loss

tk = pytest.importorskip("mem1_fast.triton_kernels.logprob_entropy")
tp = pytest.importorskip("mem1_fast.triton_kernels.ppo_loss")

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
interpreted = pytest.mark.skipif(not tk.available("cpu"), reason="needs TRITON_INTERPRET=1 before triton kernels load")


@pytest.fixture
def tiles(monkeypatch):
    """Force small interpreter tiles: (BLOCK_N, BLOCK_V, BLOCK_H) of the logits-tile kernels, the gradient GEMMs' tiles
    derived from them, the forward's vocabulary splits and the backward's chunking."""
    def set_tiles(bn=16, bv=64, bh=16, splits=3, chunk_bytes=1 << 30, axis=None):
        t = tk.Tile(bn, bv, bh, 4, 1)
        cfg = tk.Config(fwd=t, dz=t, dh=tk.Gemm(bn, 64, bv, 2, 4, 1), dw=tk.Gemm(bv, 64, bn, 2, 4, 1))
        monkeypatch.setattr(tk, "INTERPRETER_CONFIG", cfg)
        monkeypatch.setattr(tk, "INTERPRETER_FIT", False)
        monkeypatch.setattr(tk, "INTERPRETER_SPLITS", splits)
        monkeypatch.setattr(tk, "INTERPRETER_CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(tk, "CHUNK_AXIS", axis)
        return cfg
    return set_tiles


def case(N, H, V, dtype=torch.float32, scale=1.0, seed=0, wdtype=None):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(wdtype or dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, targets, torch.randn(N, generator=g), torch.randn(N, generator=g)


def run_triton(hidden, weight, targets, temperature, g_lp, g_ent):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = logprob_entropy(h, w, targets, temperature, backend="triton")
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return lp, ent, h.grad, w.grad


def run_oracle(hidden, weight, targets, temperature, g_lp, g_ent):
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp, ent = oracles.logprob_entropy(h, w, targets, temperature)
    ((lp * g_lp.double()).sum() + (ent * g_ent.double()).sum()).backward()
    return lp, ent, h.grad, w.grad


def assert_close(got, want, tol, grad_tol=None):
    for name, a, b, t in zip(("logp", "entropy", "d_hidden", "d_weight"), got, want,
                             (tol, tol, grad_tol or tol, grad_tol or tol)):
        assert torch.isfinite(a).all(), name
        rel = ((a.double() - b).abs().max() / b.abs().max().clamp(min=1.0)).item()
        assert rel <= t, f"{name}: relative error {rel:.2e} > {t:.0e}"


# ---------------------------------------------------------------------------------------------------------------
# Tile paths under the interpreter
# ---------------------------------------------------------------------------------------------------------------

@interpreted
@pytest.mark.parametrize("N,H,V,bh,axis,chunk_bytes", [
    (37, 40, 300, 16, None, 1 << 30), (37, 40, 300, 16, "row", 16 * 300 * 4), (37, 40, 300, 16, "vocab", 37 * 64 * 4),
    (37, 32, 300, 16, None, 1 << 30), (16, 48, 64, 64, None, 1 << 30)],
    ids=["ragged-one-chunk", "ragged-row-chunks", "ragged-vocab-chunks", "even-H", "single-tiles"])
def test_tile_paths_against_oracle(tiles, N, H, V, bh, axis, chunk_bytes):
    """3 row blocks (last ragged) x 5 vocabulary tiles (last ragged) x 3 hidden steps (last ragged, or even), 3
    vocabulary splits of 2 / 2 / 1 tiles; the backward in one chunk, in row slabs (d_weight summed across chunks)
    or in vocabulary slabs (d_hidden summed across chunks)."""
    tiles(bh=bh, chunk_bytes=chunk_bytes, axis=axis)
    args = case(N, H, V)
    assert_close(run_triton(*args[:3], 0.7, *args[3:]), run_oracle(*args[:3], 0.7, *args[3:]), 1e-5)


@interpreted
def test_chunk_plans_cover_the_matrix_within_budget(tiles):
    cfg = tiles()
    for N, V, budget, axis in [(37, 300, 1 << 30, None), (37, 300, 16 * 300 * 4, "row"), (37, 300, 3000, "vocab"),
                               (300, 100, 64 * 100 * 4, None), (10, 1000, 10 * 64 * 4, None), (5, 7, 1, "row")]:
        got_axis, chunks = tk.plan_chunks(N, V, 4, cfg, budget=budget, axis=axis)
        covered = torch.zeros(N, V, dtype=torch.int32)
        for r0, R, c0, C in chunks:
            covered[r0:r0 + R, c0:c0 + C] += 1
            assert R * C * 4 <= max(budget, 4 * max(cfg.dz.BLOCK_N * V, cfg.dz.BLOCK_V * N))
        assert (covered == 1).all(), (N, V, budget, axis)
        if len(chunks) > 1 and axis is None:
            assert got_axis == ("vocab" if N < V else "row")  # the smaller gradient is the one summed over chunks


@interpreted
@pytest.mark.parametrize("axis,chunk_bytes", [("row", 16 * 300 * 2), ("vocab", 37 * 64 * 2)])
def test_fp16_gradients_accumulate_in_fp32_across_chunks(tiles, axis, chunk_bytes):
    """fp16 outputs summed over chunks go through a fp32 scratch (a fp16 running sum would lose ~1e-3 per chunk)."""
    tiles(chunk_bytes=chunk_bytes, axis=axis)
    args = case(37, 40, 300, dtype=torch.float16)
    got = run_triton(*args[:3], 1.0, *args[3:])
    assert got[2].dtype == torch.float16 and got[3].dtype == torch.float16
    assert_close(got, run_oracle(*args[:3], 1.0, *args[3:]), 1e-5, grad_tol=4 * torch.finfo(torch.float16).eps)


@interpreted
def test_bf16_inputs(tiles):
    """bf16 is loaded as bf16 and computed in fp32 under the interpreter (its bf16 arithmetic is broken)."""
    tiles()
    args = case(37, 40, 300, dtype=torch.bfloat16)
    got = run_triton(*args[:3], 0.7, *args[3:])
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    assert_close(got, run_oracle(*args[:3], 0.7, *args[3:]), 1e-5, grad_tol=4 * torch.finfo(torch.bfloat16).eps)


@interpreted
def test_mixed_dtypes(tiles):
    """fp32 hidden with a bf16 head: the dots run in fp32, each gradient comes back in its input's dtype."""
    tiles()
    args = case(20, 32, 100, wdtype=torch.bfloat16)
    got = run_triton(*args[:3], 1.0, *args[3:])
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.bfloat16
    assert_close(got, run_oracle(*args[:3], 1.0, *args[3:]), 1e-5, grad_tol=4 * torch.finfo(torch.bfloat16).eps)


@interpreted
@pytest.mark.parametrize("use,need", [("logp", (True, True)), ("entropy", (True, False)), ("logp", (False, True))],
                         ids=["logp-both", "entropy-hidden", "logp-weight"])
def test_partial_upstream_and_needed_gradients(tiles, use, need):
    """g_logp or g_ent None (that output unused); only d_hidden or only d_weight asked for (a frozen head)."""
    tiles(chunk_bytes=16 * 300 * 4, axis="row")
    hidden, weight, targets, g, _ = case(37, 40, 300)
    _, _, stats = tk.forward(hidden, weight, targets, 0.7)
    gl, ge = (g, None) if use == "logp" else (None, g)
    dh, dw = tk.backward(gl, ge, hidden, weight, targets, 0.7, stats, *need)
    assert (dh is None) != need[0] and (dw is None) != need[1]
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    out = oracles.logprob_entropy(h, w, targets, 0.7)[0 if use == "logp" else 1]
    (out * g.double()).sum().backward()
    for a, b in ((dh, h.grad), (dw, w.grad)):
        if a is not None:
            assert ((a.double() - b).abs().max() / b.abs().max().clamp(min=1.0)).item() <= 1e-5


@interpreted
def test_strided_inputs_and_determinism(tiles):
    """hidden rows with a row stride > H (a view, not copied) and a weight stored transposed (copied) give bitwise
    the same results as contiguous inputs; the backward is bitwise reproducible (no atomics, fixed order)."""
    tiles(chunk_bytes=20 * 64 * 4, axis="vocab")
    hidden, weight, targets, gl, ge = case(20, 40, 150)
    big = torch.randn(20, 56)
    big[:, 8:48] = hidden
    h_view = big[:, 8:48]
    w_t = weight.t().contiguous().t()
    assert h_view.stride(0) == 56 and not w_t.is_contiguous()
    ref = tk.forward(hidden, weight, targets, 0.7)
    got = tk.forward(h_view, w_t, targets, 0.7)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    runs = [tk.backward(gl, ge, h, w, targets, 0.7, ref[2], True, True)
            for h, w in ((hidden, weight), (h_view, w_t), (hidden, weight))]
    for r in runs[1:]:
        assert torch.equal(r[0], runs[0][0]) and torch.equal(r[1], runs[0][1])


@interpreted
def test_extreme_and_uniform_logits(tiles):
    """+-1e4-scale hidden: no NaN, logp <= 0 and entropy >= 0 exactly, values close to the oracle relative to the
    logits' scale; all-equal logits: entropy = log V, logp = -log V."""
    tiles()
    hidden, weight, targets, gl, ge = case(37, 40, 300, scale=1e4)
    got = run_triton(hidden, weight, targets, 1.0, gl, ge)
    want = run_oracle(hidden, weight, targets, 1.0, gl, ge)
    for a in got:
        assert torch.isfinite(a).all()
    assert (got[0] <= 0).all() and (got[1] >= 0).all()
    zscale = (hidden.double() @ weight.double().T).abs().max().item()
    assert (got[0].double() - want[0]).abs().max().item() <= 1e-6 * zscale
    assert (got[1].double() - want[1]).abs().max().item() <= 1e-6 * zscale
    lp, ent, _ = tk.forward(hidden, torch.zeros(300, 40), targets, 1.0)
    assert torch.allclose(ent, torch.full_like(ent, math.log(300)), rtol=1e-6)
    assert torch.allclose(lp, torch.full_like(lp, -math.log(300)), rtol=1e-6)


@interpreted
def test_empty_batch_and_interface(tiles):
    tiles()
    hidden, weight = torch.zeros(0, 32), torch.randn(50, 32)
    lp, ent, stats = tk.forward(hidden, weight, torch.zeros(0, dtype=torch.long), 1.0)
    assert lp.shape == ent.shape == (0,)
    dh, dw = tk.backward(torch.zeros(0), None, hidden, weight, torch.zeros(0, dtype=torch.long), 1.0, stats, True,
                         True)
    assert dh.shape == (0, 32) and (dw == 0).all()
    assert tk.available("cpu") and not tk.available("cuda") and tp.available("cpu")
    with pytest.raises(TypeError, match="float64"):
        tk.forward(torch.randn(4, 8).double(), torch.randn(10, 8).double(), torch.zeros(4, dtype=torch.long), 1.0)


@interpreted
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "token-weights"])
def test_fused_ppo_with_small_tiles(tiles, monkeypatch, weighted):
    """The fused PPO loss through the small-tile paths (vocabulary chunks), against the definition on the oracle,
    with and without per-token loss weights."""
    import importlib

    from mem1_fast.ops.ppo_loss import reference_ppo_loss
    ppo_mod = importlib.import_module("mem1_fast.ops.ppo_loss")
    tiles(chunk_bytes=37 * 64 * 4, axis="vocab")
    hidden, weight, targets, _, _ = case(37, 40, 300)
    lp0, _ = oracles.logprob_entropy(hidden, weight, targets, 0.7)
    old = (lp0 + torch.tensor([0.5, -0.5, 0.05, -0.05])[torch.arange(37) % 4]).float()
    adv, ref = torch.randn(37), (lp0 + 0.3 * torch.randn(37).double()).float()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    tw = torch.rand(37) + 0.1 if weighted else None
    loss, lp, ent = ppo_loss(h, w, targets, old, adv, ref, 0.7, 0.2, 0.01, 0.1, token_weights=tw, backend="triton")
    (loss * -1.3).backward()
    h2, w2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    with monkeypatch.context() as m:
        m.setattr(ppo_mod, "logprob_entropy", oracles.logprob_entropy)
        loss2, lp2, ent2 = reference_ppo_loss(h2, w2, targets, old.double(), adv.double(), ref.double(), 0.7, 0.2,
                                              0.01, 0.1, 37.0, None if tw is None else tw.double())
    (loss2 * -1.3).backward()
    for a, b in ((loss, loss2), (lp, lp2), (ent, ent2), (h.grad, h2.grad), (w.grad, w2.grad)):
        assert ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-3)).item() <= 1e-5


def test_shipped_configs_are_consistent():
    for cfg in tk.CONFIGS.values():
        for t in (cfg.fwd, cfg.dz):
            assert min(t.BLOCK_N, t.BLOCK_V, t.BLOCK_H) >= 16
            assert all(x & (x - 1) == 0 for x in (t.BLOCK_N, t.BLOCK_V, t.BLOCK_H))
        for g in (cfg.dh, cfg.dw):
            assert min(g.BM, g.BN, g.BK) >= 16 and all(x & (x - 1) == 0 for x in (g.BM, g.BN, g.BK))
        for launch in (cfg.fwd, cfg.dz, cfg.dh, cfg.dw):
            assert launch.num_warps in (1, 2, 4, 8, 16) and 1 <= launch.num_stages <= 5
    assert set(report.LE_MAIN_CONFIGS) <= set(report.le_shipped_configs())


# ---------------------------------------------------------------------------------------------------------------
# GPU readiness without a GPU: compile for sm_80 and sm_90a
# ---------------------------------------------------------------------------------------------------------------

def _check_rows(rows, combos, no_spill_combos):
    print("\n" + report.format_report(rows))
    got = {(r["kernel"], r["H"], r["dtype"], r["arch"]) for r in rows}
    want = {(k, H, dt, a) for k in report.LE_KERNELS for H, dt in combos for a in ("sm_80", "sm_90a")
            if k != "ppo_token" or (H, dt) == combos[0]}
    assert got == want
    for r in rows:
        assert 0 < r["registers"] <= 255
        assert r["smem"] <= SMEM_LIMIT[r["arch"]], r
    spills = [r for r in rows if (r["H"], r["dtype"]) in no_spill_combos and (r["stack"] or r["local"])]
    assert not spills, "register spills:\n" + report.format_report(spills)


def test_main_configs_compile_for_sm80_and_sm90a_without_spills():
    """Every kernel of the main configuration (bf16, H = 4096: the gradient GEMMs in both chunk variants, the
    forward, merge, dz and PPO-token kernels), for sm_80 and sm_90a, no spills."""
    _check_rows(compile_rows("logprob_entropy", []), report.LE_MAIN_CONFIGS, report.LE_MAIN_CONFIGS)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEM1_FAST_TEST_TRITON_COMPILE", "") != "all",
                    reason="set MEM1_FAST_TEST_TRITON_COMPILE=all (every shipped config; minutes)")
def test_every_shipped_config_compiles():
    _check_rows(compile_rows("logprob_entropy", ["--all"]), report.le_shipped_configs(), report.LE_MAIN_CONFIGS)


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


def _cuda_include() -> Path | None:
    from mem1_fast import _ext
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = _ext.find_nvcc()
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parent.parent))
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").is_file():
            return Path(c) / "include"
    return None


@pytest.mark.parametrize("lang", ["c++", "c"])
def test_cu_header_compiles_host_only(tmp_path, lang):
    compiler = shutil.which("g++" if lang == "c++" else "gcc")
    inc = _cuda_include()
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
# CUDA C++ forward on a CPU emulator: logprob_entropy.cu compiled by g++ with -DMEM1_LPE_EMULATE and this header
# force-included. The CUDA threads of a block are fibers (ucontext) scheduled in a random order between barriers,
# blocks run one after another (so `__shared__` can be `static`), wmma fragments hold whole 16 x 16 tiles (every
# lane computes the tile; lane 0 stores it), __half / __nv_bfloat16 are 2-byte storage types with the real bit
# layouts.
# It runs the kernels' tiling, index math, ragged masks, vector / scalar load paths, warp-level online softmax,
# splits and merge. It cannot show: the real fragment layouts (the wmma API hides them), timing, the memory model.
# ---------------------------------------------------------------------------------------------------------------

EMU_H = r"""
#pragma once
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
template <class T> inline T __ldg(const T* p) { return *p; }

struct __half {
  _Float16 v;
  __half() = default;
  __half(float f) : v(static_cast<_Float16>(f)) {}
  operator float() const { return static_cast<float>(v); }
};
struct __nv_bfloat16 {
  uint16_t b;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) { uint32_t u; std::memcpy(&u, &f, 4); u += 0x7fffu + ((u >> 16) & 1u); b = uint16_t(u >> 16); }
  operator float() const { uint32_t u = uint32_t(b) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};

namespace emu {
// The threads of a block are fibers on one OS thread. Every barrier (__syncthreads, and each half of a warp shuffle)
// is a yield; the scheduler resumes every live fiber once per round, in a seeded random order, so with the kernels'
// uniform control flow each yield is a block-wide barrier and a missing one shows up as a read of stale data.
inline dim3 tid, bid, grid;
inline uint64_t xchg[32][32];
struct Fiber {
  ucontext_t ctx;  // first entry only
  jmp_buf jb;      // later switches: _setjmp / _longjmp, no signal-mask system call
  std::unique_ptr<char[]> stack;
  unsigned t = 0;
  bool started = false, done = false;
};
inline jmp_buf main_jb;
inline ucontext_t main_ctx;
inline std::vector<Fiber>* fibers = nullptr;
inline int cur = -1;
inline std::function<void()>* body = nullptr;
inline void yield() {
  if (!_setjmp((*fibers)[cur].jb)) _longjmp(main_jb, 1);
}
inline void trampoline() {
  (*body)();
  (*fibers)[cur].done = true;
  _longjmp(main_jb, 1);
}
inline int lane() { return int(tid.x % 32); }
inline int warp() { return int(tid.x / 32); }
template <class T> T shfl(T v, int src) {
  static_assert(sizeof(T) <= 8, "");
  std::memcpy(&xchg[warp()][lane()], &v, sizeof(T));
  yield();
  T r;
  std::memcpy(&r, &xchg[warp()][src & 31], sizeof(T));
  yield();
  return r;
}
template <class F> void run_grid(dim3 g, dim3 block, F&& f) {
  grid = g;
  std::function<void()> fn(f);
  body = &fn;
  std::mt19937 rng(1234);
  const unsigned nt = block.x;
  for (unsigned by = 0; by < g.y; ++by)
    for (unsigned bx = 0; bx < g.x; ++bx) {
      std::vector<Fiber> fs(nt);
      fibers = &fs;
      for (unsigned t = 0; t < nt; ++t) {
        fs[t].t = t;
        fs[t].stack.reset(new char[1 << 18]);
        getcontext(&fs[t].ctx);
        fs[t].ctx.uc_stack.ss_sp = fs[t].stack.get();
        fs[t].ctx.uc_stack.ss_size = 1 << 18;
        fs[t].ctx.uc_link = nullptr;
        makecontext(&fs[t].ctx, trampoline, 0);
      }
      std::vector<unsigned> order(nt);
      for (unsigned t = 0; t < nt; ++t) order[t] = t;
      for (bool live = true; live;) {
        live = false;
        std::shuffle(order.begin(), order.end(), rng);
        for (unsigned t : order) {
          if (fs[t].done) continue;
          cur = int(t);
          tid = dim3(t);
          bid = dim3(bx, by);
          if (!_setjmp(main_jb)) {
            if (!fs[t].started) {
              fs[t].started = true;
              swapcontext(&main_ctx, &fs[t].ctx);
            } else {
              _longjmp(fs[t].jb, 1);
            }
          }
          live = live || !fs[t].done;
        }
      }
    }
}
}  // namespace emu

#define threadIdx (emu::tid)
#define blockIdx (emu::bid)
#define gridDim (emu::grid)
inline void __syncthreads() { emu::yield(); }
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return emu::shfl(v, src); }
template <class T> inline T __shfl_xor_sync(unsigned, T v, int m) { return emu::shfl(v, emu::lane() ^ m); }
inline int cudaGetLastError() { return 0; }
#define MEM1_LPE_LAUNCH(kernel, grid_, block_, stream_, ...) \
  emu::run_grid(dim3(grid_), dim3(block_), [&] { kernel(__VA_ARGS__); })

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class L = void> struct fragment { float x[256]; };
template <class U, class T, class L> void fill_fragment(fragment<U, 16, 16, 16, T, L>& f, float v) {
  for (float& e : f.x) e = v;
}
template <class T> void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ld) {
  for (int i = 0; i < 16; ++i) for (int k = 0; k < 16; ++k) f.x[i * 16 + k] = float(p[i * ld + k]);
}
template <class T> void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ld) {
  for (int k = 0; k < 16; ++k) for (int j = 0; j < 16; ++j) f.x[k * 16 + j] = float(p[k + j * ld]);
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
  if (emu::lane() != 0) return;
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) p[i * ld + j] = f.x[i * 16 + j];
}
}  // namespace wmma
}  // namespace nvcuda
"""


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++")
    d = tmp_path_factory.mktemp("lpe_emu")
    (d / "emu.h").write_text(EMU_H)
    lib = d / "liblpe_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-U_FORTIFY_SOURCE", "-shared", "-fPIC", "-Wno-unknown-pragmas",
           "-DMEM1_LPE_EMULATE", "-include", str(d / "emu.h"), "-I", str(CUDA_DIR), "-x", "c++", str(CUDA_DIR / "logprob_entropy.cu"),
           "-o", str(lib)]
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
    if tk.available("cpu") and dtype != torch.bfloat16:
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

@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol,grad_tol", [(torch.bfloat16, 1e-4, 3e-2), (torch.float16, 1e-4, 4e-3),
                                                (torch.float32, 1e-5, 1e-5)])
@pytest.mark.parametrize("N,H,V", [(300, 1024, 32003), (5, 4096, 1000)])
def test_triton_cuda_against_oracle(dtype, tol, grad_tol, N, H, V):
    if not tk.available("cuda"):
        pytest.skip("the Triton kernels were loaded for the interpreter")
    hidden, weight, targets, gl, ge = (x.cuda() for x in case(N, H, V, dtype=dtype))
    got = run_triton(hidden, weight, targets, 0.7, gl, ge)
    want = run_oracle(hidden, weight, targets, 0.7, gl, ge)
    assert_close(got, want, tol, grad_tol)
    # bitwise reproducible backward
    again = run_triton(hidden, weight, targets, 0.7, gl, ge)
    assert torch.equal(got[2], again[2]) and torch.equal(got[3], again[3])


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
    if tk.available("cuda"):
        _, _, stats_t = tk.forward(hidden, weight, targets, 0.7)
        assert torch.allclose(stats, stats_t, rtol=1e-4, atol=1e-4)
