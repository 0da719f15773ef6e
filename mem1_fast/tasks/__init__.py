"""Tasks: MEM1's QA protocol (qa) and the synthetic multi-hop world used for CPU training (synthetic)."""
from .qa import (MEM1_TEMPLATE, Action, QAEpisode, QAExample, Score, error_observation, exact_match,
                 examples_from_rows, f1, format_observation, hint, load_mem1_parquet, mem1_prompt,
                 normalize_answer, parse_action, score_answers)
from .synthetic import Episode, SyntheticTask, expert_generations, expert_trajectory, vocabulary

__all__ = ["MEM1_TEMPLATE", "Action", "QAEpisode", "QAExample", "Score", "error_observation", "exact_match",
           "examples_from_rows", "f1", "format_observation", "hint", "load_mem1_parquet", "mem1_prompt",
           "normalize_answer", "parse_action", "score_answers",
           "Episode", "SyntheticTask", "expert_generations", "expert_trajectory", "vocabulary"]
