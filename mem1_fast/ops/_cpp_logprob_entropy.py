"""C++ CPU backend of logprob_entropy (csrc/cpu/logprob_entropy.cpp), called by ops/logprob_entropy.py.

    available(device) -> bool
    forward(hidden, weight, targets, temperature) -> (logp [N], entropy [N], stats = [lse; E_p[z]] [2, N])
    backward(g_logp, g_ent, hidden, weight, targets, temperature, stats, need_hidden, need_weight)
        -> (d_hidden | None, d_weight | None)

Outputs are float32 (float64 when an input is float64), gradients come back in the input dtypes.

Memory is bounded by the logits tile, never [N, V]: the forward and the backward run over tiles of [up to 2048 rows,
V_t columns] (32 MiB of fp32 by default), the backward recomputing the logits tile by tile from the saved
(lse, E_p[z]) -- 4 GEMMs per step in all against the LM head's 3. TILE = (rows, cols) overrides the tile shape
(0 = automatic; env ``MEM1_FAST_LOGPROB_TILE="rows,cols"``); the fused PPO op (ops/_cpp_ppo_loss.py) reads the same
setting, its tile being `rows` full rows [rows, V].
"""
from __future__ import annotations

import os

import torch

from .. import _ext

STATS_ROWS, FP64_OUT = 2, True
TILE: tuple[int, int] = tuple(int(x) for x in os.environ.get("MEM1_FAST_LOGPROB_TILE", "0,0").split(","))


def available(device: str = "cpu") -> bool:
    """True for CPU when the C++ extension loads and registers the logprob_entropy ops."""
    return str(device).split(":")[0] == "cpu" and _ext.has_cpu_op("logprob_entropy_fwd")


def _ops():
    """torch.ops.mem1_fast, after loading the extension (a backend may be called without available() first)."""
    if not available("cpu"):
        _ext.load()  # raises with the build error
        raise RuntimeError("mem1_fast: the C++ extension does not register logprob_entropy_fwd (stale build? "
                           "rebuild with `python setup.py build_ext --inplace`)")
    return torch.ops.mem1_fast


def kernel_isa(dtype: torch.dtype = torch.float32) -> str:
    """Which compiled row-kernel body runs here ("avx512", "avx2" or "generic")."""
    return _ops().logprob_entropy_cpu_isa(torch.empty(0, dtype=dtype))


def forward(hidden, weight, targets, temperature, tile: tuple[int, int] | None = None, isa: int = -1):
    rows, cols = TILE if tile is None else tile
    logp, ent, lse, ez = _ops().logprob_entropy_fwd(hidden, weight, targets, float(temperature), rows, cols, isa)
    return logp, ent, torch.stack((lse, ez))


def backward(g_logp, g_ent, hidden, weight, targets, temperature, stats, need_hidden, need_weight,
             tile: tuple[int, int] | None = None, isa: int = -1):
    lse, ez = stats
    rows, cols = TILE if tile is None else tile
    dh, dw = _ops().logprob_entropy_bwd(g_logp, g_ent, hidden, weight, targets, lse, ez, float(temperature),
                                        bool(need_hidden), bool(need_weight), rows, cols, isa)
    return (dh if need_hidden else None), (dw if need_weight else None)
