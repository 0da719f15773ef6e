"""state_attention forward+backward on MEM1-shaped packed batches (question 512 tokens, turns of 512-1024 tokens,
4/8/16 turns, 8 heads, D = 64), against SDPA with the equivalent dense boolean [1, H, T, T] mask (the original
code path with its mask bug fixed: the baseline of each group) and FlexAttention.

CPU (fp32, retain): the C++ kernels; FlexAttention forward only (it has no CPU backward). CUDA (bf16, retain and
recompute): the Triton and CUDA C++ kernels, FlexAttention forward+backward, and, when installed, FlashAttention
varlen and xformers' memory_efficient_attention over the varlen plan of shapes.varlen_plan (gathered keys,
bottom-right causal masks; the gather is timed with them).

Time: best of a few runs in this process (FlexAttention compiled; compile time not counted). Peak memory: the
highest resident set sampled every millisecond in a fresh subprocess while it runs the variant once (after a
warm-up run), minus the resident set before (CPU); torch.cuda.max_memory_allocated growth on GPU. "bound" is the
speed-up a kernel that touches only visible pairs could reach over the dense mask: T^2 / visible pairs.
visible_TFLOP/s counts the flops of visible pairs only (forward 4 D per pair, backward 10 D more).
"""
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import record
from shapes import mem1_batch, varlen_plan

HERE = Path(__file__).resolve().parent
TURNS = [4, 8, 16]
H, D = 8, 64


def dtype_for(device):
    return torch.float32 if device == "cpu" else torch.bfloat16  # the CUDA C++ kernels take fp16 / bf16


def inputs(T, device, dtype=None, seed=0):
    dtype = dtype or dtype_for(device)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, H, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    return q, k, v, torch.randn(T, H, D, generator=g).to(device, dtype)


def run_variant(variant, vis, q, k, v, go):
    """One forward+backward (forward only for FlexAttention on CPU, where it has no backward)."""
    from mem1_fast.ops import state_attention
    if variant == "sdpa_dense":
        mask = vis.dense()[None, None]
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask)[0]
        out = out.transpose(0, 1)
    elif variant == "flex_fwd":
        with torch.no_grad():  # CPU FlexAttention refuses inputs that require grad
            return flex(vis, q.detach(), k.detach(), v.detach())
    elif variant == "flex":
        out = flex(vis, q, k, v)
    elif variant in ("flash_varlen", "xformers"):
        out = dense_varlen(variant, vis, q, k, v)
    else:
        out = state_attention(q, k, v, vis, backend=variant)
    out.backward(go)
    return out


_FLEX = {}


def flex(vis, q, k, v):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    key = (id(vis), q.device.type)
    if key not in _FLEX:
        lo, hi = vis.lo.long().to(q.device), vis.hi.long().to(q.device)

        def mask_mod(b, h, qi, kv):
            ok = (kv >= lo[qi, 0]) & (kv < hi[qi, 0])
            for j in range(1, lo.shape[1]):
                ok = ok | ((kv >= lo[qi, j]) & (kv < hi[qi, j]))
            return ok
        _FLEX[key] = create_block_mask(mask_mod, None, None, vis.T, vis.T, device=q.device.type)
    if "fn" not in _FLEX:  # compiled: eager FlexAttention is a math fallback that materializes the scores
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    out = _FLEX["fn"](*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=_FLEX[key])
    return out[0].transpose(0, 1)


_PLANS = {}


def dense_varlen(variant, vis, q, k, v):
    """FlashAttention varlen / xformers over the visibility's varlen plan (shapes.varlen_plan): keys gathered per
    sequence (the question's K/V copied into each turn's sequence), bottom-right-aligned causal masking."""
    if id(vis) not in _PLANS:
        _, k_index, cu_q, cu_k = varlen_plan(vis)
        _PLANS[id(vis)] = (k_index.to(q.device), cu_q.to(q.device), cu_k.to(q.device), cu_q.diff().tolist(),
                           cu_k.diff().tolist())
    k_index, cu_q, cu_k, len_q, len_k = _PLANS[id(vis)]
    kg, vg = k.index_select(0, k_index), v.index_select(0, k_index)
    if variant == "flash_varlen":
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func(q, kg, vg, cu_q, cu_k, max(len_q), max(len_k), causal=True)
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalFromBottomRightMask
    bias = BlockDiagonalCausalFromBottomRightMask.from_seqlens(q_seqlen=len_q, kv_seqlen=len_k)
    return xops.memory_efficient_attention(q[None], kg[None], vg[None], attn_bias=bias)[0]


def _importable(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


def variants(device):
    from mem1_fast.ops.state_attention import available_backends
    kernels = [b for b in available_backends(device) if b not in ("reference",)]
    if device == "cpu":
        kernels = [b for b in kernels if b != "triton"]  # the interpreter is a correctness tool, not a contender
        return ["sdpa_dense"] + kernels + ["flex_fwd"]
    dense = [name for name, mod in (("flash_varlen", "flash_attn"), ("xformers", "xformers")) if _importable(mod)]
    return ["sdpa_dense"] + kernels + ["flex"] + dense


def best_time(fn, device, reps=3):
    fn()  # warm-up (and compile caches)
    ts = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return min(ts)


def peak_memory_mb(variant, turns, mode, device, run=None, tensors=()):
    if device == "cuda":  # the CUDA allocator's peak is exact in this process: no subprocess needed
        for x in tensors:
            x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    code = f"""
import json, sys, torch
sys.path[:0] = [{str(HERE)!r}, {str(HERE.parent / 'tests')!r}]
from shapes import mem1_batch, varlen_plan
from benchmark_state_attention import inputs, run_variant
vis = mem1_batch({turns}, {mode!r}).visibility.to({device!r})
q, k, v, go = inputs(vis.T, {device!r})
vis.block_map(64, 64)
run_variant({variant!r}, vis, q, k, v, go)  # warm-up: compile caches, allocator pools
q.grad = k.grad = v.grad = None
import gc, threading, time, os
gc.collect()
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
base, peak, done = rss(), [0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], rss()); time.sleep(0.001)
th = threading.Thread(target=sample); th.start()
run_variant({variant!r}, vis, q, k, v, go)
done[0] = True; th.join()
print(json.dumps({{"mb": max(peak[0] - base, 0) / 2**20}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        return f"failed: {out.stderr.strip().splitlines()[-1][:80]}"
    return round(json.loads(out.stdout.strip().splitlines()[-1])["mb"], 1)


def visible_tflops(vis, seconds, fwd_only):
    # forward: 2 matmuls (QK^T, PV) of 2*D flops per visible pair; backward: 5 more (FA-2 accounting)
    flops = vis.visible_pairs() * H * 2 * D * (2 if fwd_only else 7)
    return round(flops / seconds / 1e12, 3)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# CPU: retain (the table); CUDA: both exact modes (recompute is the one FlashAttention varlen and xformers
# express through the varlen plan with gathered keys; retain too, with turn windows copied).
CASES = [("cpu", "retain", t) for t in TURNS] + [("cuda", m, t) for m in ("retain", "recompute") for t in TURNS
                                                  if "cuda" in DEVICES]


@pytest.mark.parametrize("device,mode,turns", CASES, ids=[f"{d}-{m}-{t}turns" for d, m, t in CASES])
def test_state_attention_vs_dense_mask(benchmark, turns, mode, device):
    vis = mem1_batch(turns, mode).visibility.to(device)
    T = vis.T
    q, k, v, go = inputs(T, device)
    bound = T * T / vis.visible_pairs()
    group = f"state_attention fwd+bwd {device} {str(q.dtype)[6:]} {mode} {turns} turns (T={T}, H={H}, D={D})"
    main = None
    for variant in variants(device):
        try:
            sec = best_time(lambda: run_variant(variant, vis, q, k, v, go), device)
        except Exception as e:  # e.g. FlexAttention refusing a configuration on this device
            record(group, variant, math.nan, note=f"{type(e).__name__}")
            continue
        extra = {"peak_mb": peak_memory_mb(variant, turns, mode, device, tensors=(q, k, v),
                                           run=lambda: run_variant(variant, vis, q, k, v, go))}
        if variant == "sdpa_dense":
            extra["bound"] = round(bound, 2)
        elif variant in ("cpp", "triton", "cuda"):
            bm = vis.block_map(64, 64)
            extra["tile_area/visible"] = round(bm.tile_area() / vis.visible_pairs(), 3)
        extra["visible_TFLOP/s"] = visible_tflops(vis, sec, variant == "flex_fwd")
        record(group, variant, sec, baseline=variant == "sdpa_dense", **extra)
        if variant in ("cpp", "triton", "cuda") and main is None:
            main = variant
    backend = main or "reference"
    benchmark.pedantic(lambda: run_variant(backend, vis, q, k, v, go), rounds=2, iterations=1)
