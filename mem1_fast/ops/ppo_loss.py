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
module implements `Backend` below: forward(...) -> (loss fp32 scalar, logp fp32 [N], entropy fp32 [N], d_hidden,
d_weight), a gradient not asked for (need_hidden / need_weight False) a 0-dim zero.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ._dispatch import Backends
from .logprob_entropy import _check_ids, _check_inputs, logprob_entropy, reference_backward, reference_forward


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
    args = (targets.long(), old_logp.float(), advantages.float(), None if ref_logp is None else ref_logp.float(),
            float(temperature), float(clip_eps), float(entropy_coef), float(kl_coef), normalizer,
            None if token_weights is None else token_weights.float().contiguous())
    backend = _backends.asked(backend)
    if backend == "reference":
        return reference_ppo_loss(hidden, weight, *args)
    loss, logp, ent, _, _ = torch.ops.mem1_fast.ppo_loss(hidden, weight, *args, hidden.requires_grad,
                                                         weight.requires_grad, backend)
    return loss, logp, ent


def reference_ppo_loss(hidden, weight, targets, old_logp, advantages, ref_logp, temperature, clip_eps, entropy_coef,
                       kl_coef, normalizer, token_weights=None):
    logp, ent = logprob_entropy(hidden, weight, targets, temperature)
    loss = _loss_of(logp, ent, old_logp, advantages, ref_logp, clip_eps, entropy_coef, kl_coef, normalizer,
                    token_weights)
    return loss, logp.detach(), ent.detach()


def _loss_of(logp, ent, old_logp, advantages, ref_logp, clip_eps, entropy_coef, kl_coef, normalizer, token_weights):
    """The loss from per-token log-probs and entropies (the formula of the module docstring)."""
    ratio = torch.exp(logp - old_logp)
    tok = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    tok = tok - entropy_coef * ent
    if kl_coef:
        d = ref_logp - logp
        tok = tok + kl_coef * (torch.exp(d) - d - 1)
    if token_weights is not None:
        tok = tok * token_weights
    return tok.sum() / normalizer


def _loss_grads(logp, old_logp, advantages, ref_logp, clip_eps, entropy_coef, kl_coef, normalizer, token_weights):
    """d loss / d logp and d loss / d entropy per token. The clipped branch has zero slope where it is the larger
    (r outside the clip range), and equals the unclipped one where they tie, so the slope is -A r where the
    unclipped branch is the max."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    g_logp = torch.where(unclipped >= -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps), unclipped, 0.0)
    if kl_coef:
        g_logp = g_logp + kl_coef * (1 - torch.exp(ref_logp - logp))
    w = torch.ones_like(logp) if token_weights is None else token_weights
    return g_logp * w / normalizer, -entropy_coef * w / normalizer


# --- the registered op: one schema, a fake kernel, autograd ---------------------------------------------------------
# One implementation for every device: it runs the backend asked for, or ("") the default for the tensors' device and
# dtype, resolved when the op runs; a default that falls to the reference returns its gradients like a fused backend.
@torch.library.custom_op("mem1_fast::ppo_loss", mutates_args=())
def _op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor,
        advantages: torch.Tensor, ref_logp: torch.Tensor | None, temperature: float, clip_eps: float,
        entropy_coef: float, kl_coef: float, normalizer: float, token_weights: torch.Tensor | None,
        need_hidden: bool, need_weight: bool, backend: str
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_ids(targets, weight.shape[0])
    args = (targets, old_logp, advantages, ref_logp, temperature, clip_eps, entropy_coef, kl_coef, normalizer,
            token_weights)
    loss, logp, ent, dh, dw = _backends.module(backend or _backends.default(hidden)).forward(
        hidden, weight, *args, need_hidden, need_weight)
    return loss, logp, ent, dh.contiguous(), dw.contiguous()


@_op.register_fake
def _(hidden, weight, targets, old_logp, advantages, ref_logp, temperature, clip_eps, entropy_coef, kl_coef,
      normalizer, token_weights, need_hidden, need_weight, backend):
    N = hidden.shape[0]
    out = dict(dtype=torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32)
    return (hidden.new_empty((), **out), hidden.new_empty(N, **out), hidden.new_empty(N, **out),
            hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(()),
            weight.new_empty(weight.shape) if need_weight else weight.new_empty(()))


@torch.library.custom_op("mem1_fast::ppo_loss_scale_grads", mutates_args=())
def _scale_op(g_loss: torch.Tensor, d_hidden: torch.Tensor, d_weight: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    return (d_hidden * g_loss).to(d_hidden.dtype), (d_weight * g_loss).to(d_weight.dtype)


@_scale_op.register_fake
def _(g_loss, d_hidden, d_weight):
    return d_hidden.new_empty(d_hidden.shape), d_weight.new_empty(d_weight.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[3], output[4])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # else autograd hands backward zeros the size of d_hidden and d_weight


def _autograd_backward(ctx, g_loss, *_):
    """The gradients were computed in the forward pass; scale them by the upstream gradient."""
    if g_loss is None:  # the loss itself was not used
        return (None,) * 15
    dh, dw = ctx.saved_tensors
    # The usual loss.backward() passes 1: eager code hands the gradients over as they are (scaling them would
    # allocate a second d_weight [V, H] for nothing); a compiled graph cannot branch on a value, so it scales.
    if torch.compiler.is_compiling() or not bool(g_loss == 1):
        dh, dw = torch.ops.mem1_fast.ppo_loss_scale_grads(g_loss, dh, dw)
    return (dh if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None), *([None] * 13)


_op.register_autograd(_autograd_backward, setup_context=_setup_context)


@runtime_checkable
class Backend(Protocol):
    """A fused ppo_loss backend module (tests/test_backends.py checks every registered one against it)."""

    def available(self, device: str) -> bool: ...
    def forward(self, hidden, weight, targets, old_logp, advantages, ref_logp, temperature, clip_eps, entropy_coef,
                kl_coef, normalizer, token_weights, need_hidden, need_weight
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...


class _Reference:
    """The front runs `reference_ppo_loss` (the generic op followed by the formula, in autograd). Inside the
    registered op (when no fused kernel takes the input) this forward runs: the generic op's reference, then the
    formula's derivatives in logp and entropy, then the generic backward -- the gradients a fused backend returns."""

    available = staticmethod(lambda device: True)

    @staticmethod
    def forward(hidden, weight, targets, old_logp, advantages, ref_logp, temperature, clip_eps, entropy_coef,
                kl_coef, normalizer, token_weights, need_hidden, need_weight):
        logp, ent, stats = reference_forward(hidden, weight, targets, temperature)
        formula = (old_logp, advantages, ref_logp, clip_eps, entropy_coef, kl_coef, normalizer, token_weights)
        loss = _loss_of(logp, ent, *formula)
        g_logp, g_ent = _loss_grads(logp, *formula)
        dh, dw = reference_backward(g_logp, g_ent, hidden, weight, targets, temperature, stats, need_hidden,
                                    need_weight)
        return (loss, logp, ent, hidden.new_zeros(()) if dh is None else dh,
                weight.new_zeros(()) if dw is None else dw)


_backends = Backends("ppo_loss", {"reference": _Reference, "cpp": "._cpp_ppo_loss",
                                  "triton": "mem1_fast.triton_kernels.ppo_loss"},
                     env="MEM1_FAST_PPO_BACKEND", prefer={"cuda": ("triton",), "cpu": ("cpp",)})
BACKENDS = _backends.names
available_backends = _backends.available
default_backend = _backends.default
backend_module = _backends.module
