"""Trajectories kept as the token ids that were sampled (token-in / token-out).

A trajectory is a list of segments `(kind, turn, token_ids)` in this order:

    PROMPT(0) | STATE(0) ACTION(0) OBS(0) | STATE(1) ACTION(1) OBS(1) | ... | STATE(n) ACTION(n) [OBS(n)]

STATE is the `<think>…</think>` part of a generation (the agent's consolidated memory), ACTION the rest of it,
OBS the environment's reply. Generated segments (STATE, ACTION) carry the log-prob each token was sampled with.
Nothing here decodes and re-tokenizes generated text: the ids are the ids the sampler produced.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence


class Kind(enum.IntEnum):
    PROMPT = 0
    STATE = 1
    ACTION = 2
    OBS = 3


GENERATED = (Kind.STATE, Kind.ACTION)


class TrajectoryError(ValueError):
    """A trajectory that breaks the segment grammar above."""


@dataclass(frozen=True)
class Segment:
    kind: Kind
    turn: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None = None  # sampled log-probs, generated segments only

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class Trajectory:
    """One episode. `segments` are validated on construction; see the module docstring for the grammar."""

    segments: list[Segment]
    reward: float = 0.0
    info: Any = field(default_factory=dict)  # the agent loop puts its EpisodeStats here

    def __post_init__(self):
        validate(self.segments)

    @classmethod
    def from_triples(cls, triples: Iterable[Sequence], logprobs: Sequence[Sequence[float] | None] | None = None,
                     **kw) -> "Trajectory":
        """Build from `(kind, turn, token_ids)` triples (kind: Kind, int or name). `logprobs[i]` belongs to triple i."""
        triples = list(triples)
        if logprobs is not None and len(logprobs) != len(triples):
            raise TrajectoryError(f"got {len(logprobs)} logprob lists for {len(triples)} segments")
        segs = []
        for i, tr in enumerate(triples):
            if len(tr) != 3:
                raise TrajectoryError(f"segment {i}: expected (kind, turn, token_ids), got {len(tr)} fields")
            kind, turn, ids = tr
            kind = Kind[kind.upper()] if isinstance(kind, str) else Kind(kind)
            lp = None if logprobs is None or logprobs[i] is None else tuple(float(x) for x in logprobs[i])
            segs.append(Segment(kind, int(turn), tuple(int(t) for t in ids), lp))
        return cls(segs, **kw)

    # --- views -------------------------------------------------------------------------------------------------
    @property
    def prompt(self) -> Segment:
        return self.segments[0]

    @property
    def num_turns(self) -> int:
        return self.segments[-1].turn + 1

    def turn_segments(self, turn: int, kinds: Sequence[Kind]) -> list[Segment]:
        return [s for s in self.segments if s.turn == turn and s.kind in kinds]

    def generation(self, turn: int) -> list[int]:
        """g_j = t_j r_j: the tokens the model sampled in turn j."""
        return [t for s in self.turn_segments(turn, GENERATED) for t in s.token_ids]

    def generation_logprobs(self, turn: int) -> list[float]:
        return [x for s in self.turn_segments(turn, GENERATED) for x in s.logprobs]

    def observation(self, turn: int) -> list[int]:
        return [t for s in self.turn_segments(turn, (Kind.OBS,)) for t in s.token_ids]

    def num_generated(self) -> int:
        return sum(len(s) for s in self.segments if s.kind in GENERATED)

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments)


def validate(segments: Sequence[Segment]) -> None:
    """Raise TrajectoryError naming the first segment that breaks the grammar."""
    if not segments:
        raise TrajectoryError("empty trajectory: no segments")
    first = segments[0]
    if first.kind != Kind.PROMPT or first.turn != 0:
        raise TrajectoryError(f"segment 0 must be PROMPT of turn 0, got {first.kind.name} of turn {first.turn}")
    if len(first) == 0:
        raise TrajectoryError("empty prompt: a trajectory needs at least one prompt token")
    prev_turn, prev_kind = 0, Kind.PROMPT
    gen_count = {}
    for i, s in enumerate(segments[1:], start=1):
        where = f"segment {i} ({s.kind.name}, turn {s.turn})"
        if s.kind == Kind.PROMPT:
            raise TrajectoryError(f"{where}: a trajectory has exactly one PROMPT, at the start")
        order_ok = (s.turn == prev_turn and s.kind > prev_kind) or (
            s.turn == prev_turn + 1 and prev_kind != Kind.PROMPT and s.kind in GENERATED)
        if prev_kind == Kind.PROMPT:
            order_ok = s.turn == 0 and s.kind in GENERATED
        if not order_ok:
            raise TrajectoryError(f"{where}: out of order after {prev_kind.name} of turn {prev_turn}")
        if s.kind in GENERATED:
            if s.logprobs is not None and len(s.logprobs) != len(s):
                raise TrajectoryError(f"{where}: {len(s.logprobs)} log-probs for {len(s)} tokens")
            gen_count[s.turn] = gen_count.get(s.turn, 0) + len(s)
        elif s.logprobs is not None:
            raise TrajectoryError(f"{where}: only generated segments carry log-probs")
        if s.turn != prev_turn:  # a new turn starts: the previous one must be complete
            _check_turn_closed(segments, prev_turn, gen_count)
        prev_turn, prev_kind = s.turn, s.kind
    if prev_kind == Kind.PROMPT:
        raise TrajectoryError("trajectory has a prompt but no generated turn")
    if gen_count.get(prev_turn, 0) == 0:
        raise TrajectoryError(f"turn {prev_turn} has no generated tokens")


def _check_turn_closed(segments, turn, gen_count):
    if gen_count.get(turn, 0) == 0:
        raise TrajectoryError(f"turn {turn} has no generated tokens")
    obs = sum(len(s) for s in segments if s.turn == turn and s.kind == Kind.OBS)
    if obs == 0:
        # The next turn's first token is predicted from the last observation token; without one the
        # rollout context is undefined (MEM1 ends the episode when no observation comes back).
        raise TrajectoryError(f"turn {turn} is followed by turn {turn + 1} but has no observation tokens")


def split_generation(token_ids: Sequence[int], end_of_state: Callable[[Sequence[int]], int]) -> tuple[list, list]:
    """Cut one generation into (STATE, ACTION) at the token where `</think>` ends.

    `end_of_state(ids)` returns the number of leading tokens that make up the state (0 if there is no `</think>`);
    build one with `think_splitter(tokenizer)`. Without `</think>` the whole generation is ACTION, as in MEM1.
    """
    k = end_of_state(token_ids)
    return list(token_ids[:k]), list(token_ids[k:])


def think_splitter(tokenizer, close_tag: str = "</think>") -> Callable[[Sequence[int]], int]:
    """Return `end_of_state(ids)` for a HF tokenizer.

    If the tag is one token, scan ids. Otherwise find the shortest prefix whose decoding contains the tag (binary
    search over prefix lengths: decoding a prefix only grows as the prefix grows). Decoding is used to *locate*
    the boundary; the ids themselves are never re-tokenized.
    """
    tag_ids = tokenizer.encode(close_tag, add_special_tokens=False)
    if len(tag_ids) == 1:
        tag = tag_ids[0]

        def end_single(ids):
            for i, t in enumerate(ids):
                if t == tag:
                    return i + 1
            return 0
        return end_single

    def end_multi(ids):
        ids = list(ids)
        if close_tag not in tokenizer.decode(ids):
            return 0
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if close_tag in tokenizer.decode(ids[:mid]):
                hi = mid
            else:
                lo = mid + 1
        return lo
    return end_multi
