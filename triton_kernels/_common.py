"""What the Triton backends share: whether the kernels run interpreted, the backend's `available`, reduction
combine functions. (Compiling them for a GPU without one, and their resource figures: tools/triton_report.py.)"""
from __future__ import annotations

import os

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
