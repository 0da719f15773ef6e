"""CUDA C++ backend of state_attention (csrc/cuda/state_attention.cu, bound by csrc/cuda/bindings_cuda.cpp into the
extension `mem1_fast._C_cuda`, which setup.py builds on CUDA builds of torch when nvcc is found).

Called by ops/state_attention.py through

    available(device) -> bool
    tile_sizes(q) -> (BM, BN)
    forward(q, k, v, vis, scale, BM, BN) -> (out [T, Hq, D] in q.dtype, lse float32 [Hq, T])
    backward(dout, q, k, v, out, lse, vis, scale, BM, BN, deterministic) -> (dq, dk, dv)

FlashAttention-2 kernels on tensor cores (mma.sync, sm_80+): fp16 / bf16 inputs with fp32 accumulation, head dim
64 or 128, GQA without repeating K/V. The block map comes from `vis.block_map(BM, BN)` (cached on the Visibility:
one build per batch, shared by every layer); the backward's dK/dV kernel walks it transposed (CSR over key blocks),
cached in the same per-batch dict under ("cuda.transposed", BM, BN). The backward has no atomics and a fixed
reduction order: it is deterministic whatever `deterministic` says.

Not supported here (raise NotImplementedError; use the "triton" or "reference" backend): fp32 / fp64 inputs, other
head dims. Like FlashAttention, a non-finite K/V value inside a tile can reach the rows of that tile that cannot
see it (0 * inf in the P V product); the reference and the Triton backend isolate it.
"""
from __future__ import annotations

import importlib

import torch

from ..visibility import BlockMap, Visibility

# The tiles the kernels are compiled for (MEM1_SA_BM / MEM1_SA_BN in csrc/cuda/state_attention.cuh).
BM_DEFAULT = 64
BN_DEFAULT = 64
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
EXTENSION = "mem1_fast._C_cuda"

_ok: bool | None = None
_error: str | None = None


def _load() -> bool:
    """Import the CUDA extension (registers torch.ops.mem1_fast.state_attention_cuda_*); cached."""
    global _ok, _error
    if _ok is None:
        try:
            importlib.import_module(EXTENSION)
            _ok = hasattr(torch.ops.mem1_fast, "state_attention_cuda_fwd")
            if not _ok:
                _error = f"{EXTENSION} imported but registered no state_attention_cuda ops"
        except (ImportError, OSError, RuntimeError) as e:  # not built, or built against another torch / CUDA
            _ok, _error = False, f"{type(e).__name__}: {e}"
    return _ok


def available(device: str | torch.device = "cuda") -> bool:
    """True only for CUDA devices, when torch sees one and the CUDA extension's ops are registered."""
    if str(device).split(":")[0] != "cuda" or not torch.cuda.is_available():
        return False
    return _load()


def unavailable_reason() -> str | None:
    """Why `available("cuda")` is False (None when it is True or was not asked yet)."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None if _load() else _error


def tile_sizes(q: torch.Tensor) -> tuple[int, int]:
    return BM_DEFAULT, BN_DEFAULT


def supports(q: torch.Tensor) -> bool:
    return q.dtype in DTYPES and q.shape[-1] in HEAD_DIMS


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


def transposed_block_map(vis: Visibility, BM: int, BN: int) -> BlockMap:
    cache = getattr(vis, "_block_maps", None)
    key = ("cuda.transposed", BM, BN)
    if cache is not None and key in cache:
        return cache[key]
    bt = vis.block_map(BM, BN).transpose()
    if cache is not None:
        cache[key] = bt
    return bt


def _map_args(bm: BlockMap):
    return tuple(t.contiguous() for t in (bm.partial_ptr, bm.partial_idx, bm.full_ptr, bm.full_idx))


def _spec(vis: Visibility):
    return vis.lo.to(torch.int32).contiguous(), vis.hi.to(torch.int32).contiguous()


def forward(q, k, v, vis: Visibility, scale: float, BM: int, BN: int):
    _check(q, BM, BN)
    if not _load():
        raise RuntimeError(f"cuda state_attention: {EXTENSION} is not available ({_error})")
    bm = vis.block_map(BM, BN)
    return torch.ops.mem1_fast.state_attention_cuda_fwd(q, k, v, *_spec(vis), *_map_args(bm), float(scale), BM, BN)


def backward(dout, q, k, v, out, lse, vis: Visibility, scale: float, BM: int, BN: int, deterministic: bool = False):
    _check(q, BM, BN)
    bm = vis.block_map(BM, BN)
    bt = transposed_block_map(vis, BM, BN)
    return torch.ops.mem1_fast.state_attention_cuda_bwd(dout, q, k, v, out, lse, *_spec(vis), *_map_args(bm),
                                                       *_map_args(bt), float(scale), BM, BN)
