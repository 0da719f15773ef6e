"""The agent loop's protocol, driven by a scripted engine (no model): stops, observations, scoring, failures."""
from mem1_fast.rollout import AgentConfig, Generation, KVStats, run_episodes
from mem1_fast.retrieval import RetrievalError
from mem1_fast.tasks.qa import QAProtocol
from mem1_fast.tasks.synthetic import vocabulary
from mem1_fast.tiny import word_tokenizer
from mem1_fast.trajectory import Kind

TOK = word_tokenizer(vocabulary() + ["Search", "failed:", "server"])


class ScriptedEngine:
    def __init__(self, scripts):
        self.scripts = scripts  # per episode: list of generation texts
        self.seen_obs = {}

    def start(self, prompts, greedy=None, seed=None):
        self.turn = [0] * len(prompts)

    def step(self, idx, observations=None):
        out = []
        for k, i in enumerate(idx):
            if observations is not None:
                self.seen_obs.setdefault(i, []).append(TOK.decode(observations[k]))
            ids = TOK.encode(self.scripts[i][self.turn[i]], add_special_tokens=False)
            self.turn[i] += 1
            out.append(Generation(ids, [-0.5] * len(ids), "stop"))
        return out

    def kv_stats(self, i):
        return KVStats()


class Ep(QAProtocol):  # MEM1's tags and scoring (tasks/qa.py); the environment is scripted
    def __init__(self, prompt, targets, max_turns, fail=False):
        self.prompt, self.targets, self.max_turns, self.fail = prompt, targets, max_turns, fail
        self.queries = []

    def observe(self, query, turns_left):
        self.queries.append((query, turns_left))
        if self.fail:
            raise RetrievalError("server down")
        return f"<information> {query} is a city . </information>"


def test_protocol():
    names = vocabulary()[-5:]
    a, b = names[0], names[1]
    eps = [Ep(f"<q> where was {a} born ?", [[b]], 3),  # search, then answer
           Ep(f"<q> where was {a} born ?", [[b]], 2),  # searches on its last turn: not executed
           Ep(f"<q> where was {a} born ?", [[b]], 3, fail=True),  # retriever fails: an observation, go on
           Ep(f"<q> where was {a} born ?", [[b]], 3)]  # malformed: ends
    scripts = [
        [f"<think> found ; next {a} </think> <search> {a} </search>", f"<think> done </think> <answer> {b} </answer>"],
        [f"<think> x </think> <search> {a} </search>", f"<think> x </think> <search> {b} </search>"],
        [f"<think> x </think> <search> {a} </search>", f"<think> x </think> <answer> {a} </answer>"],
        [f"<think> x </think> {a} {b}"],
    ]
    eng = ScriptedEngine(scripts)
    trajs = run_episodes(eng, TOK, eps, AgentConfig())
    t0, t1, t2, t3 = trajs
    assert t0.info.answered and t0.reward == 1.0 and t0.info.turns == 2 and eps[0].queries == [(a, 2)]
    assert t0.segments[1].kind == Kind.STATE and TOK.decode(t0.segments[1].token_ids).endswith("</think>")
    assert t1.info.searches == 1 and eps[1].queries == [(a, 1)] and not t1.info.answered
    assert t1.info.finish == "search on the last turn" and t1.reward == 0
    assert t1.segments[-1].kind == Kind.ACTION  # no observation after the final-turn search
    assert t2.info.retrieval_errors == 1 and t2.info.turns == 2 and t2.reward == 0
    assert "Search failed: server" in eng.seen_obs[2][0]
    assert not t3.info.valid and t3.info.turns == 1 and "no <search> or <answer>" in t3.info.finish
    # sampled ids and log-probs are kept as given
    assert t0.generation(0) == TOK.encode(scripts[0][0], add_special_tokens=False)
    assert t0.generation_logprobs(1) == [-0.5] * len(t0.generation(1))


def test_an_episode_that_takes_one_answer_per_objective():
    """The synthetic task answers each question with its own action: the loop hands every answer to the episode,
    feeds its reply back, ends on the N-th answer, and scores the answers given however the episode ended."""
    from mem1_fast.tasks.synthetic import SyntheticTask, expert_generations
    task = SyntheticTask(seed=4, n_range=(3, 3))
    full, short, bad = task.sample(), task.sample(), task.sample()
    gens = [expert_generations(ep) for ep in (full, short, bad)]
    answer_turns = [[j for j, g in enumerate(gs) if "<answer>" in g] for gs in gens]
    short.max_turns = answer_turns[1][1] + 1  # the budget's last turn is the second answer
    k = answer_turns[2][0]  # bad: the first answer, then junk
    gens[2] = gens[2][:k + 1] + ["<think> x </think> nothing"]
    eng = ScriptedEngine(gens)
    t_full, t_short, t_bad = run_episodes(eng, TOK, [full, short, bad], AgentConfig())
    hops = sum(len(r) for _, r in full.plan)
    assert t_full.info.answered and t_full.info.finish == "answer" and t_full.reward == 3.0
    assert t_full.info.turns == hops + 3 and t_full.info.searches == hops
    assert t_full.info.per_objective == [1.0, 1.0, 1.0]
    replies = [o for o in eng.seen_obs[0] if "<q>" in o]  # the replies to answers 1 and 2: the next questions
    assert [r.split("[/HINT] ")[1] for r in replies] == [q + " </information>" for q in full.questions[1:]]
    assert not t_short.info.answered and t_short.info.finish == "turn budget spent after 2 answers"
    assert t_short.info.per_objective == [1.0, 1.0, 0.0] and t_short.reward == 2.0
    assert t_short.segments[-1].kind == Kind.ACTION  # no reply after the budget's last turn
    assert not t_bad.info.valid and t_bad.info.per_objective == [1.0, 0.0, 0.0] and t_bad.reward == 1.0
