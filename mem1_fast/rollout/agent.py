"""The MEM1 agent loop: turns of (state, action) generation and environment replies, until the episode ends.

Engine- and task-agnostic: the engine (rollout/base.py) owns the KV cache and its consolidation; the task's episode
(tasks/base.py) owns the action language and opens one environment session per rollout, which owns the replies and
the scoring; this loop owns the protocol (docs/design.md §6): parse each turn's action from the sampled ids, hand it
to the rollout's session, append its reply as the next observation, end when the session says the episode is over,
on a malformed turn, or after the last turn; the episode is scored whichever way it ended. A failing retriever
becomes an observation, not a crash. Generated ids are kept as sampled; only environment text is tokenized. Each
trajectory's `info` is an EpisodeStats.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..retrieval import RetrievalError
from ..tasks.base import EpisodeStats, Reply
from ..trajectory import Trajectory, split_generation, think_splitter


@dataclass
class AgentConfig:
    max_turns: int = 6  # used when an episode does not set its own


def run_episodes(engine, tokenizer, episodes: Sequence, cfg: AgentConfig = AgentConfig(), greedy: bool | None = None,
                 seed: int | None = None) -> list[Trajectory]:
    n = len(episodes)
    if n == 0:
        return []
    split = think_splitter(tokenizer)
    prompts = [tokenizer.encode(ep.prompt, add_special_tokens=False) for ep in episodes]
    engine.start(prompts, greedy=greedy, seed=seed)
    triples = [[("PROMPT", 0, p)] for p in prompts]
    logprobs = [[None] for _ in prompts]
    stats = [EpisodeStats(n_objectives=ep.n_objectives) for ep in episodes]
    max_turns = [getattr(ep, "max_turns", None) or cfg.max_turns for ep in episodes]
    sessions = [ep.start() for ep in episodes]  # a group's rollouts share an episode object, never its state
    active, obs = list(range(n)), None
    for turn in range(max(max_turns)):
        active = [i for i in active if turn < max_turns[i]]
        if not active:
            break
        gens = engine.step(active, obs)
        next_active, obs = [], []
        for i, g in zip(active, gens):
            state, action = split_generation(g.token_ids, split)
            triples[i] += [("STATE", turn, state), ("ACTION", turn, action)]
            logprobs[i] += [g.logprobs[:len(state)], g.logprobs[len(state):]]
            st = stats[i]
            st.turns = turn + 1
            act = episodes[i].parse_action(tokenizer.decode(g.token_ids, skip_special_tokens=False))
            turns_left = max_turns[i] - turn - 1
            if act.kind is None:
                st.valid, st.finish = False, act.error or "no action"
                continue
            st.searches += act.kind == "search" and turns_left > 0  # a search on the last turn is never read
            try:
                reply = sessions[i].step(act, turns_left)
            except RetrievalError as e:  # the agent sees the failure; training goes on
                st.retrieval_errors += 1
                reply = Reply(sessions[i].error_observation(str(e), turns_left))
            text = reply.observation
            if reply.done:
                st.answered, st.finish, text = True, reply.finish, None
            elif text is None:
                st.finish = reply.finish
            elif turns_left == 0:  # a reply nobody can read
                text, st.finish = None, "turn budget spent"
            if text is not None:
                ids = tokenizer.encode(text, add_special_tokens=False)
                if not ids:
                    raise ValueError(f"episode {i}: empty observation after {act.kind} {act.content!r}")
                triples[i].append(("OBS", turn, ids))
                logprobs[i].append(None)
                next_active.append(i)
                obs.append(ids)
        active = next_active
    trajs = []
    for i in range(n):
        kv = engine.kv_stats(i)
        st = stats[i]
        score = sessions[i].score()
        st.reward, st.per_objective, st.metrics = score.reward, list(score.per_objective), dict(score.metrics)
        st.peak_kv_tokens, st.prefilled_tokens, st.reencoded_tokens = (kv.peak_kv_tokens, kv.prefilled_tokens,
                                                                       kv.reencoded_tokens)
        st.peak_kv_bytes = kv.peak_kv_bytes
        st.kv_bytes_per_turn = [t.kv_bytes for t in kv.turns]
        st.prefilled_per_turn = [t.prefilled for t in kv.turns]
        st.reencoded_per_turn = [t.reencoded for t in kv.turns]
        trajs.append(Trajectory.from_triples(triples[i], logprobs[i], reward=st.reward, info=st))
    return trajs
