"""Rollouts: the engine contract and registry (base.py), one file per engine (hf.py, paged.py, vllm.py), the MEM1
agent loop (agent.py).

    from mem1_fast.rollout import create, run_episodes
    engine = create("hf", model, tok, "recompute", max_new_tokens=24, temperature=1.0, greedy=False, seed=0)
    trajs = run_episodes(engine, tok, episodes)
"""
from . import hf, paged, vllm  # noqa: F401  (register "hf", "paged", and "vllm" where vLLM is installed)
from .agent import AgentConfig, run_episodes
from .base import Engine, Generation, KVStats, create, full_state_dict, names, pairs, register, serves
from .hf import HFEngine

__all__ = ["AgentConfig", "Engine", "Generation", "HFEngine", "KVStats", "create", "full_state_dict", "names", "pairs",
           "register", "run_episodes", "serves"]
