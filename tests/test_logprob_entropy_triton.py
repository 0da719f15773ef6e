"""Triton backend of logprob_entropy and of the fused PPO loss (triton_kernels/logprob_entropy.py, ppo_loss.py). The
CUDA C++ forward (csrc/cuda/logprob_entropy.cu) has its own file, tests/test_logprob_entropy_cuda.py.

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
With a CUDA device, the tests marked `cuda` run the Triton backend against the oracle.
"""
from __future__ import annotations

import math
import os

import oracles
import pytest
import torch
from oracles import logprob_case as case
from triton_compile import SMEM_LIMIT, compile_rows, report

from mem1_fast.ops import logprob_entropy
from mem1_fast.ops.ppo_loss import ppo_loss

tk = pytest.importorskip("mem1_fast.triton_kernels.logprob_entropy")
tp = pytest.importorskip("mem1_fast.triton_kernels.ppo_loss")

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
