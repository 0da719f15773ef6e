"""What the agent loop needs from a task (a new domain is one file implementing it): the episode, the
environment session one rollout of it runs against, the score, and the typed per-episode record the loop returns
in `Trajectory.info`. docs/design.md §6."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar, Protocol


@dataclass(frozen=True)
class Action:
    kind: str | None  # the task's action kinds ("search", "answer", "click"); None = malformed, see error
    content: str  # stripped text of the action's argument
    error: str | None = None
    think: str = ""  # stripped text inside <think>...</think>, '' when absent


@dataclass
class Score:
    """An episode's outcome. `reward` is what RL maximizes (MEM1: a sum over the episode's objectives);
    `per_objective[i]` is objective i's part of it (0 for one never reached); `metrics` are named sums over the
    objectives that evaluation reports per objective, the first one the task's headline (QA: em, f1; shopping:
    score, success)."""

    reward: float
    per_objective: list[float]
    metrics: dict[str, float]

    @property
    def n(self) -> int:
        return len(self.per_objective)


@dataclass(frozen=True)
class Reply:
    """The environment's answer to one well-formed action."""

    observation: str | None  # what the agent reads at its next turn; None: there is no next turn
    done: bool = False  # the task itself ended the episode (its last answer, its last purchase)
    finish: str = ""  # with observation None: why the episode ended


class Session(Protocol):
    """One rollout's environment state. The agent loop opens one per rollout (`Episode.start()`), so the rollouts of
    a group share their episode (prompt, world, targets) and never their state (answers given, page, cart)."""

    def step(self, action: Action, turns_left: int) -> Reply:
        """Apply a well-formed action; `turns_left` = turns after this one (0: nothing more can be read, so a
        session may skip work whose result nobody would see). May raise retrieval.RetrievalError."""

    def error_observation(self, message: str, turns_left: int) -> str:
        """The reply when the environment failed (the agent sees it; training goes on)."""

    def score(self) -> Score:
        """The outcome of everything done so far, however the episode ended."""


class Episode(Protocol):
    prompt: str  # the text the policy sees first (chat template already applied)
    n_objectives: int  # objectives (questions, purchases) the episode scores
    max_turns: int

    def parse_action(self, text: str) -> Action:
        """One turn's generation (decoded, special tokens kept) -> Action; never raises on model output."""

    def start(self) -> Session:
        """A fresh environment for one rollout of this episode."""


class Task(Protocol):
    """A generated task: fresh episodes drawn per call (a random world, a random catalog), N objectives each,
    with a scripted expert for the warm start and the closed set of words its text uses (the tiny model's
    vocabulary). Registered by name (`register`); `--task NAME` picks one."""

    MAX_TURNS: ClassVar[int]  # the largest turn budget (hint numbers 0..MAX_TURNS are vocabulary words)
    PUNCTUATION: ClassVar[str]  # characters the tiny tokenizer splits off as words of their own
    RECIPE: ClassVar[dict]  # the trainer's option defaults under `--task NAME` (those it was tuned with)

    def __init__(self, seed: int = 0, n_range: tuple[int, int] = (1, 1), slack: int | tuple[int, int] = 2):
        """Raises ValueError when n_range or slack cannot be served (too many objectives for the world, a budget
        past MAX_TURNS)."""

    def sample(self, rng: random.Random | None = None, n: int | None = None) -> Episode:
        """An episode with n objectives (None: drawn from n_range); budget = the expert's turns + slack."""

    @staticmethod
    def vocabulary() -> list[str]:
        """Every word the task's text (prompt, observations, hints, the expert's generations) can contain."""

    @staticmethod
    def expert_trajectory(episode, shortcut: float = 0.0, rng: random.Random | None = None) -> list[tuple[str, str]]:
        """(generation, observation) per turn of the scripted expert, as the agent loop would produce them ('' after
        the last turn). `shortcut` > 0: the task's hasty teacher makes its characteristic mistake at that rate."""



def compact_hint(turns_left: int, max_turns: int, last: str) -> str:
    """MEM1's turns-left hint in a generated task's words (`last`: what the final turn must do); '' after the last
    turn."""
    if not 0 <= turns_left <= max_turns:
        raise ValueError(f"turns_left must be in 0..{max_turns}, got {turns_left}")
    if turns_left == 0:
        return ""
    if turns_left == 1:
        return f"[HINT] 1 turn left , {last} [/HINT]"
    return f"[HINT] {turns_left} turns left [/HINT]"


_TASKS: dict[str, Callable[..., Task]] = {}


def register(name: str, cls) -> None:
    if name in _TASKS:
        raise ValueError(f"task {name!r} is registered already")
    _TASKS[name] = cls


def get(name: str):
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; generated tasks: {', '.join(_TASKS)}")
    return _TASKS[name]


def names() -> tuple[str, ...]:
    return tuple(_TASKS)


@dataclass
class EpisodeStats:
    """What happened in one episode, as the agent loop saw it."""

    n_objectives: int
    turns: int = 0
    searches: int = 0  # actions of kind "search" before the last turn
    answered: bool = False  # the task ended the episode (its last answer or purchase), not the budget or a bad turn
    valid: bool = True  # every turn parsed as an action
    reward: float = 0.0  # Score.reward
    per_objective: list[float] = field(default_factory=list)  # Score.per_objective
    metrics: dict[str, float] = field(default_factory=dict)  # Score.metrics (sums over objectives)
    retrieval_errors: int = 0
    finish: str = ""  # "answer", "purchase", or why the episode ended before the task's end
    peak_kv_tokens: int = 0
    prefilled_tokens: int = 0
    reencoded_tokens: int = 0
    peak_kv_bytes: int = 0
    kv_bytes_per_turn: list[int] = field(default_factory=list)  # KV storage held at the end of each turn
    prefilled_per_turn: list[int] = field(default_factory=list)  # tokens encoded at each turn's start
    reencoded_per_turn: list[int] = field(default_factory=list)  # of those, encoded before (recompute's copy)

    def as_dict(self) -> dict:
        return asdict(self)

