"""ppo_loss: the PPO update loss straight from hidden states, fused with the LM head (Liger-style).

    loss, logp, entropy = ppo_loss(hidden, weight, targets, old_logp, advantages, ref_logp=None,
                                   temperature=1.0, clip_eps=0.2, entropy_coef=0.0, kl_coef=0.0, normalizer=None,
                                   token_weights=None)

Per trained token, with logp / entropy from softmax(hidden @ weight.T / temperature) and r = exp(logp - old_logp):
    loss_t = max(-A r, -A clip(r, 1-eps, 1+eps)) - entropy_coef * entropy + kl_coef * k3(ref_logp - logp)
    k3(d) = exp(d) - d - 1;     loss = sum_t w_t loss_t / normalizer  (normalizer defaults to N, w_t to 1)
Per-token weights give any loss aggregation in one call: token-mean is w = 1 with normalizer = tokens in the
update, seq-mean-token-mean w_t = 1 / |trajectory of t| with normalizer = trajectories, and so on.
`logp` and `entropy` come back detached, for statistics. Differentiable in hidden and weight.

When the loss formula is known at forward time, a fused backend computes, tile by tile, the loss's gradient with
respect to the logits and accumulates d_hidden and d_weight right there, so the update needs no second pass over
the vocabulary; backward only scales the saved gradients. Backends: "reference" (the generic `logprob_entropy`
op followed by the formula in autograd — the definition the fused backends must equal), "cpp"
(ops/_cpp_ppo_loss.py over csrc/cpu/logprob_entropy.cpp), "triton" (triton_kernels/ppo_loss.py). A fused backend
module implements
    available(device) -> bool
    forward(hidden, weight, targets, old_logp, advantages, ref_logp, temperature, clip_eps, entropy_coef, kl_coef,
            normalizer, token_weights) -> (loss fp32 scalar, logp fp32 [N], entropy fp32 [N], d_hidden, d_weight)
"""
from __future__ import annotations

import torch

from ._dispatch import Backends
from .logprob_entropy import _check_inputs, logprob_entropy

def ppo_loss(hidden, weight, targets, old_logp, advantages, ref_logp=None, temperature: float = 1.0,
             clip_eps: float = 0.2, entropy_coef: float = 0.0, kl_coef: float = 0.0, normalizer: float | None = None,
             token_weights=None, backend: str | None = None):
    _check_inputs(hidden, weight, targets, temperature)
    N = hidden.shape[0]
    for name, x in (("old_logp", old_logp), ("advantages", advantages), ("ref_logp", ref_logp),
                    ("token_weights", token_weights)):
        if x is not None and (x.dim() != 1 or x.shape[0] != N):
            raise ValueError(f"ppo_loss: {name} must be [N={N}], got {tuple(x.shape)}")
    if kl_coef and ref_logp is None:
        raise ValueError("ppo_loss: kl_coef > 0 needs ref_logp")
    if not clip_eps > 0:
        raise ValueError(f"ppo_loss: clip_eps must be > 0, got {clip_eps}")
    normalizer = float(N if normalizer is None else normalizer)
    if not normalizer > 0:
        raise ValueError(f"ppo_loss: normalizer must be > 0, got {normalizer}")
    backend = _backends.pick(backend, hidden)
    args = (targets.long(), old_logp.float(), advantages.float(), None if ref_logp is None else ref_logp.float(),
            float(temperature), float(clip_eps), float(entropy_coef), float(kl_coef), normalizer,
            None if token_weights is None else token_weights.float().contiguous())
    if backend == "reference":
        return reference_ppo_loss(hidden, weight, *args)
    return _FusedPPOLoss.apply(hidden, weight, _backends.module(backend), *args)


def reference_ppo_loss(hidden, weight, targets, old_logp, advantages, ref_logp, temperature, clip_eps, entropy_coef,
                       kl_coef, normalizer, token_weights=None):
    logp, ent = logprob_entropy(hidden, weight, targets, temperature)
    ratio = torch.exp(logp - old_logp)
    tok = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    tok = tok - entropy_coef * ent
    if kl_coef:
        d = ref_logp - logp
        tok = tok + kl_coef * (torch.exp(d) - d - 1)
    if token_weights is not None:
        tok = tok * token_weights
    return tok.sum() / normalizer, logp.detach(), ent.detach()


class _FusedPPOLoss(torch.autograd.Function):
    """The gradients are computed in the forward pass; backward scales them by the upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, impl, *args):
        loss, logp, ent, dh, dw = impl.forward(hidden, weight, *args)
        ctx.save_for_backward(dh, dw)
        ctx.mark_non_differentiable(logp, ent)
        return loss, logp, ent

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_ent):
        dh, dw = ctx.saved_tensors
        # The usual loss.backward() passes 1: hand the gradients over as they are. Scaling them would allocate a
        # second d_weight ([V, H]) for nothing. Not in place, so a retained graph can run backward again.
        if not bool(g_loss == 1):
            dh, dw = (dh * g_loss).to(dh.dtype), (dw * g_loss).to(dw.dtype)
        return dh, dw, None, *([None] * 10)


class _Reference:  # the generic op followed by the formula, in autograd (reference_ppo_loss)
    available = staticmethod(lambda device: True)


_backends = Backends("ppo_loss", {"reference": _Reference, "cpp": "._cpp_ppo_loss",
                                  "triton": "mem1_fast.triton_kernels.ppo_loss"},
                     env="MEM1_FAST_PPO_BACKEND", prefer={"cuda": ("triton",), "cpu": ("cpp",)})
BACKENDS = _backends.names
available_backends = _backends.available
default_backend = _backends.default
backend_module = _backends.module
