"""What the Triton backends share: whether the kernels run interpreted, the backend's `available`, reduction
combine functions, and the resource figures of a compiled kernel (the compile checks without a GPU)."""
from __future__ import annotations

import os
import re
import subprocess

import torch
import triton
import triton.language as tl

# The @triton.jit decorators read TRITON_INTERPRET when a kernel module is imported; that, not the current
# environment, decides whether its kernels run interpreted (CPU tensors) or compiled (CUDA tensors).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Reductions go through tl.reduce with Triton's own combine functions rather than tl.max / tl.sum: those are @jit
# wrappers, and every device-function call re-patches the language under the interpreter (~ms each), which would
# dominate the CPU tests. Compiled, it is the same code.
MAX = tl.standard._elementwise_max
SUM = tl.standard._sum_combine


def available(device) -> bool:
    """True for "cuda" with a usable GPU (kernels compiled), and for "cpu" when the kernels were decorated under
    TRITON_INTERPRET=1 (and it is still set)."""
    dev = torch.device(device).type
    if dev == "cpu":
        return INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1"
    if dev == "cuda":
        if INTERPRETED or not torch.cuda.is_available():
            return False
        try:
            return triton.runtime.driver.active.get_current_target().backend == "cuda"
        except Exception:  # noqa: BLE001 -- no usable driver is "not available"
            return False
    return False


def resource_usage(cubin: bytes, name: str) -> dict:
    """Registers, stack (= spill space: Triton kernels have no other stack use), local and static shared memory of
    one kernel, from cuobjdump -res-usage (milliseconds, also on a Triton cache hit)."""
    import tempfile

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
