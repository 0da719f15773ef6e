"""Packed scoring: the rows of a packed batch that predict its trained tokens, and their log-probs and entropy.

Each trained token is predicted by the row just before it (or, after a question shared by a group, by the
question's last row: `PackedBatch.predictor_positions`), so only those rows reach the LM head (prompt and
observation tokens never do), and the fused ops take them without materializing logits."""
from __future__ import annotations

import torch

from .hf import lm_head_weight, packed_hidden_states
from .ops import logprob_entropy


def loss_rows(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of the rows predicting the trained tokens [n, H], and those tokens [n]. `model` is a
    causal LM or its decoder (the critic's)."""
    hidden = packed_hidden_states(model, batch.input_ids, batch.position_ids, batch.visibility)
    return hidden[batch.predictor_positions()], batch.input_ids[batch.loss_positions()]


def score_batch(model, batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log-prob and entropy of every trained token of a packed batch, at `temperature`."""
    rows, targets = loss_rows(model, batch)
    return logprob_entropy(rows, lm_head_weight(model), targets, temperature)


class PackedLM(torch.nn.Module):
    """A causal LM run on packed batches with the LM-head op inside its own forward: `policy(batch, fn)` returns
    `fn(rows, lm_head_weight, targets)`. Under FSDP2 (distributed.shard) the module that owns the embeddings and
    the LM head gathers them around its forward, so the fused ops see the whole weight; unsharded it is the plain
    model (the same operations in the same order)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, batch, fn):
        rows, targets = loss_rows(self.lm, batch)
        return fn(rows, lm_head_weight(self.lm), targets)

    def logprobs(self, batch, temperature: float) -> torch.Tensor:
        return self(batch, lambda rows, w, t: logprob_entropy(rows, w, t, temperature)[0])
