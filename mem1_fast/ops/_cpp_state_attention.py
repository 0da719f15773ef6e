"""C++ CPU backend of state_attention (csrc/cpu/state_attention.cpp), called by ops/state_attention.py.

    available(device) -> bool
    tile_sizes(q) -> (BM, BN)
    forward(q, k, v, vis, scale, BM, BN) -> (out [T, Hq, D] in q.dtype, lse float32 [Hq, T])
    backward(dout, q, k, v, out, lse, vis, scale, BM, BN, deterministic) -> (dq, dk, dv)

The block map comes from `vis.block_map(BM, BN)` (cached on the Visibility: one build per batch, shared by every
layer). The backward's dK/dV pass needs it transposed (CSR over key blocks): the C++ op builds that itself from the
map it is given (a counting sort of a few thousand entries, microseconds), so nothing else is cached and the two can
never disagree. The kernels are deterministic by construction (every output element is written by one task in a
fixed order, and the two backward schedules agree bit for bit), so results are bit-identical across runs and thread
counts and `deterministic` changes nothing.

`isa` (-1 auto, 0 generic, 1 AVX2, 2 AVX-512) and `schedule` (-1 auto, 0 two-pass, 1 fused) force a kernel body or
backward schedule, for tests and benchmarks.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..visibility import BlockMap, Visibility

# 64 x 64 tiles: the register-blocked micro-kernel's native width (4 zmm of fp32) for the key axis, and small enough
# that the computed tile area stays within ~1.1x the visible area on MEM1 layouts.
BM_DEFAULT = 64
BN_DEFAULT = 64


def available(device: str = "cpu") -> bool:
    """True for CPU when the C++ extension loads and registers the state_attention ops."""
    return str(device).split(":")[0] == "cpu" and _ext.has_cpu_op("state_attention_fwd")


def tile_sizes(q: torch.Tensor) -> tuple[int, int]:
    return BM_DEFAULT, BN_DEFAULT


def kernel_isa(dtype: torch.dtype = torch.float32) -> str:
    """Which compiled kernel body runs here ("avx512", "avx2" or "generic")."""
    _ext.load()
    return torch.ops.mem1_fast.state_attention_cpu_isa(torch.empty(0, dtype=dtype))


def _map_args(bm: BlockMap):
    return bm.partial_ptr, bm.partial_idx, bm.full_ptr, bm.full_idx


def forward(q, k, v, vis: Visibility, scale: float, BM: int, BN: int, isa: int = -1):
    bm = vis.block_map(BM, BN)
    return torch.ops.mem1_fast.state_attention_fwd(q, k, v, vis.lo, vis.hi, *_map_args(bm), float(scale), BM, BN,
                                                   isa)


def backward(dout, q, k, v, out, lse, vis: Visibility, scale: float, BM: int, BN: int, deterministic: bool = False,
             isa: int = -1, schedule: int = -1):
    bm = vis.block_map(BM, BN)
    return torch.ops.mem1_fast.state_attention_bwd(dout, q, k, v, out, lse, vis.lo, vis.hi, *_map_args(bm),
                                                   float(scale), BM, BN, bool(deterministic), isa, schedule)
