"""Triton fused backend of the PPO loss (mem1_fast/ops/ppo_loss.py), called through

    available(device) -> bool
    forward(hidden, weight, targets, old_logp, advantages, ref_logp, temperature, clip_eps, entropy_coef, kl_coef,
            normalizer) -> (loss fp32 0-dim, logp fp32 [N], entropy fp32 [N], d_hidden, d_weight)

Design: two sweeps over the vocabulary, 4 matmul-equivalents.
  1. statistics sweep: the logprob_entropy forward kernels (triton_kernels/logprob_entropy.py) -- logits tiles
     [BLOCK_N, BLOCK_V] from a K-loop over H, online max / sum exp / sum exp * (z - m), target logit gathered in the
     same pass, vocabulary splits merged in a fixed order: logp, entropy, (m, log s, mean_d). 1 matmul.
  2. `_ppo_token_kernel`, elementwise over the N rows: the per-token loss and its derivatives with respect to logp
     and entropy (divided by the normalizer).
  3. gradient sweep: the logprob_entropy backward with those as upstream gradients -- dz recomputed tile by tile for
     a bounded chunk, then d_hidden = dz W / tau and d_weight = dz^T h / tau as two tiled GEMMs. 3 matmuls;
     deterministic, no atomics.
Why not one sweep: the loss gradient of a row needs that row's lse / E_p[z] / logp, known only after the whole
vocabulary has been seen. Keeping a row block's logits in SRAM across a 152k vocabulary is not possible, and
materializing a row chunk's fp32 logits in global memory (the C++ CPU backend's way to 3 matmuls) trades the
recomputation matmul (2 H flops per logit) for ~18 bytes of traffic per logit plus an fp32 read-modify-write of the
[V, H] weight gradient per row chunk (the logits need whole rows, so the chunks must be row slabs): at H = 3584 on
an H100 that is about a wash, at smaller H a loss, and it needs a 4-byte-per-logit buffer instead of a 2-byte one.
The gradients are computed in the forward (the fused op's contract); `d_hidden` / `d_weight` come back in the input
dtypes, a 0-dim zero in place of the gradient of an input that does not require grad.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import logprob_entropy as le


@triton.jit
def _ppo_token_kernel(LOGP, ENT, OLD, ADV, REF, TW, LOSS, GL, GE, N, clip_eps, ent_coef, kl_coef, inv_norm,
                      HAS_REF: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    """Per token: loss_t = max(-A r, -A clip(r, 1 - eps, 1 + eps)) - c_ent H + c_kl k3(ref - logp), r = exp(logp - old)
    times its weight w_t (LOSS, before the normalizer) and d loss / d logp, d loss / d entropy, weighted and divided
    by the normalizer (GL, GE)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    logp = tl.load(LOGP + rows, mask=ok, other=0.0)
    ent = tl.load(ENT + rows, mask=ok, other=0.0)
    old = tl.load(OLD + rows, mask=ok, other=0.0)
    adv = tl.load(ADV + rows, mask=ok, other=0.0)
    ratio = tl.exp(logp - old)
    unclipped = -adv * ratio
    clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_eps), 1.0 + clip_eps)
    # max(unclipped, clipped); a tie (ratio inside the clip range) is the unclipped branch: d/dlogp = -A r, as
    # torch.maximum's split gradient plus clamp's pass-through give
    take_unclipped = unclipped >= clipped
    loss = tl.where(take_unclipped, unclipped, clipped) - ent_coef * ent
    dlogp = tl.where(take_unclipped, -adv * ratio, 0.0)
    if HAS_REF:
        d = tl.load(REF + rows, mask=ok, other=0.0) - logp
        ed = tl.exp(d)
        loss += kl_coef * (ed - d - 1.0)
        dlogp += kl_coef * (1.0 - ed)
    wn = tl.zeros([BLOCK], tl.float32) + inv_norm
    if HAS_W:
        w = tl.load(TW + rows, mask=ok, other=0.0)
        loss = loss * w
        wn = wn * w
    tl.store(LOSS + rows, loss, mask=ok)
    tl.store(GL + rows, dlogp * wn, mask=ok)
    tl.store(GE + rows, -ent_coef * wn, mask=ok)


DTYPES = le.DTYPES


def available(device) -> bool:
    return le.available(device)


def forward(hidden, weight, targets, old_logp, advantages, ref_logp, temperature, clip_eps, entropy_coef, kl_coef,
            normalizer, token_weights=None, need_hidden=True, need_weight=True):
    hidden, weight = hidden.detach(), weight.detach()
    logp, ent, stats = le.forward(hidden, weight, targets, temperature)
    N = logp.shape[0]
    dev = logp.device
    loss_rows = torch.empty(N, dtype=torch.float32, device=dev)
    gl = torch.empty(N, dtype=torch.float32, device=dev)
    ge = torch.empty(N, dtype=torch.float32, device=dev)
    has_ref = ref_logp is not None and kl_coef != 0.0
    old = old_logp.to(torch.float32).contiguous()
    adv = advantages.to(torch.float32).contiguous()
    ref = ref_logp.to(torch.float32).contiguous() if has_ref else old
    has_w = token_weights is not None
    tw = token_weights.to(torch.float32).contiguous() if has_w else old
    if N:
        blk = 256
        _ppo_token_kernel[(triton.cdiv(N, blk),)](logp, ent, old, adv, ref, tw, loss_rows, gl, ge, N,
                                                  float(clip_eps), float(entropy_coef), float(kl_coef),
                                                  1.0 / float(normalizer), has_ref, has_w, blk, num_warps=4)
    loss = loss_rows.sum() / float(normalizer)
    dh, dw = le.backward(gl, ge, hidden, weight, targets, temperature, stats, need_hidden, need_weight)
    if dh is None:
        dh = hidden.new_zeros(())
    if dw is None:
        dw = weight.new_zeros(())
    return loss, logp, ent, dh, dw
