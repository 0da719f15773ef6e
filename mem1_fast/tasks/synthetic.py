"""Synthetic multi-hop QA: the default CPU task (docs/design.md §6).

Every episode draws a fresh world from a fixed pool of pseudo-word names: which name is a person, a city, a
company or a country, and every relation, is random per episode. Answers can therefore only come from the
retrieved documents; a tiny model trained on a fixed world memorized it instead (docs/design.md §6).

All text is whitespace-separated words from vocabulary() (tags and punctuation are words of their own), so a
word-level tokenizer covers it exactly. Documents use MEM1's corpus format ('"name"\\n sentences').

The task is built so that what the agent must do each turn does not depend on how many questions N there are
(the learnability probe's lesson: a tiny model trained on N <= 4 learns position patterns, not lookups, unless every
lookup has a fixed shape), which is what lets an agent trained on N <= 4 work at N = 8:
- every question is a fixed-length slot `<q> SUBJECT REL1 REL2` (REL2 '.' for one hop); the prompt lists them all;
- the agent answers each question with its own answer action as soon as it has it; the environment replies with
  the hint and the next question's slot, and ends the episode after the N-th answer. So the state never carries a
  list that grows with N, and the agent never has to find its place in a prompt longer than any it trained on.
  Two earlier designs failed at exactly those points (measured: README, "Why this shape"): one final answer with
  every found answer carried in the state (the tiny model did not copy lists longer than it had written), and the
  agent finding its next question in the prompt itself. Peak memory grows with N only by the prompt;
- the turn budget is the expert's turns (one per hop, one per answer) plus a slack; training draws the slack from a
  range, so no hint number is new at test time.

The scripted expert's state is a pointer:
    <think> next ENTITY REL [REL] </think> <search> ENTITY </search>     one turn per hop
    <think> found ANSWER </think> <answer> ANSWER </answer>               then the next question
`next` names the entity to look up and the relations still to follow: the one thing the agent must remember
across turns, since the question's slot is gone from its context after the first hop.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..retrieval import BM25Retriever, Doc
from .base import Score, compact_hint, register
from .qa import QAProtocol, score_predictions

TAGS = ("<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>")
MAX_TURNS = 64  # hint numbers 0..MAX_TURNS are vocabulary words

# One sentence per fact; a document is the sentences of its subject. Relation names are words of the sentence.
FACTS = {
    "born": "{s} was born in {o} .",  # person -> city
    "works": "{s} works for {o} .",  # person -> company
    "country": "{s} is a city in country {o} .",  # city -> country
    "based": "{s} is a company based in {o} .",  # company -> city
}
COUNTRY_DOC = "{s} is a country ."
KIND_RELS = {"person": ("born", "works"), "city": ("country",), "company": ("based",), "country": ()}
REL_TARGET = {"born": "city", "works": "company", "country": "country", "based": "city"}

# question type -> (subject kind, relation chain); a question is the slot '<q> SUBJECT REL1 REL2' (REL2 '.' for
# one hop): 'born country' asks for the country person X was born in
QUESTIONS = {
    "born": ("person", ("born",)),
    "works": ("person", ("works",)),
    "born_country": ("person", ("born", "country")),
    "works_based": ("person", ("works", "based")),
    "country": ("city", ("country",)),
    "based": ("company", ("based",)),
    "based_country": ("company", ("based", "country")),
}
SLOT = 4  # tokens per question slot
STATE_WORDS = ("found", "next", "<q>")
HINT_WORDS = ("[HINT]", "[/HINT]", "turns", "turn", "left", ",", "answer")


def _template_words() -> list[str]:
    texts = list(FACTS.values()) + [COUNTRY_DOC]
    return [w for t in texts for w in t.split() if not w.startswith("{")] + list(KIND_RELS)


def _make_names(n: int = 256, seed: int = 15841) -> tuple[str, ...]:
    # Consonant-vowel syllables: pronounceable, never an English template word or a bm25s stopword (all of
    # those contain a consonant cluster, h, w, y, or are shorter than 4 letters).
    rng, taken, names = random.Random(seed), set(_template_words()), []
    while len(names) < n:
        w = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.choice((2, 2, 3))))
        w += rng.choice("lnrs") if rng.random() < 0.3 else ""
        if w not in taken:
            taken.add(w)
            names.append(w)
    return tuple(names)


NAMES = _make_names()


def vocabulary() -> list[str]:
    """Every word this task (prompt, documents, observations, hints, expert) can produce, without duplicates."""
    words = [*TAGS, *STATE_WORDS, *HINT_WORDS, *_template_words(), *map(str, range(MAX_TURNS + 1)), *NAMES]
    return list(dict.fromkeys(words))


def question(subject: str, rels: tuple[str, ...]) -> str:
    return " ".join(["<q>", subject, *rels, *["."] * (SLOT - 2 - len(rels))])


def hint(turns_left: int) -> str:
    return compact_hint(turns_left, MAX_TURNS, "answer next")


def observation(results, turns_left: int, question: str = "") -> str:
    """'<information> [hint] doc texts </information>' (titles dropped: each text starts with its name); the reply
    to an answer holds the next question's slot instead of documents."""
    docs = [r[0] if isinstance(r, tuple) else r for r in results]
    parts = ["<information>", hint(turns_left), *[d.text for d in docs], question, "</information>"]
    return " ".join(p for p in parts if p)


@dataclass
class Episode(QAProtocol):
    prompt: str  # '<q> S1 R R <q> S2 R R ...'
    questions: list[str]
    targets: list[list[str]]  # one alias list per question
    docs: list[Doc]
    retriever: BM25Retriever
    plan: list[tuple[str, tuple[str, ...]]]  # (subject, relation chain) per question
    facts: dict[tuple[str, str], str]  # (entity, relation) -> entity
    max_turns: int
    topk: int

    @property
    def n(self) -> int:
        return len(self.questions)
    def observe(self, query: str, turns_left: int) -> str:
        return observation(self.retriever.search([query], self.topk)[0], turns_left)

    def reply(self, answers, turns_left: int) -> str | None:
        """One answer action per question: the hint and the next question until the N-th answer, then the end."""
        return None if len(answers) >= self.n else observation([], turns_left, self.questions[len(answers)])

    def score(self, answers) -> Score:
        """Answer action i against question i (an answer is one entity: no splitting on ';')."""
        return score_predictions([a.strip() for a in answers], self.targets)


class SyntheticTask:
    """The task protocol's generated task (tasks/base.py): a fresh random world per episode. N ~ uniform(n_range);
    max_turns = the expert's turns (hops + N) + slack, the slack drawn per episode from `slack` (an int, or an
    inclusive (lo, hi) range capped at MAX_TURNS - the expert's turns: training sees every hint number)."""

    def __init__(self, seed: int = 0, n_range: tuple[int, int] = (1, 2), n_persons: int = 16, n_cities: int = 8,
                 n_companies: int = 8, n_countries: int = 6, topk: int = 2, slack: int | tuple[int, int] = 2,
                 question_types: tuple[str, ...] = tuple(QUESTIONS)):
        lo, hi = n_range
        sizes = {"person": n_persons, "city": n_cities, "company": n_companies, "country": n_countries}
        if min(sizes.values()) < 1:
            raise ValueError(f"every entity kind needs at least one member, got {sizes}")
        if sum(sizes.values()) > len(NAMES):
            raise ValueError(f"world of {sum(sizes.values())} entities exceeds the name pool ({len(NAMES)})")
        unknown = set(question_types) - set(QUESTIONS)
        if unknown or not question_types:
            raise ValueError(f"unknown question types {sorted(unknown)}; known: {list(QUESTIONS)}")
        subjects = sum(sizes[k] for k in {QUESTIONS[t][0] for t in question_types})
        answers = sum(sizes[k] for k in {REL_TARGET[QUESTIONS[t][1][-1]] for t in question_types})
        if not 1 <= lo <= hi or hi > min(subjects, answers):
            raise ValueError(f"n_range {n_range} must satisfy 1 <= lo <= hi <= {min(subjects, answers)} (distinct "
                             "subjects and distinct answers)")
        slack_lo, slack_hi = (slack, slack) if isinstance(slack, int) else slack
        if 3 * hi + slack_lo > MAX_TURNS or not 1 <= slack_lo <= slack_hi:
            raise ValueError(f"slack {slack} at N = {hi}: up to 3N + slack turns, which must be in 3N+1..{MAX_TURNS}")
        self.rng, self.n_range, self.sizes = random.Random(seed), (lo, hi), sizes
        self.topk, self.slack, self.question_types = topk, (slack_lo, slack_hi), tuple(question_types)

    MAX_TURNS = MAX_TURNS
    PUNCTUATION = ""
    RECIPE = {}  # the trainer's global defaults were tuned on this task
    vocabulary = staticmethod(vocabulary)

    @staticmethod
    def expert_trajectory(episode, shortcut: float = 0.0, rng: random.Random | None = None):
        return expert_trajectory(episode, shortcut, rng)

    def sample(self, rng: random.Random | None = None, n: int | None = None) -> Episode:
        rng = rng or self.rng
        n = rng.randint(*self.n_range) if n is None else n
        for _ in range(100):  # distinct answers: redraw the world in the rare case the facts do not allow them
            ep = self._draw(rng, n)
            if ep is not None:
                return ep
        raise ValueError(f"could not draw {n} questions with distinct answers from a world of {self.sizes}")

    def _draw(self, rng: random.Random, n: int) -> Episode | None:
        names = rng.sample(NAMES, sum(self.sizes.values()))
        members, i = {}, 0
        for kind, size in self.sizes.items():
            members[kind], i = names[i:i + size], i + size
        facts = {(s, rel): rng.choice(members[REL_TARGET[rel]]) for kind in members
                 for s in members[kind] for rel in KIND_RELS[kind]}
        docs = []
        for kind, ents in members.items():
            for s in ents:
                text = " ".join(FACTS[r].format(s=s, o=facts[s, r]) for r in KIND_RELS[kind]) or COUNTRY_DOC.format(s=s)
                docs.append(f'"{s}"\n{text}')
        rng.shuffle(docs)  # corpus order breaks BM25 ties; keep it uninformative

        def answer(s, rels):
            for r in rels:
                s = facts[s, r]
            return s
        # subjects and answers all distinct (no answer is another question's subject): each names one question
        plan, used = [], set()
        for _ in range(n):
            options = [(s, QUESTIONS[t][1]) for t in self.question_types for s in members[QUESTIONS[t][0]]
                       if s not in used and answer(s, QUESTIONS[t][1]) not in used | {s}]
            if not options:
                return None
            s, rels = rng.choice(options)
            plan.append((s, rels))
            used |= {s, answer(s, rels)}
        questions = [question(s, rels) for s, rels in plan]
        docs = [Doc(str(j), c) for j, c in enumerate(docs)]
        turns = sum(len(rels) for _, rels in plan) + n  # the expert's: one per hop, one per answer
        slack = rng.randint(self.slack[0], max(self.slack[0], min(self.slack[1], MAX_TURNS - turns)))
        return Episode(" ".join(questions), questions, [[answer(s, r)] for s, r in plan], docs, BM25Retriever(docs),
                       plan, facts, max_turns=turns + slack, topk=self.topk)


def expert_generations(episode: Episode, shortcut: float = 0.0, rng: random.Random | None = None) -> list[str]:
    """The expert's full generation per turn: one search per hop, then that question's answer. Uses the world's
    facts. With `shortcut` > 0 it is a hasty teacher: on each two-hop question, with that probability, it answers
    with the entity of the first hop (the bridge entity, a weaker model's classic multi-hop mistake)."""
    if shortcut and rng is None:
        raise ValueError("a hasty expert (shortcut > 0) needs an rng")
    gens = []
    for entity, rels in episode.plan:
        if len(rels) > 1 and shortcut and rng.random() < shortcut:
            rels = rels[:1]
        for i, rel in enumerate(rels):
            gens.append(f"<think> next {entity} {' '.join(rels[i:])} </think> <search> {entity} </search>")
            entity = episode.facts[entity, rel]
        gens.append(f"<think> found {entity} </think> <answer> {entity} </answer>")
    return gens


def expert_trajectory(episode: Episode, shortcut: float = 0.0, rng: random.Random | None = None
                      ) -> list[tuple[str, str]]:
    """(generation, observation) per turn, as the agent loop would produce them: search results from the episode's
    retriever, the environment's reply to each answer, MEM1's hint rule (turns_left = max_turns - turn - 1); the
    last answer gets ''. `shortcut`: see expert_generations."""
    gens = expert_generations(episode, shortcut, rng)
    if len(gens) > episode.max_turns:
        raise ValueError(f"expert needs {len(gens)} turns, episode allows {episode.max_turns}")
    out, answers = [], []
    for j, g in enumerate(gens):
        act, left = episode.parse_action(g), episode.max_turns - j - 1
        if act.kind == "search":
            out.append((g, episode.observe(act.content, left)))
        else:
            answers.append(act.content)
            out.append((g, episode.reply(answers, left) or ""))
    return out


register("synthetic", SyntheticTask)
