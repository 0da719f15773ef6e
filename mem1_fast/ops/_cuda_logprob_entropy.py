"""CUDA C++ backend of logprob_entropy: the forward of csrc/cuda/logprob_entropy.cu (bound in the extension
mem1_fast._C_cuda, built on CUDA builds of torch), the backward of the Triton backend.

    available(device) -> bool
    forward(hidden, weight, targets, temperature) -> (logp fp32 [N], entropy fp32 [N], stats fp32 [3, N])
    backward(...)  -- triton_kernels.logprob_entropy.backward, which reads the same statistics (m, logs, mean_d)

Both inputs must share a dtype (fp16, bf16 or fp32; the CUDA kernels run fp16 / bf16 on tensor cores, fp32 as IEEE
FMA). The forward never holds the logits: each CUDA block reduces a [64 rows x 64 vocabulary] tile at a time.
"""
from __future__ import annotations

import torch

from .. import _ext

STATS_ROWS, FP64_OUT = 3, False
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton():
    from ..triton_kernels import logprob_entropy
    return logprob_entropy


def available(device: str | torch.device = "cuda") -> bool:
    """CUDA devices only, when the CUDA extension carries the op and Triton (the backward) runs there."""
    if str(device).split(":")[0] != "cuda" or not torch.cuda.is_available() or not _ext.load_cuda():
        return False
    return hasattr(torch.ops.mem1_fast, "logprob_entropy_cuda_fwd") and _triton().available(device)


def forward(hidden, weight, targets, temperature):
    if hidden.dtype != weight.dtype or hidden.dtype not in DTYPES:
        raise TypeError(f"cuda logprob_entropy: hidden and weight must share a dtype among fp16, bf16, fp32, got "
                        f"{hidden.dtype} and {weight.dtype}; use the 'triton' or 'reference' backend")
    if not available(hidden.device):
        raise RuntimeError(f"cuda logprob_entropy: not available here ({_ext.cuda_error() or 'no CUDA device'})")
    logp, ent, stats = torch.ops.mem1_fast.logprob_entropy_cuda_fwd(hidden, weight, targets, float(temperature))
    return logp, ent, stats


def backward(g_logp, g_ent, hidden, weight, targets, temperature, stats, need_hidden, need_weight):
    return _triton().backward(g_logp, g_ent, hidden, weight, targets, temperature, stats, need_hidden, need_weight)
