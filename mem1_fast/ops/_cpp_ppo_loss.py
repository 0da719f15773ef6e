"""C++ CPU backend of the fused PPO loss (csrc/cpu/logprob_entropy.cpp, op ppo_loss_fused), called by
ops/ppo_loss.py.

    available(device) -> bool
    forward(hidden, weight, targets, old_logp, advantages, ref_logp, temperature, clip_eps, entropy_coef, kl_coef,
            normalizer, token_weights, need_hidden, need_weight)
        -> (loss 0-dim, logp [N], entropy [N], d_hidden, d_weight)

One pass over the vocabulary: per chunk of rows the logits [rows, V] are computed once (one GEMM), the per-row
statistics, the per-token loss and its derivatives w.r.t. logp and entropy give dloss/dz in place, and two GEMMs
give d_hidden[chunk] and accumulate d_weight -- 3 GEMMs, the LM head's forward + backward. The chunk is
[rows, V] with rows = min(512, 192 MiB / (4 V)) by default (``_cpp_logprob_entropy.TILE[0]`` overrides): each chunk
streams W twice and d_weight once, so fewer, larger chunks trade memory for time at large V. The gradient not asked for
(need_hidden / need_weight False) is not computed (a 0-dim zero is returned in its place; autograd drops it).
"""
from __future__ import annotations

import torch

from . import _cpp_logprob_entropy as _le


def available(device: str = "cpu") -> bool:
    return _le.available(device) and hasattr(torch.ops.mem1_fast, "ppo_loss_fused")


def forward(hidden, weight, targets, old_logp, advantages, ref_logp, temperature, clip_eps, entropy_coef, kl_coef,
            normalizer, token_weights=None, need_hidden=True, need_weight=True, tile: tuple[int, int] | None = None,
            isa: int = -1):
    rows, cols = _le.TILE if tile is None else tile
    loss, logp, ent, dh, dw = _le._ops().ppo_loss_fused(
        hidden, weight, targets, old_logp, advantages, ref_logp, float(temperature), float(clip_eps),
        float(entropy_coef), float(kl_coef), float(normalizer), need_hidden, need_weight, rows, cols, isa,
        token_weights)
    if dh is None:
        dh = hidden.new_zeros(())
    if dw is None:
        dw = weight.new_zeros(())
    return loss, logp, ent, dh, dw
