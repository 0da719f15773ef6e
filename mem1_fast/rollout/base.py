"""The contract every rollout engine implements, and the registry the trainer picks one from (`--engine`).

An engine samples the turns of a batch of episodes with a KV cache that follows the consolidation mode's KV plan
(`mem1_fast.consolidation`): token ids in, token ids and the log-prob of each sampled token under the sampling
distribution out, never text. A new engine is one file that implements `Engine` and calls `register`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the sampling distribution (after temperature)
    finish: str  # "stop" (a stop token or string), "eos", or "length"


@dataclass
class KVStats:
    """Per-episode KV accounting over the episode so far."""

    peak_kv_tokens: int = 0  # most tokens held in the episode's KV cache at any moment
    prefilled_tokens: int = 0  # tokens encoded outside decoding: the prompt, observations, re-encoded context
    reencoded_tokens: int = 0  # of those, tokens that had been generated or encoded before (recompute's copy)


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

    def sync_weights(self, model) -> None:
        """Make the engine sample from `model`'s current weights (after an optimizer step)."""

    def sleep(self) -> None:
        """Free what memory the engine can while the trainer updates (a no-op where it cannot)."""

    def wake(self) -> None:
        """Undo `sleep`."""


_ENGINES: dict[str, Callable[..., Engine]] = {}


def register(name: str, factory: Callable[..., Engine]) -> None:
    """factory(model, tokenizer, mode, *, max_new_tokens, temperature, greedy, seed) -> Engine"""
    if name in _ENGINES:
        raise ValueError(f"engine {name!r} is registered already")
    _ENGINES[name] = factory


def create(name: str, model, tokenizer, mode: str, **kw) -> Engine:
    if name not in _ENGINES:
        raise ValueError(f"unknown engine {name!r}; expected one of {tuple(_ENGINES)}")
    return _ENGINES[name](model, tokenizer, mode, **kw)


def names() -> tuple[str, ...]:
    return tuple(_ENGINES)
