"""What the agent loop needs from a task's episode (a new domain is one file implementing it), and the typed
per-episode record the loop returns in `Trajectory.info`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Action:
    kind: str | None  # "search" or "answer"; None = malformed, see error
    content: str  # stripped text inside the action tag
    error: str | None = None
    think: str = ""  # stripped text inside <think>...</think>, '' when absent


@dataclass
class Score:
    em: float  # sum over objectives, 0..N (MEM1's reward)
    f1: float  # sum over objectives
    per_objective_em: list[float]
    n_pred: int  # answers given; extra ones are ignored, missing ones score 0
    per_objective_f1: list[float]

    @property
    def n(self) -> int:
        return len(self.per_objective_em)


class Episode(Protocol):
    prompt: str  # the text the policy sees first (chat template already applied)
    targets: Sequence  # one entry per objective
    max_turns: int

    def parse_action(self, text: str) -> Action:
        """One turn's generation (decoded, special tokens kept) -> Action; never raises on model output."""

    def observe(self, query: str, turns_left: int) -> str:
        """The environment's reply to a search (may raise retrieval.RetrievalError)."""

    def error_observation(self, message: str, turns_left: int) -> str:
        """The reply when the environment failed (the agent sees it; training goes on)."""

    def reply(self, answers: Sequence[str], turns_left: int) -> str | None:
        """The environment's reply to an answer action (`answers`: the contents of every answer action so far,
        the latest last): an observation when the episode takes more answers (a task that takes one answer per
        objective), None when the episode is over."""

    def score(self, answers: Sequence[str]) -> Score:
        """Score the contents of the episode's answer actions, in order."""


@dataclass
class EpisodeStats:
    """What happened in one episode, as the agent loop saw it."""

    n_objectives: int
    turns: int = 0
    searches: int = 0
    answered: bool = False  # the episode ended on its last answer (not on the turn budget or a bad turn)
    valid: bool = True  # every turn parsed as an action
    em: float = 0.0  # summed over objectives
    f1: float = 0.0
    per_objective_em: list[float] = field(default_factory=list)  # answer i against target i; [] unanswered
    retrieval_errors: int = 0
    finish: str = ""  # "answer", or why the episode ended before its last answer
    peak_kv_tokens: int = 0
    prefilled_tokens: int = 0
    reencoded_tokens: int = 0
    peak_kv_bytes: int = 0
    kv_bytes_per_turn: list[int] = field(default_factory=list)  # KV storage held at the end of each turn
    prefilled_per_turn: list[int] = field(default_factory=list)  # tokens encoded at each turn's start
    reencoded_per_turn: list[int] = field(default_factory=list)  # of those, encoded before (recompute's copy)

    def as_dict(self) -> dict:
        return asdict(self)
