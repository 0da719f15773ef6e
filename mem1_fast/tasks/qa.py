"""MEM1's multi-objective QA protocol on text: prompt, hint, action parsing, observations, scoring, parquet data.

Tokenizer-agnostic: everything here works on strings; the rollout keeps token ids itself (docs/design.md §2).
Semantics follow the MEM1 code (reference §1.2, §1.3, §1.5, §1.6, §3.8), minus the defects of reference §9.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from ..retrieval import Doc
from .base import Action, Reply, Score

# Paraphrase of gen_data/data_process/qa_search_train_merge_multi.py:44-58. Like the original it holds exactly
# two literal <answer>...</answer> examples; our scorer does not depend on that (MEM1 defect 10).
MEM1_TEMPLATE = """You will answer multiple complex questions using iterative reasoning, summarization, and web search.

At each step you see the questions, your previous summary, and the information returned by your last search. Then:

1. Update a cumulative, concise summary inside <think> ... </think>. It is your persistent memory: include all \
essential information from the previous <think> and <information> tags, because older context is discarded.

2. Then do exactly one of the following:
   - If you need more information, write one search query for one question inside <search> ... </search>.
   - If you have enough information, give the final answers to all questions, in order and separated by \
semicolons, within <answer> answer1; answer2; ... </answer>.

Important: always reply as <think> ... </think><search> ... </search> or <think> ... </think><answer> ... </answer>. \
Do not search for several questions in one query.

Answer the following questions: {questions}
"""


def mem1_prompt(questions: list[str]) -> str:
    """MEM1's user message: questions get a '?' when missing and are joined with '; '."""
    if isinstance(questions, str) or not questions:
        raise ValueError("mem1_prompt needs a non-empty list of questions")
    qs = [q.strip() if q.strip().endswith("?") else q.strip() + "?" for q in questions]
    return MEM1_TEMPLATE.format(questions="; ".join(qs))


def hint(turns_left: int) -> str:
    """MEM1's training hint; turns_left = max_turns - turn - 1, '' after the last turn."""
    if turns_left < 0:
        raise ValueError(f"turns_left must be >= 0, got {turns_left}")
    if turns_left == 0:
        return ""
    if turns_left == 1:
        return "[HINT]You have 1 turn left. You must answer the question in the next turn.[/HINT]"
    return f"[HINT]You have {turns_left} turns left.[/HINT]"


# ---------------------------------------------------------------------------------------------------- actions

_OPEN = re.compile(r"<(search|answer)>")


def parse_action(text: str) -> Action:
    """One turn's generation -> Action. Never raises: malformed model output is data (kind None + error).

    Exactly one <search>...</search> or <answer>...</answer> must follow the optional <think>...</think>.
    Text around the tags is tolerated (MEM1's regex does the same); tags inside the think are not actions.
    """
    think, rest = "", text
    if "</think>" in text:
        head, rest = text.split("</think>", 1)
        think = head.split("<think>", 1)[-1].strip()
    elif "<think>" in text:
        return Action(None, "", "unclosed <think>: no </think> in the generation")
    opens = list(_OPEN.finditer(rest))
    if not opens:
        closes = re.findall(r"</(search|answer)>", rest)
        msg = f"</{closes[0]}> without <{closes[0]}>" if closes else "no <search> or <answer> tag"
        return Action(None, "", msg, think)
    if len(opens) > 1:
        kinds = ", ".join(f"<{m.group(1)}>" for m in opens)
        return Action(None, "", f"{len(opens)} actions ({kinds}); exactly one is allowed", think)
    kind = opens[0].group(1)
    end = rest.find(f"</{kind}>", opens[0].end())
    if end < 0:
        return Action(None, "", f"unclosed <{kind}>: no </{kind}>", think)
    return Action(kind, rest[opens[0].end():end].strip(), None, think)


# ---------------------------------------------------------------------------------------------- observations

def _as_docs(docs) -> list[Doc]:
    return [d[0] if isinstance(d, tuple) else d for d in docs]


def _frame(hint_text: str, body: str) -> str:
    return f"\n\n<information>{hint_text}\n\n{body}</information>\n\n"  # MEM1's observation frame


def format_observation(docs, hint: str, budget: int | None = None,
                       count_tokens: Callable[[str], int] | None = None) -> str:
    """MEM1's observation: '\\n\\n<information>{hint}\\n\\n{docs}</information>\\n\\n', docs as
    'Doc {k}(Title: {title}) {text}' lines. With a token budget the document text (never the tags or the hint)
    is cut at a word boundary, and ' …' marks the cut; the result always has count_tokens(obs) <= budget.
    MEM1 instead hard-truncated token ids, dropping </information> (reference §1.3 step 14)."""
    body = "".join(f"Doc {k}(Title: {d.title}) {d.text}\n" for k, d in enumerate(_as_docs(docs), 1)).strip()
    obs = _frame(hint, body)
    if budget is None:
        return obs
    if count_tokens is None:
        raise ValueError("format_observation: a budget needs count_tokens (the tokenizer's length function)")
    if count_tokens(obs) <= budget:
        return obs
    words = re.findall(r"\S+\s*", body)

    def cut(m: int) -> str:
        return _frame(hint, "".join(words[:m]).rstrip() + (" …" if m else "…"))

    if count_tokens(cut(0)) > budget:
        raise ValueError(f"observation budget {budget} is smaller than the empty frame "
                         f"({count_tokens(cut(0))} tokens with hint {hint!r})")
    lo, hi = 0, len(words)  # cut(lo) fits; find the longest prefix that fits (binary search, counts ~monotone)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(cut(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return cut(lo)


def error_observation(hint: str, message: str) -> str:
    """Observation for a failed retrieval (MEM1 crashed instead, defect 15)."""
    return _frame(hint, f"Search failed: {message}")


# ---------------------------------------------------------------------------------------------------- scoring

_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation, drop articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _aliases(aliases) -> list[str]:
    aliases = [aliases] if isinstance(aliases, str) else list(aliases)
    if not aliases:
        raise ValueError("a target needs at least one alias")
    return [str(a) for a in aliases]


def exact_match(pred: str, aliases) -> bool:
    p = normalize_answer(pred)
    return any(p == normalize_answer(a) for a in _aliases(aliases))


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def f1(pred: str, aliases) -> float:
    """SQuAD token F1 (bag of tokens), max over aliases."""
    return max(_f1(pred, a) for a in _aliases(aliases))


def score_answers(answer_content: str, targets: list[list[str]]) -> Score:
    """Positional scoring of '<answer>' content 'a1; a2; ...' against one alias list per objective."""
    if not targets:
        raise ValueError("score_answers needs at least one target")
    preds = [p.strip() for p in answer_content.split(";")] if answer_content.strip() else []
    return score_predictions(preds, targets)


def score_predictions(preds: list[str], targets: list[list[str]]) -> Score:
    """Prediction i against target i (alias list); extra predictions are ignored, missing ones score 0. The reward
    is the EM summed over objectives (MEM1's); metrics: em and f1, summed."""
    ems = [float(exact_match(preds[i], t)) if i < len(preds) else 0.0 for i, t in enumerate(targets)]
    f1s = [f1(preds[i], t) if i < len(preds) else 0.0 for i, t in enumerate(targets)]
    return Score(sum(ems), ems, {"em": sum(ems), "f1": sum(f1s)})


# ------------------------------------------------------------------------------------------------ MEM1 data

@dataclass
class QAExample:
    prompt: str | list[dict]  # MEM1 rows hold [{"role": "user", "content": ...}]
    targets: list[list[str]]  # one alias list per objective
    data_source: str = ""
    extra_info: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The user message text."""
        if isinstance(self.prompt, str):
            return self.prompt
        return [m["content"] for m in self.prompt if m.get("role") == "user"][-1]


def _tolist(x):
    return x.tolist() if hasattr(x, "tolist") else x  # numpy arrays (pandas/pyarrow) -> lists


def _targets(raw, where: str) -> list[list[str]]:
    raw = _tolist(raw)
    if isinstance(raw, str) or not isinstance(raw, (list, tuple)) or not raw:
        raise ValueError(f"{where}: reward_model.ground_truth.target must be a non-empty list, got {raw!r:.80}")
    raw = [_tolist(t) for t in raw]
    if all(isinstance(t, str) for t in raw):  # Search-R1 single-objective rows: one flat alias list
        return [list(raw)]
    out = []
    for i, t in enumerate(raw):
        if isinstance(t, str) or not isinstance(t, (list, tuple)) or not t or not all(isinstance(a, str) for a in t):
            raise ValueError(f"{where}: target {i} must be a non-empty list of strings, got {t!r:.80}")
        out.append(list(t))
    return out


def examples_from_rows(rows, where: str = "rows") -> list[QAExample]:
    """MEM1 parquet rows (dicts) -> QAExample; bad rows raise ValueError naming the row."""
    out = []
    for i, row in enumerate(rows):
        w = f"{where} row {i}"
        try:
            target = row["reward_model"]["ground_truth"]["target"]
        except (KeyError, TypeError):
            raise ValueError(f"{w}: no reward_model.ground_truth.target") from None
        prompt = _tolist(row["prompt"])
        if not isinstance(prompt, str):
            if not isinstance(prompt, list) or not all(isinstance(m, dict) and "content" in m for m in prompt):
                raise ValueError(f"{w}: prompt must be a string or a list of {{role, content}} messages")
            if not any(m.get("role") == "user" for m in prompt):
                raise ValueError(f"{w}: prompt has no message with role 'user'")
            prompt = [dict(m) for m in prompt]
        extra = row.get("extra_info") or {}
        extra = {k: _tolist(v) for k, v in dict(extra).items()}
        out.append(QAExample(prompt, _targets(target, w), str(row.get("data_source", "")), extra))
    return out


REQUIRED_COLUMNS = ("prompt", "reward_model", "data_source")


def load_mem1_parquet(path) -> list[QAExample]:
    """Read a MEM1 parquet (gen_data/data_process/qa_search_*_merge_multi.py output)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise KeyError(f"{path}: missing column(s) {missing}; has {table.column_names}")
    return examples_from_rows(table.to_pylist(), str(path))


class QAProtocol:
    """The task-protocol methods (tasks/base.py) every QA-shaped episode shares: MEM1's action tags, one answer
    action that ends the episode, positional multi-objective scoring against `self.targets`, MEM1's failure
    observation. An episode provides `observe(query, turns_left)` (the reply to a search); one that takes more than
    one answer overrides `reply`."""

    parse_action = staticmethod(parse_action)

    @property
    def n_objectives(self) -> int:
        return len(self.targets)

    def start(self) -> "QASession":
        return QASession(self)

    def reply(self, answers, turns_left: int) -> str | None:
        """The reply to an answer action (`answers`: every answer so far, the latest last): an observation when
        the episode takes more answers, None when it is over. MEM1: the first answer is final."""
        return None

    def score(self, answers) -> Score:
        return score_answers("; ".join(answers), self.targets)

    def error_observation(self, message: str, turns_left: int) -> str:
        return error_observation(hint(turns_left), message)


class QASession:
    """One rollout of a QA episode: the answers given so far."""

    def __init__(self, episode: QAProtocol):
        self.episode, self.answers = episode, []

    def step(self, action: Action, turns_left: int) -> Reply:
        if action.kind == "answer":
            self.answers.append(action.content)
            text = self.episode.reply(self.answers, turns_left)
            if text is None:
                return Reply(None, done=True, finish="answer")
            if turns_left == 0:
                return Reply(None, finish=f"turn budget spent after {len(self.answers)} answers")
            return Reply(text)
        if turns_left == 0:  # its result could never be read: not executed
            return Reply(None, finish="search on the last turn")
        return Reply(self.episode.observe(action.content, turns_left))

    def error_observation(self, message: str, turns_left: int) -> str:
        return self.episode.error_observation(message, turns_left)

    def score(self) -> Score:
        return self.episode.score(self.answers)


@dataclass
class QAEpisode(QAProtocol):
    """One QA example bound to a retriever: the interface the agent loop uses (prompt, targets, max_turns,
    observe, error_observation). `prompt` is the text the policy sees first (apply the chat template before)."""
    prompt: str
    targets: list[list[str]]
    retriever: object  # anything with search(queries, topk) (BM25Retriever, HttpRetriever)
    topk: int = 3  # MEM1 default
    max_turns: int = 6
    obs_budget: int | None = None  # tokens per observation (MEM1: max_obs_length)
    count_tokens: Callable[[str], int] | None = None
    data_source: str = ""  # the parquet row's, for per-source scores

    @classmethod
    def from_example(cls, ex: QAExample, retriever, render: Callable[[list[dict]], str] | None = None, **kw):
        """render: messages -> prompt text (e.g. a chat template); default: the user message text."""
        msgs = [{"role": "user", "content": ex.prompt}] if isinstance(ex.prompt, str) else ex.prompt
        return cls(render(msgs) if render else ex.text, ex.targets, retriever, data_source=ex.data_source, **kw)

    def observe(self, query: str, turns_left: int) -> str:
        # RetrievalError propagates: the agent loop turns it into error_observation (MEM1 defect 15)
        hits = self.retriever.search([query], self.topk)[0]
        return format_observation(hits, hint(turns_left), self.obs_budget, self.count_tokens)
