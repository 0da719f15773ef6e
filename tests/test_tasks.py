import random
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mem1_fast.retrieval import Doc
from mem1_fast.tasks import (MEM1_TEMPLATE, QAExample, error_observation, exact_match, examples_from_rows, f1,
                             format_observation, hint, load_mem1_parquet, mem1_prompt, normalize_answer,
                             parse_action, score_answers)
from mem1_fast.tasks import synthetic as syn

# ------------------------------------------------------------------------------------------------ prompt, hint


def test_template_and_prompt():
    for tag in ("think", "search", "answer", "information"):
        assert f"<{tag}>" in MEM1_TEMPLATE
    assert "<answer> answer1; answer2; ... </answer>" in MEM1_TEMPLATE
    assert len(re.findall(r"<answer>(.*?)</answer>", MEM1_TEMPLATE)) == 2
    p = mem1_prompt(["who wrote hamlet", "where is paris?"])
    assert p.endswith("Answer the following questions: who wrote hamlet?; where is paris?\n")
    with pytest.raises(ValueError):
        mem1_prompt([])


def test_hint():
    assert hint(5) == "[HINT]You have 5 turns left.[/HINT]"
    assert hint(1) == "[HINT]You have 1 turn left. You must answer the question in the next turn.[/HINT]"
    assert hint(0) == ""
    with pytest.raises(ValueError):
        hint(-1)


# ---------------------------------------------------------------------------------------------------- actions


@pytest.mark.parametrize("text,kind,content", [
    ("<think> I know x </think><search> capital of france </search>", "search", "capital of france"),
    ("<think>a</think>\n<answer> paris; london </answer>", "answer", "paris; london"),
    ("<search>q</search>", "search", "q"),  # think is optional
    ("Sure! <think>s</think> ok <answer>x</answer> bye", "answer", "x"),  # text around tags is tolerated
    ("<think> maybe <search> a </search> </think> <answer> b </answer>", "answer", "b"),  # tags in think: not actions
    ("<think>s</think><search></search>", "search", ""),
])
def test_parse_action_good(text, kind, content):
    a = parse_action(text)
    assert (a.kind, a.content, a.error) == (kind, content, None)


@pytest.mark.parametrize("text,err", [
    ("<think> just thinking </think>", "no <search> or <answer>"),
    ("plain text", "no <search> or <answer>"),
    ("", "no <search> or <answer>"),
    ("<think> x </think> q </search>", "</search> without <search>"),
    ("<think> x </think><search> q", "unclosed <search>"),
    ("<think> x </think><answer> a </search>", "unclosed <answer>"),
    ("<think> x <search> q </search>", "unclosed <think>"),
    ("<think>x</think><search>a</search><search>b</search>", "2 actions"),
    ("<think>x</think><search>a</search><answer>b</answer>", "2 actions"),
])
def test_parse_action_malformed(text, err):
    a = parse_action(text)
    assert a.kind is None and a.content == "" and err in a.error


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list("ab <>/;\n") + ["<think>", "</think>", "<search>", "</search>", "<answer>",
                                                      "</answer>"]), max_size=30).map("".join))
def test_parse_action_never_raises(text):
    a = parse_action(text)
    assert (a.kind is None) == (a.error is not None)


@settings(max_examples=100, deadline=None)
@given(think=st.text(alphabet="abc ;\n", max_size=20), content=st.text(alphabet="xyz ;?", max_size=20),
       kind=st.sampled_from(["search", "answer"]))
def test_parse_action_roundtrip(think, content, kind):
    a = parse_action(f"<think>{think}</think> <{kind}>{content}</{kind}>")
    assert (a.kind, a.content, a.think) == (kind, content.strip(), think.strip())


# ------------------------------------------------------------------------------------------------ observations

DOCS = [(Doc("0", '"Paris"\nParis is the capital of France .'), 3.0),
        (Doc("1", '"Lyon"\nLyon is a city in France .'), 1.0)]


def words(s):
    return len(s.split())


def test_format_observation_mem1_exact():
    obs = format_observation(DOCS, hint(3))
    assert obs == ("\n\n<information>[HINT]You have 3 turns left.[/HINT]\n\n"
                   "Doc 1(Title: Paris) Paris is the capital of France .\nDoc 2(Title: Lyon) Lyon is a city in France ."
                   "</information>\n\n")
    assert format_observation([d for d, _ in DOCS], "") == format_observation(DOCS, "")


@settings(max_examples=60, deadline=None)
@given(budget=st.integers(0, 40), h=st.integers(0, 4))
def test_format_observation_budget(budget, h):
    full = format_observation(DOCS, hint(h))
    frame = words(f"\n\n<information>{hint(h)}\n\n…</information>\n\n")  # empty frame with the cut marker
    if budget < frame:
        with pytest.raises(ValueError, match="smaller than the empty frame"):
            format_observation(DOCS, hint(h), budget, words)
        return
    obs = format_observation(DOCS, hint(h), budget, words)
    assert words(obs) <= budget
    assert obs.startswith(f"\n\n<information>{hint(h)}\n\n") and obs.endswith("</information>\n\n")
    if words(full) <= budget:
        assert obs == full
    else:
        assert obs.endswith(" …</information>\n\n") or obs.endswith("\n\n…</information>\n\n")
        assert words(obs) == budget  # longest prefix under a word counter
        body = obs.split("\n\n")[2].removesuffix("</information>").removesuffix("…").strip()
        assert full.split("\n\n")[2].startswith(body)  # a prefix of the documents, nothing reordered
        assert obs == format_observation(DOCS, hint(h), budget, words)  # deterministic


def test_format_observation_budget_needs_counter():
    with pytest.raises(ValueError, match="count_tokens"):
        format_observation(DOCS, "", budget=10)


def test_error_observation():
    obs = error_observation(hint(2), "retriever at x unreachable")
    assert obs.startswith("\n\n<information>[HINT]You have 2 turns left.[/HINT]") and "unreachable" in obs
    assert obs.endswith("</information>\n\n")


# ---------------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("raw,norm", [
    ("The Eiffel Tower!", "eiffel tower"), ("  a  cat, an apple ", "cat apple"), ("U.S.A.", "usa"),
    ("Theater", "theater"), ("the", ""), ("New\tYork\n City", "new york city"), ("Anne-Marie", "annemarie"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_em_f1_aliases():
    assert exact_match("the USA", ["United States", "usa"])
    assert not exact_match("USA today", ["usa"])
    assert exact_match("Paris", "paris")
    assert f1("new york city", ["york", "New York City"]) == 1.0
    assert f1("new york", ["new york city"]) == pytest.approx(0.8)
    assert f1("boston", ["new york"]) == 0.0
    assert f1("the", ["a"]) == 1.0  # both normalize to empty
    with pytest.raises(ValueError):
        exact_match("x", [])


def test_score_answers_positional():
    targets = [["paris"], ["london", "City of London"], ["rome"]]
    s = score_answers("Paris; the city of London; rome", targets)
    assert (s.reward, s.per_objective, s.metrics) == (3.0, [1.0, 1.0, 1.0], {"em": 3.0, "f1": 3.0})
    s = score_answers("london; paris; rome", targets)  # order matters
    assert (s.reward, s.per_objective) == (1.0, [0.0, 0.0, 1.0])
    s = score_answers("paris; london", targets)  # missing -> 0
    assert (s.reward, s.per_objective, s.n) == (2.0, [1.0, 1.0, 0.0], 3)
    s = score_answers("paris; london; rome; madrid", targets)  # extra ignored
    assert (s.reward, s.per_objective) == (3.0, [1.0, 1.0, 1.0])
    s = score_answers("  ", targets)
    assert (s.reward, s.metrics) == (0.0, {"em": 0.0, "f1": 0.0})
    s = score_answers("paris; new london", targets)
    assert s.metrics["f1"] == pytest.approx(1.0 + 2 / 3) and s.metrics["em"] == s.reward == 1.0


# ------------------------------------------------------------------------------------------------ MEM1 parquet


def _rows():
    return [{"data_source": "nq", "ability": "fact-reasoning",
             "prompt": [{"role": "user", "content": mem1_prompt(["q1", "q2"])}],
             "reward_model": {"style": "rule", "ground_truth": {"target": [["a1", "A one"], ["a2"]]}},
             "extra_info": {"split": "train", "indices": [0, 1]}},
            {"data_source": "hotpotqa", "ability": "fact-reasoning",
             "prompt": [{"role": "user", "content": mem1_prompt(["q3", "q4"])}],
             "reward_model": {"style": "rule", "ground_truth": {"target": [["a3"], ["a4", "b4"]]}},
             "extra_info": {"split": "train", "indices": [2, 3]}}]


def test_parquet_roundtrip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(_rows()), path)
    ex = load_mem1_parquet(path)
    assert [e.targets for e in ex] == [[["a1", "A one"], ["a2"]], [["a3"], ["a4", "b4"]]]
    assert ex[1].data_source == "hotpotqa" and ex[0].extra_info == {"split": "train", "indices": [0, 1]}
    assert ex[0].text.endswith("q1?; q2?\n") and ex[0].prompt[0]["role"] == "user"
    assert score_answers("A one; a2", ex[0].targets).reward == 2


def test_parquet_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "reward_model"} for r in _rows()]), path)
    with pytest.raises(KeyError, match="reward_model"):
        load_mem1_parquet(path)


def test_rows_numpy_and_errors():
    row = _rows()[0]
    target = np.array([np.array(["a1", "A one"]), np.array(["a2"])], dtype=object)  # what pandas hands out
    row["reward_model"]["ground_truth"]["target"] = target
    row["prompt"] = np.array(row["prompt"], dtype=object)
    ex = examples_from_rows([row])[0]
    assert ex.targets == [["a1", "A one"], ["a2"]] and isinstance(ex.prompt, list)
    flat = dict(_rows()[0], reward_model={"ground_truth": {"target": np.array(["x", "y"])}})
    assert examples_from_rows([flat])[0].targets == [["x", "y"]]  # Search-R1 single-objective row
    with pytest.raises(ValueError, match="row 1: no reward_model"):
        examples_from_rows([_rows()[0], dict(_rows()[0], reward_model={"style": "rule"})])
    with pytest.raises(ValueError, match="target 1 must be a non-empty list"):
        examples_from_rows([dict(_rows()[0], reward_model={"ground_truth": {"target": [["a"], []]}})])
    assert QAExample("plain", [["a"]]).text == "plain"


# -------------------------------------------------------------------------------------------------- synthetic


def test_name_pool():
    vocab = syn.vocabulary()
    assert len(vocab) == len(set(vocab)) and vocab == syn.vocabulary()
    names = set(syn.NAMES)
    assert len(names) == len(syn.NAMES) >= 200
    assert all(n.isalpha() and n.islower() and len(n) >= 4 for n in names)
    assert not names & set(syn._template_words() + list(syn.STATE_WORDS) + list(syn.HINT_WORDS))
    from bm25s.tokenization import STOPWORDS_EN
    assert not names & set(STOPWORDS_EN)  # a stopword name would be unsearchable
    assert all(normalize_answer(n) == n for n in names)  # answers survive SQuAD normalization


def test_vocabulary_closure():
    vocab, task = set(syn.vocabulary()), syn.SyntheticTask(seed=1, n_range=(1, 6))
    seen = set()
    for t in range(syn.MAX_TURNS + 1):
        seen.update(syn.hint(t).split())
    for _ in range(100):
        ep = task.sample()
        texts = [ep.prompt, *ep.questions, *(d.contents.replace('"', "") for d in ep.docs)]
        texts += [s for turn in syn.expert_trajectory(ep) for s in turn]
        texts += [ep.observe(name, 0) for name in random.Random(0).sample(syn.NAMES, 5)]
        seen.update(w for t in texts for w in t.split())
    assert seen <= vocab, sorted(seen - vocab)
    assert set(syn.TAGS) <= seen


def test_fresh_worlds():
    task = syn.SyntheticTask(seed=0, n_range=(2, 2))
    eps = [task.sample() for _ in range(200)]
    assert len({frozenset(e.facts.items()) for e in eps}) == 200
    born = {}  # name -> set of birth cities across episodes where it is a person
    kinds = {}
    for e in eps:
        for (s, rel), o in e.facts.items():
            kinds.setdefault(s, set()).add(rel)
            if rel == "born":
                born.setdefault(s, set()).add(o)
    assert sum(len(v) > 1 for v in born.values()) > 50  # names get new facts
    assert sum(len(v) > 2 for v in kinds.values()) > 50  # and new roles (person, city, company)
    spread = [len({o for (s, rel), o in e.facts.items() if rel == "born"}) > 1 for e in eps]
    assert sum(spread) > 180  # relations are drawn per entity, not one per world
    # same seed -> same episodes
    a, b = syn.SyntheticTask(seed=7).sample(), syn.SyntheticTask(seed=7).sample()
    assert (a.prompt, a.docs, a.targets) == (b.prompt, b.docs, b.targets)


def test_expert_succeeds_through_retriever():
    task = syn.SyntheticTask(seed=3, n_range=(1, 4))
    hops = 0
    for _ in range(200):
        ep = task.sample()
        gens = syn.expert_generations(ep)
        assert len(gens) <= ep.max_turns
        # per question: one search per hop, then that question's answer
        script = [rels[i:] for _, rels in ep.plan for i in range(len(rels) + 1)]
        assert len(gens) == len(script)
        answers = []
        for g, rels in zip(gens, script):
            a = parse_action(g)
            assert a.error is None
            if not rels:
                assert a.kind == "answer" and a.think == f"found {a.content}"
                answers.append(a.content)
                continue
            assert a.kind == "search"
            entity = a.content
            [hits] = ep.retriever.search([entity], ep.topk)
            fact = syn.FACTS[rels[0]].format(s=entity, o=ep.facts[entity, rels[0]])
            assert any(fact in d.text for d, _ in hits), (entity, fact, hits)
            assert a.think == f"next {entity} {' '.join(rels)}"
            hops += 1
        assert answers == [t[0] for t in ep.targets]
        s = ep.score(answers)
        assert s.reward == s.metrics["em"] == ep.n
    assert hops > 300  # 2-hop questions were exercised


def test_hasty_teacher_answers_two_hop_questions_with_the_bridge_entity():
    task = syn.SyntheticTask(seed=6, n_range=(4, 4))
    eps = [task.sample() for _ in range(200)]
    for ep in eps[:20]:  # shortcut 1: every two-hop question is answered after its first hop
        answers = [parse_action(g).content for g in syn.expert_generations(ep, 1.0, random.Random(0)) if "<answer>" in g]
        assert answers == [ep.facts[s, rels[0]] for s, rels in ep.plan]
        assert syn.expert_generations(ep, 0.0) == syn.expert_generations(ep)
    rng, hasty, two_hop = random.Random(1), 0, 0
    for ep in eps:
        answers = [parse_action(g).content for g in syn.expert_generations(ep, 0.6, rng) if "<answer>" in g]
        for (s, rels), a, t in zip(ep.plan, answers, ep.targets):
            if len(rels) == 2:
                two_hop += 1
                hasty += a != t[0]
            else:
                assert a == t[0]  # one-hop questions are never cut short
    assert two_hop > 200 and abs(hasty / two_hop - 0.6) < 4 * (0.24 / two_hop) ** 0.5
    with pytest.raises(ValueError, match="rng"):
        syn.expert_generations(eps[0], 0.5)


def test_synthetic_scoring_is_per_answer_action():
    ep = syn.SyntheticTask(seed=2, n_range=(3, 3)).sample()
    a = [t[0] for t in ep.targets]
    assert ep.score(a).per_objective == [1.0, 1.0, 1.0]
    assert ep.score(a[:2]).per_objective == [1.0, 1.0, 0.0]  # unanswered scores 0
    assert ep.score([a[1], a[0], a[2]]).per_objective == [0.0, 0.0, 1.0]  # positional
    s = ep.score([f"{a[0]} ; {a[1]}", a[1], a[2]])  # one action answers one objective: no ';' splitting
    assert s.per_objective == [0.0, 1.0, 1.0] and s.reward == 2.0
    assert ep.reply(a[:1], 5) == f"<information> [HINT] 5 turns left [/HINT] {ep.questions[1]} </information>"
    assert ep.reply(a[:2], 0) == f"<information> {ep.questions[2]} </information>" and ep.reply(a, 5) is None


def test_lookups_have_a_fixed_shape_at_every_n():
    """What makes the protocol length-invariant: every question is a fixed-shape slot, and the environment hands
    the agent each next one in its reply to an answer, so no turn depends on N."""
    for n in (1, 4, 16):
        task = syn.SyntheticTask(seed=n, n_range=(n, n))
        for _ in range(30):
            ep = task.sample()
            words = ep.prompt.split()
            assert len(words) == syn.SLOT * n and ep.prompt == " ".join(ep.questions)
            subjects = [s for s, _ in ep.plan]
            answers = [t[0] for t in ep.targets]
            assert len(set(subjects + answers)) == 2 * n
            for k, (s, rels) in enumerate(ep.plan):
                assert ep.questions[k].split() == ["<q>", s, *rels, *["."] * (2 - len(rels))]
                if k:
                    assert ep.reply(answers[:k], 3) == f"<information> [HINT] 3 turns left [/HINT] {ep.questions[k]} </information>"


def test_slack_range_covers_every_hint_number():
    task = syn.SyntheticTask(seed=0, n_range=(1, 4), slack=(2, syn.MAX_TURNS))
    budgets = [(len(syn.expert_generations(ep)), ep.max_turns) for ep in (task.sample() for _ in range(2000))]
    assert all(turns + 2 <= m <= syn.MAX_TURNS for turns, m in budgets)
    assert {m for _, m in budgets} == set(range(4, syn.MAX_TURNS + 1))
    eps = [syn.SyntheticTask(n_range=(1, 8)).sample() for _ in range(50)]
    assert all(ep.max_turns == len(syn.expert_generations(ep)) + 2 for ep in eps)
    with pytest.raises(ValueError, match="slack"):
        syn.SyntheticTask(slack=(0, 3))


def test_expert_trajectory_observations():
    ep = syn.SyntheticTask(seed=5, n_range=(2, 2)).sample()
    traj = syn.expert_trajectory(ep)
    assert traj[-1][1] == ""
    for j, (g, obs) in enumerate(traj[:-1]):
        hint = syn.hint(ep.max_turns - j - 1)
        a = parse_action(g)
        if a.kind == "search":
            assert obs.startswith(f"<information> {hint} ") and obs.endswith(" </information>") and a.content in obs
        else:  # the environment's reply to an answer that is not the last: the next question
            assert obs == f"<information> {hint} {ep.questions[1]} </information>"


def test_synthetic_hint_and_args():
    assert syn.hint(3) == "[HINT] 3 turns left [/HINT]" and syn.hint(0) == ""
    with pytest.raises(ValueError):
        syn.hint(syn.MAX_TURNS + 1)
    with pytest.raises(ValueError, match="n_range"):
        syn.SyntheticTask(n_range=(3, 2))
    with pytest.raises(ValueError, match="n_range"):
        syn.SyntheticTask(n_range=(1, 30), question_types=("born",))
    with pytest.raises(ValueError, match="distinct answers"):
        syn.SyntheticTask(n_range=(1, 9), question_types=("born",))  # 8 cities: at most 8 distinct answers
    with pytest.raises(ValueError, match="unknown question types"):
        syn.SyntheticTask(question_types=("nope",))
    with pytest.raises(ValueError, match="name pool"):
        syn.SyntheticTask(n_persons=400)


def test_qa_episode():
    from mem1_fast.retrieval import BM25Retriever, RetrievalError
    from mem1_fast.tasks import QAEpisode
    ex = examples_from_rows(_rows())[0]
    ep = QAEpisode.from_example(ex, BM25Retriever([d for d, _ in DOCS]), topk=1, obs_budget=12, count_tokens=words)
    assert ep.prompt == ex.text and ep.targets == ex.targets
    obs = ep.observe("capital of france", 2)
    assert obs.startswith("\n\n<information>[HINT]You have 2 turns left.[/HINT]\n\nDoc 1(Title: Paris) Paris is")
    assert words(obs) <= 12 and obs.endswith(" …</information>\n\n")
    assert QAEpisode.from_example(ex, None, render=lambda m: "<user>" + m[0]["content"]).prompt.startswith("<user>")

    class Down:
        def search(self, queries, topk):
            raise RetrievalError("down")
    with pytest.raises(RetrievalError):
        QAEpisode("p", [["a"]], Down()).observe("q", 1)
    assert "down" in QAEpisode("p", [["a"]], Down()).error_observation("down", 1)
