"""The MEM1 agent loop: turns of (state, action) generation, search, observation, until an answer.

Engine-agnostic: the engine owns the KV cache and its consolidation (see engine.py); this loop owns the protocol
(DESIGN §6): stop at `</search>` / `</answer>`, parse the action from the sampled ids, run the search, append the
observation with the turns-left hint, end on an answer, a malformed turn, or the last turn. A search on the last
turn is not executed (its result could never be read). A failing retriever becomes an observation, not a crash.

Episodes need: `prompt` (str), `targets` (alias lists), `observe(query, turns_left) -> str`, and optionally
`max_turns`. Generated ids are kept as sampled; only environment text is tokenized.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .retrieval import RetrievalError
from .tasks.qa import parse_action, score_answers
from .trajectory import Trajectory, split_generation, think_splitter


@dataclass
class AgentConfig:
    max_turns: int = 6  # used when an episode does not set its own


def run_episodes(engine, tokenizer, episodes: Sequence, cfg: AgentConfig = AgentConfig()) -> list[Trajectory]:
    n = len(episodes)
    if n == 0:
        return []
    split = think_splitter(tokenizer)
    prompts = [tokenizer.encode(ep.prompt, add_special_tokens=False) for ep in episodes]
    engine.start(prompts)
    triples = [[("PROMPT", 0, p)] for p in prompts]
    logprobs = [[None] for _ in prompts]
    stats = [dict(turns=0, searches=0, answered=False, valid=True, em=0.0, f1=0.0, n_objectives=len(ep.targets),
                  retrieval_errors=0, finish="") for ep in episodes]
    max_turns = [getattr(ep, "max_turns", None) or cfg.max_turns for ep in episodes]
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
            st["turns"] = turn + 1
            act = parse_action(tokenizer.decode(g.token_ids, skip_special_tokens=False))
            turns_left = max_turns[i] - turn - 1
            if act.kind == "answer":
                score = score_answers(act.content, episodes[i].targets)
                st.update(answered=True, em=score.em, f1=score.f1, finish="answer")
            elif act.kind == "search" and turns_left > 0:
                try:
                    text = episodes[i].observe(act.content, turns_left)
                except RetrievalError as e:  # the agent sees the failure; training goes on
                    st["retrieval_errors"] += 1
                    text = _error_observation(episodes[i], e, turns_left)
                ids = tokenizer.encode(text, add_special_tokens=False)
                if not ids:
                    raise ValueError(f"episode {i}: empty observation for query {act.content!r}")
                triples[i].append(("OBS", turn, ids))
                logprobs[i].append(None)
                st["searches"] += 1
                next_active.append(i)
                obs.append(ids)
            else:
                reason = act.error or ("search on the last turn" if act.kind == "search" else "no action")
                st.update(valid=act.kind is not None, finish=reason)
        active = next_active
    trajs = []
    for i in range(n):
        stats[i]["peak_kv_tokens"] = engine.peak_kv_tokens(i)
        trajs.append(Trajectory.from_triples(triples[i], logprobs[i], reward=stats[i]["em"], info=stats[i]))
    return trajs


def _error_observation(episode, err, turns_left) -> str:
    fn = getattr(episode, "error_observation", None)
    if fn is not None:
        return fn(str(err), turns_left)
    from .tasks.qa import error_observation, hint
    return error_observation(hint(turns_left), str(err))
