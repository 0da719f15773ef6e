"""A consolidation mode: one object that owns both halves of "what the next turn may see" (docs/design.md §3).

- its training layout (`layout(traj)`): where every token of a trajectory sits in the training row, its position id,
  whether its log-prob is trained on, and the key intervals it may attend to (any number per token);
- its KV plan for engines (`kv_plan`): what stays cached at consolidation, what is (re-)encoded at which positions,
  whether the last sampled token's KV is computed. None for a training-only mode (`paper`), which no engine serves.

Engines and the packer read these; nothing else branches on a mode's name. A new mode is one file that subclasses
`ConsolidationMode` and calls `register`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..trajectory import Kind, Segment, Trajectory


@dataclass(frozen=True)
class KVPlan:
    """What an engine does at the consolidation before turn j >= 1 (the question's KV always stays).

    kept_turns: generated turns whose KV survives, counting back from j-1 (0: none; 1: turn j-1's).
    reencode_last_turn: encode [t_{j-1} r_{j-1}] again before i_{j-1} (their KV was not kept); else only i_{j-1}
        is encoded, after the kept KV.
    restart_positions: the encoded tokens start at position |q| every turn; else positions continue after the last
        cached token (the stitched index).
    feed_last_token: compute the KV of the last sampled token of a turn (a kept turn needs it; a re-encoded turn
        does not, so the step that would compute it is saved).
    """

    kept_turns: int
    reencode_last_turn: bool
    restart_positions: bool
    feed_last_token: bool

    def evicts(self, slot_turn, next_turn: int):
        """Whether a cached slot written by turn `slot_turn` (-1: the question) is dropped before `next_turn`
        (works elementwise on a tensor of slot turns)."""
        return (slot_turn >= 0) & (slot_turn < next_turn - self.kept_turns)


@dataclass
class Layout:
    """One trajectory laid out for training (numpy, trajectory-local coordinates)."""

    input_ids: np.ndarray  # int64 [L]
    position_ids: np.ndarray  # int64 [L]
    loss_mask: np.ndarray  # bool [L]: token's log-prob is trained on (generated tokens, never copies)
    logprobs: np.ndarray  # float32 [L]: sampled log-prob on loss tokens, 0 elsewhere
    kind: np.ndarray  # int8 [L]
    turn: np.ndarray  # int32 [L]
    lo: np.ndarray  # int64 [L, K]: visible key intervals [lo, hi), not yet canonical (empty = lo >= hi)
    hi: np.ndarray  # int64 [L, K]


CAUSAL = None  # an interval's end that means "up to and including the token itself"


def pad_intervals(a: np.ndarray, K: int) -> np.ndarray:
    """[L, k] interval bounds widened to [L, K] with (0, 0): empty intervals."""
    return np.pad(a, ((0, 0), (0, K - a.shape[1])))


class LayoutBuilder:
    """Appends segments to a training row; each segment's tokens share a list of intervals (lo, hi), where
    hi = CAUSAL ends the interval at each token itself."""

    def __init__(self):
        self.rows, self.cursor = [], 0

    @classmethod
    def starting_with_question(cls, traj: Trajectory) -> tuple["LayoutBuilder", int]:
        """A builder whose first rows are the question at positions 0.., causal among themselves (every mode's row
        begins so, which lets `pack(share_question=True)` keep one copy per group), and the question's length."""
        b = cls()
        b.emit(traj.prompt.token_ids, Kind.PROMPT, 0, 0, [(0, CAUSAL)])
        return b, len(traj.prompt)

    def emit(self, ids, kind: Kind, turn: int, pos_start: int, intervals, loss: bool = False, lps=None) -> int:
        """Append the tokens; returns where they start in the row."""
        n, start = len(ids), self.cursor
        if n == 0:
            return start
        p = np.arange(start, start + n, dtype=np.int64)
        lo = np.stack([np.full(n, a, np.int64) for a, _ in intervals], 1)
        hi = np.stack([p + 1 if b is CAUSAL else np.full(n, b, np.int64) for _, b in intervals], 1)
        self.rows.append((np.asarray(ids, np.int64), np.arange(pos_start, pos_start + n, dtype=np.int64),
                          np.full(n, loss), np.zeros(n, np.float32) if lps is None else np.asarray(lps, np.float32),
                          np.full(n, int(kind), np.int8), np.full(n, turn, np.int32), lo, hi))
        self.cursor += n
        return start

    def build(self) -> Layout:
        K = max(r[6].shape[1] for r in self.rows)
        cols = list(zip(*self.rows))
        return Layout(*(np.concatenate(c) for c in cols[:6]), lo=np.concatenate([pad_intervals(a, K) for a in cols[6]]),
                      hi=np.concatenate([pad_intervals(a, K) for a in cols[7]]))


class ConsolidationMode:
    """Subclasses set `name`, `kv_plan` (None: training only) and implement `layout`."""

    name: str = ""
    kv_plan: KVPlan | None = None
    description: str = ""

    @property
    def exact(self) -> bool:
        """Whether an engine can sample rollouts whose contexts this layout reproduces (exactness invariant)."""
        return self.kv_plan is not None

    def layout(self, traj: Trajectory) -> Layout:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<consolidation mode {self.name!r}>"


def logprobs_of(seg: Segment):
    return seg.logprobs if seg.logprobs is not None else [0.0] * len(seg)


_REGISTRY: dict[str, ConsolidationMode] = {}


def register(mode: ConsolidationMode) -> ConsolidationMode:
    if not mode.name or mode.name in _REGISTRY:
        raise ValueError(f"consolidation mode name {mode.name!r} is empty or taken")
    _REGISTRY[mode.name] = mode
    return mode


def get(mode: "str | ConsolidationMode") -> ConsolidationMode:
    if isinstance(mode, ConsolidationMode):
        return mode
    if mode not in _REGISTRY:
        raise ValueError(f"unknown consolidation mode {mode!r}; expected one of {tuple(_REGISTRY)}")
    return _REGISTRY[mode]


def names(exact_only: bool = False) -> tuple[str, ...]:
    return tuple(n for n, m in _REGISTRY.items() if m.exact or not exact_only)
