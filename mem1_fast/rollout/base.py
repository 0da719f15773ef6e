"""The contract every rollout engine implements, and the registry the trainer picks one from (`--engine`).

An engine samples the turns of a batch of episodes with a KV cache that follows the consolidation mode's KV plan
(`mem1_fast.consolidation`): token ids in, token ids and the log-prob of each sampled token under the sampling
distribution out, never text. A new engine is one file that implements `Engine` and calls `register`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from ..consolidation import MODES, get


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the sampling distribution (after temperature)
    finish: str  # "stop" (a stop token or string), "eos", or "length"


@dataclass
class TurnKV:
    """One turn's KV accounting."""

    prefilled: int  # tokens encoded at the turn's start, outside decoding (turn 0: the question)
    reencoded: int  # of those, tokens that had been encoded or generated before (recompute's copy of the last turn)
    kv_tokens: int = 0  # live tokens in the episode's cache when the turn's generation ended
    kv_bytes: int = 0  # bytes of KV storage the episode held then (paged: its whole blocks, shared ones included)
    kv_blocks: int = 0  # blocks of its table then (paged engine; 0 where the cache is not paged)


@dataclass
class KVStats:
    """Per-episode KV accounting over the episode so far."""

    peak_kv_tokens: int = 0  # most tokens held in the episode's KV cache at any moment
    prefilled_tokens: int = 0  # tokens encoded outside decoding: the prompt, observations, re-encoded context
    reencoded_tokens: int = 0  # of those, tokens that had been generated or encoded before (recompute's copy)
    peak_kv_bytes: int = 0  # most bytes of KV storage held for the episode (at the end of a turn: KV only grows
    # within one)
    turns: list[TurnKV] = field(default_factory=list)

    def begin_turn(self, prefilled: int, reencoded: int) -> None:
        self.turns.append(TurnKV(prefilled, reencoded))
        self.prefilled_tokens += prefilled
        self.reencoded_tokens += reencoded

    def end_turn(self, kv_tokens: int, kv_bytes: int, kv_blocks: int = 0) -> None:
        t = self.turns[-1]
        t.kv_tokens, t.kv_bytes, t.kv_blocks = kv_tokens, kv_bytes, kv_blocks
        self.peak_kv_tokens = max(self.peak_kv_tokens, kv_tokens)
        self.peak_kv_bytes = max(self.peak_kv_bytes, kv_bytes)


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kv_bytes_per_token(model, dtype: torch.dtype | None = None) -> int:
    """Bytes of K and V one token takes over all layers of `model`, stored in `dtype` (default: the model's)."""
    cfg = model.config
    elt = (dtype or next(model.parameters()).dtype).itemsize
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim(cfg) * elt


class Engine(Protocol):
    mode: str
    # True when the engine's log-probs are the trainer's for the same weights (same model and numerics): the
    # trainer then uses them as old-policy log-probs; False makes it recompute them with a forward pass
    exact_logprobs: bool

    def start(self, prompts: Sequence[Sequence[int]], greedy: bool | None = None, seed: int | None = None) -> None:
        """Begin a batch of episodes, one per prompt (token ids); greedy decoding or sampling seeded by `seed`
        for this batch (None: the engine's setting)."""

    def step(self, idx: Sequence[int], observations: Sequence[Sequence[int]] | None = None) -> list[Generation]:
        """Generate the next turn of episodes `idx`; `observations[k]` answers episode idx[k]'s previous turn (None
        on turn 0). Consolidation (eviction, re-encoding) happens here, as the mode's KV plan says."""

    def kv_stats(self, i: int) -> KVStats:
        """KV accounting of episode i of the current batch."""

    def pool_stats(self) -> dict:
        """Engine-wide KV memory of the current batch, e.g. a block pool's size and peak occupancy ({} where the
        engine keeps no pool of its own)."""

    def sync_weights(self, model) -> None:
        """Make the engine sample from `model`'s current weights (after an optimizer step)."""

    def sleep(self) -> None:
        """Free what memory the engine can while the trainer updates (a no-op where it cannot)."""

    def wake(self) -> None:
        """Undo `sleep`."""


def check_sampling(greedy: bool, temperature: float) -> None:
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")


def check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"episode {i}: empty prompt")


def split_stops(tokenizer, stop_strings: Sequence[str]) -> tuple[list[int], list[str]]:
    """Stops that are one token (matched on ids) and stops that span several (matched on the decoded text)."""
    ids, strings = [], []
    for s in stop_strings:
        enc = tokenizer.encode(s, add_special_tokens=False)
        (ids.append(enc[0]) if len(enc) == 1 else strings.append(s))
    return ids, strings


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights as whole tensors: FSDP2-sharded parameters (DTensors) are gathered (a collective: every
    rank calls it), plain ones are returned as they are."""
    from torch.distributed.tensor import DTensor
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach() for k, v in model.state_dict().items()}


_ENGINES: dict[str, tuple[Callable[..., Engine], Callable]] = {}


def register(name: str, factory: Callable[..., Engine], serves: Callable) -> None:
    """factory(model, tokenizer, mode, *, max_new_tokens, temperature, greedy, seed) -> Engine;
    serves(kv_plan) -> whether the engine can follow that KV plan."""
    if name in _ENGINES:
        raise ValueError(f"engine {name!r} is registered already")
    _ENGINES[name] = (factory, serves)


def serves(name: str, mode: str) -> bool:
    """Whether engine `name` can roll out consolidation mode `mode` (read from the mode's KV plan)."""
    plan = get(mode).kv_plan
    return plan is not None and _ENGINES[name][1](plan)


def create(name: str, model, tokenizer, mode: str, **kw) -> Engine:
    if name not in _ENGINES:
        raise ValueError(f"unknown engine {name!r}; expected one of {tuple(_ENGINES)}")
    if not serves(name, mode):
        able = [e for e in _ENGINES if serves(e, mode)]
        raise ValueError(f"engine {name!r} cannot serve consolidation mode {mode!r}; "
                         f"{'engines that can: ' + ', '.join(able) if able else 'it matches no rollout'}")
    return _ENGINES[name][0](model, tokenizer, mode, **kw)


def names() -> tuple[str, ...]:
    return tuple(_ENGINES)


def pairs() -> list[tuple[str, str]]:
    """Every (engine, mode) that can run here."""
    return [(e, m) for e in _ENGINES for m in MODES if serves(e, m)]
