"""C++ CPU backend of paged_attention (csrc/cpu/paged_attention.cpp), called by ops/paged_attention.py.

    available(device) -> bool
    forward(q, k_cache, v_cache, block_table, seq, lo, hi, scale) -> out [T, Hq, D] in q's dtype

The kernel reads K/V in place through the block table and validates every index it reads (bad input raises).
"""
from __future__ import annotations

import torch

from .. import _ext

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def available(device: str = "cpu") -> bool:
    return str(device).split(":")[0] == "cpu" and _ext.has_cpu_op("paged_attention")


def forward(q, k_cache, v_cache, block_table, seq, lo, hi, scale: float):
    _ext.load()  # cached; registers the op when the backend is asked for by name
    return torch.ops.mem1_fast.paged_attention(q, k_cache, v_cache, block_table, seq, lo, hi, float(scale))
