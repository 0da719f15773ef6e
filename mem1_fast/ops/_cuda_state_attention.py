"""CUDA C++ backend of state_attention (csrc/cuda/state_attention.cu, bound by csrc/cuda/bindings_cuda.cpp into the
extension `mem1_fast._C_cuda`, which setup.py builds on CUDA builds of torch when nvcc is found).

Called by ops/state_attention.py through

    available(device) -> bool
    tile_sizes(q) -> (BM, BN)
    forward(q, k, v, vis, scale, BM, BN) -> (out [T, Hq, D] in q.dtype, lse float32 [Hq, T])
    backward(dout, q, k, v, out, lse, vis, scale, BM, BN, deterministic) -> (dq, dk, dv)

FlashAttention-2 kernels on tensor cores (mma.sync, sm_80+): fp16 / bf16 inputs with fp32 accumulation, head dim
64 or 128, GQA without repeating K/V. The block map comes from `vis.block_map(BM, BN)` (cached on the Visibility:
one build per batch, shared by every layer); the backward's dK/dV kernel walks it transposed (CSR over key blocks,
`vis.transposed_block_map`, cached beside it). The backward has no atomics and a fixed
reduction order: it is deterministic whatever `deterministic` says.

Not supported here (raise NotImplementedError; use the "triton" or "reference" backend): fp32 / fp64 inputs, other
head dims. Like FlashAttention, a non-finite K/V value inside a tile can reach the rows of that tile that cannot
see it (0 * inf in the P V product); the reference and the Triton backend isolate it.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..visibility import BlockMap, Visibility

# The tiles the kernels are compiled for (MEM1_SA_BM / MEM1_SA_BN in csrc/cuda/state_attention.cuh).
BM_DEFAULT = 64
BN_DEFAULT = 64
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)

def available(device: str | torch.device = "cuda") -> bool:
    """True only for CUDA devices, when torch sees one and the CUDA extension's ops are registered."""
    if str(device).split(":")[0] != "cuda" or not torch.cuda.is_available():
        return False
    return _ext.load_cuda()


def unavailable_reason() -> str | None:
    """Why `available("cuda")` is False (None when it is True or was not asked yet)."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None if _ext.load_cuda() else _ext.cuda_error()


def tile_sizes(q: torch.Tensor) -> tuple[int, int]:
    return BM_DEFAULT, BN_DEFAULT


def _check(q: torch.Tensor, BM: int, BN: int) -> None:
    if q.dtype not in DTYPES:
        raise NotImplementedError(f"cuda state_attention: dtype {q.dtype} not supported (fp16, bf16); use the "
                                  "'triton' or 'reference' backend")
    if q.shape[-1] not in HEAD_DIMS:
        raise NotImplementedError(f"cuda state_attention: head dim {q.shape[-1]} not supported {HEAD_DIMS}; use the "
                                  "'triton' or 'reference' backend")
    if (BM, BN) != (BM_DEFAULT, BN_DEFAULT):
        raise ValueError(f"cuda state_attention: the kernels are compiled for tiles ({BM_DEFAULT}, {BN_DEFAULT}), "
                         f"got ({BM}, {BN})")


def _map_args(bm: BlockMap):
    return tuple(t.contiguous() for t in (bm.partial_ptr, bm.partial_idx, bm.full_ptr, bm.full_idx))


def _spec(vis: Visibility):
    return vis.lo.to(torch.int32).contiguous(), vis.hi.to(torch.int32).contiguous()


def forward(q, k, v, vis: Visibility, scale: float, BM: int, BN: int):
    _check(q, BM, BN)
    if not _ext.load_cuda():
        raise RuntimeError(f"cuda state_attention: mem1_fast._C_cuda is not available ({_ext.cuda_error()})")
    bm = vis.block_map(BM, BN)
    return torch.ops.mem1_fast.state_attention_cuda_fwd(q, k, v, *_spec(vis), *_map_args(bm), float(scale), BM, BN)


def backward(dout, q, k, v, out, lse, vis: Visibility, scale: float, BM: int, BN: int, deterministic: bool = False):
    _check(q, BM, BN)
    bm = vis.block_map(BM, BN)
    bt = vis.transposed_block_map(BM, BN)
    return torch.ops.mem1_fast.state_attention_cuda_bwd(dout, q, k, v, out, lse, *_spec(vis), *_map_args(bm),
                                                       *_map_args(bt), float(scale), BM, BN)
