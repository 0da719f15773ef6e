"""Tasks: the protocol and the registry of generated tasks (base), MEM1's QA protocol (qa), and the generated tasks
for CPU training, one file each: the synthetic multi-hop world (synthetic) and WebShop-style shopping (webshop)."""
from . import webshop  # noqa: F401  (registers "webshop")
from .base import Episode, EpisodeStats, Reply, Session, Task, get, names, register
from .qa import (MEM1_TEMPLATE, Action, QAEpisode, QAExample, Score, error_observation, exact_match,
                 examples_from_rows, f1, format_observation, hint, load_mem1_parquet, mem1_prompt,
                 normalize_answer, parse_action, score_answers)
from .synthetic import SyntheticTask, expert_generations, expert_trajectory, vocabulary

__all__ = ["MEM1_TEMPLATE", "Action", "Episode", "EpisodeStats", "QAEpisode", "QAExample", "Reply", "Score",
           "Session", "SyntheticTask", "Task", "error_observation", "exact_match", "examples_from_rows",
           "expert_generations", "expert_trajectory", "f1", "format_observation", "get", "hint", "load_mem1_parquet",
           "mem1_prompt", "names", "normalize_answer", "parse_action", "register", "score_answers", "vocabulary"]
