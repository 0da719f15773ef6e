"""Compile the Triton kernels for sm_80 / sm_90a without a GPU and report registers, spills and shared memory.

    python tools/triton_report.py {state_attention,logprob_entropy,paged_attention} [--arch 80 90] [--all] [--json]
    python tools/triton_report.py state_attention --tune        # the autotuning candidates of the fast kernels

Runs the kernels un-interpreted: start it without TRITON_INTERPRET=1 (the decorators read it at import). Per kernel
module, the report compiles the configurations the module ships (its CONFIGS), with the argument types its launcher
specializes. The tests (tests/test_*_triton.py, tests/test_paged_attention.py) run it for both archs and fail on a
spill in the main configurations. This tooling lives here, not in the runtime kernel modules.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import tempfile


def _module(name: str):
    return importlib.import_module(f"mem1_fast.triton_kernels.{name}")


def resource_usage(cubin: bytes, name: str) -> dict:
    """Registers, stack (= spill space: Triton kernels have no other stack use), local and static shared memory of
    one kernel, from cuobjdump -res-usage (milliseconds, also on a Triton cache hit)."""
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = os.path.join(os.path.dirname(get_ptxas(80).path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Function " + re.escape(name) + r":\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"no resource usage for {name} in cuobjdump output:\n{out}")
    return {"registers": int(m.group(1)), "stack": int(m.group(2)), "static_smem": int(m.group(3)),
            "local": int(m.group(4))}


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, num_warps: int = 4, num_stages: int = 2,
                   divisible_by_16: tuple[str, ...] = ()) -> dict:
    """triton.compile of one @jit function for `sm_{arch}` (90 means sm_90a); its figures from cuobjdump.
    `signature` maps each non-constexpr argument to a Triton type ("*fp16", "i32", "fp32", ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        sig[name] = "constexpr" if name in constexprs else signature[name]
        if sig[name].startswith("*") or name in divisible_by_16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    ck = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": num_warps, "num_stages": num_stages})
    usage = resource_usage(ck.asm["cubin"], ck.metadata.name)
    return dict(arch=f"sm_{arch}" + ("a" if arch >= 90 else ""), num_warps=num_warps, num_stages=num_stages,
                smem=ck.metadata.shared, **usage)


# --- state_attention -------------------------------------------------------------------------------------------
SA_KERNELS = {  # name in reports -> (kernel, constexpr overrides, which Launch of the Config, (tile BM, tile BN))
    "fwd": ("_fwd_kernel", {"SANITIZE": False}, "fwd", ("BM", "BN")),
    "fwd_nan": ("_fwd_kernel", {"SANITIZE": True}, "fwd_nan", ("BM", "BN")),
    "preprocess": ("_bwd_preprocess_kernel", {"BLK": 64}, "pre", None),
    "dkdv": ("_bwd_dkdv_kernel", {"SANITIZE": False}, "dkdv", ("BM_kv", "BN_kv")),
    "dkdv_nan": ("_bwd_dkdv_kernel", {"SANITIZE": True}, "dkdv_nan", ("BM_kv", "BN_kv")),
    "dq": ("_bwd_dq_kernel", {"SANITIZE": False}, "dq", ("BM", "BN")),
    "dq_nan": ("_bwd_dq_kernel", {"SANITIZE": True}, "dq_nan", ("BM", "BN")),
    "kv_flag": ("_kv_nonfinite_kernel", {"BLK": 64}, None, None),
}
SA_MAIN_CONFIGS = [(D, dt) for D in (64, 128) for dt in ("fp16", "bf16")]
SA_MAIN_KERNELS = ("fwd", "dkdv", "dq")  # the fast path of every training step; the *_nan variants run only when
#                                         K/V hold a non-finite value
_TORCH_DT = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def sa_shipped_configs():
    """Every (D, dtype name) with a shipped GPU config."""
    return [(D, dt) for D in _module("state_attention").HEAD_DIMS for dt in _TORCH_DT]


def _sa_config(D: int, dtype: str):
    import torch
    sa = _module("state_attention")
    return sa.CONFIGS[(D, sa._dtype_class(getattr(torch, _TORCH_DT[dtype])))]


def sa_compile(kernel: str, D: int, dtype: str, arch: int, NK: int = 2, config=None) -> dict:
    import triton.language as tl
    sa = _module("state_attention")
    fn_name, fixed, launch_field, tiles = SA_KERNELS[kernel]
    fn = getattr(sa, fn_name)
    cfg = config or _sa_config(D, dtype)
    consts = dict(D=D, NK=NK, CD=getattr(tl, _TORCH_DT[dtype]), PREC="ieee" if dtype == "fp32" else "tf32", **fixed)
    if tiles is not None:
        consts["BM"], consts["BN"] = getattr(cfg, tiles[0]), getattr(cfg, tiles[1])
    launch = getattr(cfg, launch_field) if launch_field else sa.Launch(4, 1)
    sig = {}
    for name in fn.arg_names:
        if name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            sig[name] = "*" + dtype
        elif name in ("LSE", "LSE2", "DELTA"):
            sig[name] = "*fp32"
        elif name in ("LO", "HI", "PP", "PI", "FP", "FI", "KVBAD"):
            sig[name] = "*i32"
        elif name in ("qk_scale", "scale"):
            sig[name] = "fp32"
        else:  # T, G, strides
            sig[name] = "i32"
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    # what the launcher specializes for torch allocations and [T, H, D] strides with D in {32, 64, 128}
    div16 = tuple(n for n in fn.arg_names if n.startswith("stride"))
    r = compile_kernel(fn, sig, consts, arch, launch.num_warps, launch.num_stages, div16)
    t = consts.get("BM"), consts.get("BN")
    return dict(kernel=kernel, D=D, dtype=dtype, tiles=f"{t[0]}x{t[1]}" if t[0] else "-", **r)


def sa_report(a) -> list[dict]:
    combos = sa_shipped_configs() if a.all else SA_MAIN_CONFIGS
    if a.head_dims:
        combos = [c for c in combos if c[0] in a.head_dims]
    if a.dtypes:
        combos = [c for c in combos if c[1] in a.dtypes]
    if a.tune:  # every autotuning candidate in place of the shipped launch
        sa = _module("state_attention")
        return [sa_compile(k, D, dt, arch, config=dataclasses.replace(_sa_config(D, dt), **{SA_KERNELS[k][2]: t}))
                for arch in a.arch for D, dt in combos for k in (a.kernels or SA_MAIN_KERNELS)
                for t in sa.TUNE_LAUNCHES]
    kernels = a.kernels or (list(SA_KERNELS) if a.all else SA_MAIN_KERNELS)
    return [sa_compile(k, D, dt, arch) for arch in a.arch for D, dt in combos for k in kernels]


# --- logprob_entropy (and ppo_loss's per-token kernel) ----------------------------------------------------------
# name in reports -> (module, kernel, fixed constexprs, config field or None)
LE_KERNELS = {
    "fwd": ("logprob_entropy", "_fwd_kernel", {"EVEN_H": True}, "fwd"),
    "combine": ("logprob_entropy", "_combine_kernel", {"BLOCK": 256}, None),
    "dz": ("logprob_entropy", "_dz_kernel", {"EVEN_H": True, "GROUP": 8}, "dz"),
    # A = dz (K-stride 1) for d_hidden, dz^T (M-stride 1) for d_weight: the launcher specializes a stride of 1 as a
    # constant, and so does the check
    "gemm_dh": ("logprob_entropy", "_gemm_kernel", {"ACCUM": False, "s_ak": 1}, "dh"),
    "gemm_dh_acc": ("logprob_entropy", "_gemm_kernel", {"ACCUM": True, "s_ak": 1}, "dh"),
    "gemm_dw": ("logprob_entropy", "_gemm_kernel", {"ACCUM": False, "s_am": 1}, "dw"),
    "gemm_dw_acc": ("logprob_entropy", "_gemm_kernel", {"ACCUM": True, "s_am": 1}, "dw"),
    "ppo_token": ("ppo_loss", "_ppo_token_kernel", {"BLOCK": 256, "HAS_REF": True, "HAS_W": True}, None),
}
LE_MAIN_CONFIGS = [(4096, "bf16")]  # Qwen-7B-class LM heads in bf16: must not spill


def le_shipped_configs():
    """Every (H, dtype name) that selects a distinct shipped configuration and dot dtype."""
    return [(H, dt) for H in (1024, 4096, 8192) for dt in _TORCH_DT]


def le_compile(kernel: str, H: int, dtype: str, arch: int) -> dict:
    """Argument types as the launcher specializes them for the main shapes: torch allocations (pointers 16-byte
    aligned), H and V multiples of 16 (4096, 151936 / 152064, ...), so the row strides and the gradient GEMMs'
    sizes are too (the dz buffer's rows are padded to 16 elements); N (rows) is arbitrary."""
    import torch
    import triton.language as tl
    le = _module("logprob_entropy")
    mod_name, fn_name, fixed, field = LE_KERNELS[kernel]
    fn = getattr(_module(mod_name), fn_name)
    cfg = le.CONFIGS[(le._dtype_class(getattr(torch, _TORCH_DT[dtype])), le._h_class(H))]
    consts = dict(CD=getattr(tl, _TORCH_DT[dtype]), PREC="ieee" if dtype == "fp32" else "tf32", **fixed)
    tiles, launch = "-", (4, 1)
    if field is not None:
        c = getattr(cfg, field)
        if isinstance(c, le.Tile):
            consts.update(BLOCK_N=c.BLOCK_N, BLOCK_V=c.BLOCK_V, BLOCK_H=c.BLOCK_H)
            tiles = f"{c.BLOCK_N}x{c.BLOCK_V}x{c.BLOCK_H}"
        else:
            consts.update(BM=c.BM, BN=c.BN, BK=c.BK, GROUP_M=c.GROUP_M)
            tiles = f"{c.BM}x{c.BN}x{c.BK}"
        launch = (c.num_warps, c.num_stages)
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    # the gradient GEMMs as the last chunk runs them: C = the gradient in the input dtype, CIN = the fp32 sum
    data = {"X": dtype, "W": dtype, "DZ": dtype, "A": dtype, "B": dtype, "C": dtype, "CIN": "fp32"}
    f32_ptrs = {"PART", "LOGP", "ENT", "STATS", "GL", "GE", "OLD", "ADV", "REF", "TW", "LOSS"}
    floats = {"inv_tau", "alpha", "clip_eps", "ent_coef", "kl_coef", "inv_norm"}
    div16 = ("H", "V", "M", "NC", "K", "stride_x", "stride_w", "stride_dz", "s_am", "s_ak", "s_bk", "s_cm", "s_cin")
    sig = {}
    for name in fn.arg_names:
        if name in data:
            sig[name] = "*" + data[name]
        elif name == "TGT":
            sig[name] = "*i64"
        elif name in f32_ptrs:
            sig[name] = "*fp32"
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    r = compile_kernel(fn, sig, consts, arch, launch[0], launch[1], div16)
    return dict(kernel=kernel, H=H, dtype=dtype, tiles=tiles, **r)


def le_report(a) -> list[dict]:
    combos = le_shipped_configs() if a.all else LE_MAIN_CONFIGS
    rows = []
    for arch in a.arch:
        for H, dt in combos:
            for k in a.kernels or list(LE_KERNELS):
                if k == "ppo_token" and (H, dt) != combos[0]:
                    continue  # elementwise on fp32 [N]: independent of H and dtype
                rows.append(le_compile(k, H, dt, arch))
    return rows


# --- paged_attention ---------------------------------------------------------------------------------------------
def paged_report(a) -> list[dict]:
    """The paged decode and combine kernels for Qwen-class heads: D = 64 / 128, GQA groups 1 / 4 / 8, fp16 / bf16 /
    fp32 caches (every configuration: they are few)."""
    import triton.language as tl
    pa = _module("paged_attention")
    rows = []
    for arch in a.arch:
        for dt in _TORCH_DT:
            for D in (64, 128):
                for G in (1, 4, 8):
                    sig = {n: "i32" for n in pa._paged_kernel.arg_names}
                    sig.update(Q=f"*{dt}", KC=f"*{dt}", VC=f"*{dt}", TAB="*i32", SEQ="*i32", LO="*i32", HI="*i32",
                               PO="*fp32", PM="*fp32", PL="*fp32", scale="fp32")
                    consts = dict(G=G, D=D, BLOCK_G=max(1, 1 << (G - 1).bit_length()), BLOCK_D=D,
                                  BLOCK_N=pa.block_n(G, D), ACC=tl.float32)
                    r = compile_kernel(pa._paged_kernel, sig, consts, arch)
                    rows.append(dict(kernel="paged", dtype=dt, D=D, G=G, tiles=f"{consts['BLOCK_N']} slots", **r))
                sig = {n: "i32" for n in pa._combine_kernel.arg_names}
                sig.update(PO="*fp32", PM="*fp32", PL="*fp32", OUT=f"*{dt}")
                r = compile_kernel(pa._combine_kernel, sig, dict(D=D, BLOCK_S=16, BLOCK_D=D), arch)
                rows.append(dict(kernel="combine", dtype=dt, D=D, G=0, tiles="-", **r))
    return rows


def format_report(rows: list[dict]) -> str:
    """A fixed-width table of report rows (the size column is D or H, whichever the rows have)."""
    size = "D" if rows and "D" in rows[0] else "H"
    head = (f"{'kernel':<12}{size:>5} {'dtype':<5} {'arch':<7}{'tiles':>12} {'warps':>5} {'stages':>6} {'regs':>5} "
            f"{'spill(B)':>8} {'smem(B)':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['kernel']:<12}{r[size]:>5} {r['dtype']:<5} {r['arch']:<7}{r['tiles']:>12} "
                     f"{r['num_warps']:>5} {r['num_stages']:>6} {r['registers']:>5} {r['stack'] + r['local']:>8} "
                     f"{r['smem']:>8}")
    return "\n".join(lines)


REPORTS = {"state_attention": sa_report, "logprob_entropy": le_report, "paged_attention": paged_report}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("module", choices=sorted(REPORTS))
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--all", action="store_true", help="every shipped config and kernel (default: the main ones)")
    ap.add_argument("--kernels", nargs="+")
    ap.add_argument("--head-dims", type=int, nargs="+", help="state_attention: only these head dims")
    ap.add_argument("--dtypes", nargs="+", help="state_attention: only these dtypes")
    ap.add_argument("--tune", action="store_true", help="state_attention: the autotuning candidates TUNE_LAUNCHES")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the report compiles the kernels for a GPU")
    rows = REPORTS[a.module](a)
    print(json.dumps(rows) if a.json else format_report(rows))


if __name__ == "__main__":
    main()
