"""The MEM1 agent loop: turns of (state, action) generation, search, observation, until an answer.

Engine- and task-agnostic: the engine (rollout/base.py) owns the KV cache and its consolidation; the episode
(tasks/base.py) owns the action language, the environment and the scoring; this loop owns the protocol
(docs/design.md §6): parse each turn's action from the sampled ids, run the search (or hand an answer to the
episode, which may reply and go on), append the observation, end on the episode's last answer, a malformed turn,
or the last turn; the answers given are scored whichever way the episode ended. A search on the last turn is not
executed (its result could never be read). A failing retriever becomes an observation, not a crash. Generated ids
are kept as sampled; only environment text is tokenized. Each trajectory's `info` is an EpisodeStats.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..retrieval import RetrievalError
from ..tasks.base import EpisodeStats
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
    stats = [EpisodeStats(n_objectives=len(ep.targets)) for ep in episodes]
    max_turns = [getattr(ep, "max_turns", None) or cfg.max_turns for ep in episodes]
    answers = [[] for _ in episodes]
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
            st, ep = stats[i], episodes[i]
            st.turns = turn + 1
            act = ep.parse_action(tokenizer.decode(g.token_ids, skip_special_tokens=False))
            turns_left = max_turns[i] - turn - 1
            text = None
            if act.kind == "answer":
                answers[i].append(act.content)
                text = ep.reply(answers[i], turns_left)
                if text is None:
                    st.answered, st.finish = True, "answer"
                elif turns_left == 0:
                    text, st.finish = None, f"turn budget spent after {len(answers[i])} answers"
            elif act.kind == "search" and turns_left > 0:
                try:
                    text = ep.observe(act.content, turns_left)
                except RetrievalError as e:  # the agent sees the failure; training goes on
                    st.retrieval_errors += 1
                    text = ep.error_observation(str(e), turns_left)
                st.searches += 1
            else:
                st.valid = act.kind is not None
                st.finish = act.error or ("search on the last turn" if act.kind == "search" else "no action")
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
        if answers[i]:
            score = episodes[i].score(answers[i])
            st.em, st.f1, st.per_objective_em = score.em, score.f1, list(score.per_objective_em)
        st.peak_kv_tokens, st.prefilled_tokens, st.reencoded_tokens = (kv.peak_kv_tokens, kv.prefilled_tokens,
                                                                       kv.reencoded_tokens)
        st.peak_kv_bytes = kv.peak_kv_bytes
        st.kv_bytes_per_turn = [t.kv_bytes for t in kv.turns]
        st.prefilled_per_turn = [t.prefilled for t in kv.turns]
        st.reencoded_per_turn = [t.reencoded for t in kv.turns]
        trajs.append(Trajectory.from_triples(triples[i], logprobs[i], reward=st.em, info=st))
    return trajs
