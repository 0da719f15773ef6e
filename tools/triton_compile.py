"""Compile Triton kernels for sm_80 / sm_90a without a GPU and report registers, spills and shared memory.

    python tools/triton_compile.py paged_attention [--arch 80 90] [--json]

Runs the kernels un-interpreted: start it without TRITON_INTERPRET=1 (the decorators read it at import). Each
report lists the configurations a kernel module ships; tests/test_paged_attention.py runs it for both archs and
fails on a spill. (The state_attention and logprob_entropy modules still carry their own report CLIs.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, num_warps: int = 4, num_stages: int = 2,
                   divisible_by_16: tuple[str, ...] = ()) -> dict:
    """triton.compile of one @jit function for `sm_{arch}` (90 means sm_90a); its figures from cuobjdump.
    `signature` maps each non-constexpr argument to a Triton type ("*fp16", "i32", "fp32", ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton_kernels._common import resource_usage

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


def paged_attention_report(arch: int) -> list[dict]:
    """The paged decode and combine kernels for Qwen-class heads: D = 64 / 128, GQA groups 1-8, fp16 / bf16 /
    fp32 caches."""
    import triton.language as tl

    from triton_kernels import paged_attention as pa

    rows = []
    for dt in ("fp16", "bf16", "fp32"):
        for D in (64, 128):
            for G in (1, 4, 8):
                sig = {n: "i32" for n in pa._paged_kernel.arg_names}
                sig.update(Q=f"*{dt}", KC=f"*{dt}", VC=f"*{dt}", TAB="*i32", SEQ="*i32", LO="*i32", HI="*i32",
                           PO="*fp32", PM="*fp32", PL="*fp32", scale="fp32")
                consts = dict(G=G, D=D, BLOCK_G=max(1, 1 << (G - 1).bit_length()), BLOCK_D=D, BLOCK_N=pa.block_n(G, D),
                              ACC=tl.float32)
                r = compile_kernel(pa._paged_kernel, sig, consts, arch)
                rows.append(dict(kernel="paged", dtype=dt, D=D, G=G, BLOCK_N=consts["BLOCK_N"], **r))
            sig = {n: "i32" for n in pa._combine_kernel.arg_names}
            sig.update(PO="*fp32", PM="*fp32", PL="*fp32", OUT=f"*{dt}")
            r = compile_kernel(pa._combine_kernel, sig, dict(D=D, BLOCK_S=16, BLOCK_D=D), arch)
            rows.append(dict(kernel="combine", dtype=dt, D=D, G=0, BLOCK_N=0, **r))
    return rows


REPORTS = {"paged_attention": paged_attention_report}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("module", choices=sorted(REPORTS))
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the report compiles the kernels for a GPU")
    rows = [r for arch in a.arch for r in REPORTS[a.module](arch)]
    if a.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print("  ".join(f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
