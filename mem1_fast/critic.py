"""The value model of GAE: V(s_t) for every generated token t, from the hidden state of the row that predicts t.

That row's context is exactly the context t was sampled in (the packed layout and visibility of the policy), so
the critic's values are exact for what the policy saw, turn after turn. The critic is a separate copy of the
policy's decoder with a scalar head by default (`Critic.from_policy`, as verl and OpenRLHF initialize it), or a
head on the policy's own hidden states (`ValueHead` alone: `--critic shared`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .scoring import loss_rows


class ValueHead(nn.Module):
    """hidden [n, H] -> values [n] (float32). Zero-initialized: every value starts at 0, so the first GAE
    advantages are the discounted rewards themselves rather than noise from a random projection."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.utils.skip_init(nn.Linear, hidden_size, 1)  # draws nothing: a resumed run's RNG stream stays
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1).float()


class Critic(nn.Module):
    """A decoder (no LM head) and a value head; `forward(batch)` gives the values of the batch's trained tokens in
    `batch.loss_positions()` order."""

    def __init__(self, decoder: nn.Module, hidden_size: int):
        super().__init__()
        self.decoder, self.head = decoder, ValueHead(hidden_size)

    @classmethod
    def from_policy(cls, policy) -> "Critic":
        decoder = copy.deepcopy(policy.get_decoder())
        return cls(decoder, policy.config.hidden_size).to(next(policy.parameters()).device)

    def forward(self, batch) -> torch.Tensor:
        rows, _ = loss_rows(self.decoder, batch)
        return self.head(rows)


def value_loss(values, old_values, returns, clip: float, token_weights=None, normalizer: float = 1.0):
    """PPO's clipped value loss, sum_t w_t 0.5 max((V - R)^2, (clip(V, V_old +- clip) - R)^2) / normalizer (clip 0:
    unclipped), and the fraction of tokens where the clipped branch was taken."""
    err = (values - returns) ** 2
    if clip > 0:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        err_c = (clipped - returns) ** 2
        took = err_c > err
        err = torch.maximum(err, err_c)
    else:
        took = torch.zeros_like(err, dtype=torch.bool)
    if token_weights is not None:
        err = err * token_weights
    return 0.5 * err.sum() / normalizer, took.float().mean() if len(took) else took.float().sum()
