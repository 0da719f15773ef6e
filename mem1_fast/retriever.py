"""Document retrieval for the search agent: MEM1's corpus format, in-process BM25, and MEM1's HTTP contract.

Corpus line (MEM1 / Search-R1): {"id": "0", "contents": "\"Title\"\ntext"}.
HTTP: POST {url} {"queries": [...], "topk": k, "return_scores": true}
      -> {"result": [[{"document": {"id", "contents"}, "score"}, ...] per query]}.
Every retriever has search(queries, topk) -> one list of (Doc, score) per query, best first.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Doc:
    id: str
    contents: str  # '"Title"\ntext', as in MEM1's corpus

    @property
    def title(self) -> str:
        first = self.contents.split("\n", 1)[0].strip()
        if len(first) >= 2 and first[0] == first[-1] == '"':
            first = first[1:-1]
        return first

    @property
    def text(self) -> str:
        parts = self.contents.split("\n", 1)
        return parts[1] if len(parts) == 2 else ""


class RetrievalError(RuntimeError):
    """The retriever could not answer (network, HTTP status, bad body). The agent loop turns it into an observation."""


def _doc_from_dict(d, where: str) -> Doc:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object with 'contents', got {type(d).__name__}")
    if "contents" not in d:
        raise ValueError(f"{where}: missing 'contents' (keys: {sorted(d)})")
    if not isinstance(d["contents"], str):
        raise ValueError(f"{where}: 'contents' must be a string, got {type(d['contents']).__name__}")
    return Doc(id=str(d.get("id", "")), contents=d["contents"])


def docs_from_dicts(dicts) -> list[Doc]:
    return [_doc_from_dict(d, f"document {i}") for i, d in enumerate(dicts)]


def load_corpus(path) -> list[Doc]:
    """Read a MEM1 JSONL corpus. Blank lines are skipped; any other bad line raises ValueError naming file:line."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            docs.append(_doc_from_dict(d, where))
    return docs


class BM25Retriever:
    """In-process BM25 (bm25s, Lucene variant) over title + text, lowercase, English stopwords, no stemmer.

    Only documents sharing a term with the query are returned (score > 0), so a query with no known term gets [].
    Ties keep corpus order, so results are deterministic.
    """

    def __init__(self, docs: list[Doc], stopwords: str | list[str] | None = "en", k1: float = 1.5, b: float = 0.75):
        import bm25s  # imported here: ~0.4 s of scipy import that QA-only users should not pay

        if not docs:
            raise ValueError("BM25Retriever needs at least one document")
        self._bm25s, self.docs, self.stopwords = bm25s, list(docs), stopwords
        self.model = bm25s.BM25(k1=k1, b=b)
        self.model.index(self._tokenize([d.contents for d in self.docs]), show_progress=False)

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return self._bm25s.tokenize(texts, lower=True, stopwords=self.stopwords, return_ids=False, show_progress=False)

    def search(self, queries: list[str], topk: int) -> list[list[tuple[Doc, float]]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries, not a single string")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        out = []
        for toks in self._tokenize(list(queries)):
            if not toks:  # empty query, or only stopwords / 1-char tokens
                out.append([])
                continue
            scores = self.model.get_scores(toks)
            order = np.argsort(-scores, kind="stable")[:topk]
            out.append([(self.docs[i], float(scores[i])) for i in order if scores[i] > 0])
        return out


class HttpRetriever:
    """Client for MEM1's retrieval server (train/rollout/search/retrieval_server.py, POST /retrieve)."""

    def __init__(self, url: str, timeout: float = 30.0):
        self.url, self.timeout = url, timeout

    def search(self, queries: list[str], topk: int) -> list[list[tuple[Doc, float]]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries, not a single string")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        # Empty queries get [] locally (same as BM25Retriever); the server never sees them.
        sent = [q for q in queries if q.strip()]
        results = iter(self._post(sent, topk) if sent else [])
        return [next(results) if q.strip() else [] for q in queries]

    def _post(self, queries: list[str], topk: int) -> list[list[tuple[Doc, float]]]:
        body = json.dumps({"queries": queries, "topk": topk, "return_scores": True}).encode()
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode(errors="replace")
            raise RetrievalError(f"retriever at {self.url} returned HTTP {e.code}: {detail}") from e
        except (urllib.error.URLError, OSError) as e:  # refused, DNS, timeout
            raise RetrievalError(f"retriever at {self.url} unreachable: {e}") from e
        try:
            result = json.loads(raw)["result"]
            if not isinstance(result, list) or len(result) != len(queries):
                got = len(result) if isinstance(result, list) else type(result).__name__
                raise ValueError(f"expected {len(queries)} result lists, got {got}")
            return [[(_doc_from_dict(h["document"], "hit"), float(h["score"])) for h in hits] for hits in result]
        except (ValueError, KeyError, TypeError) as e:
            raise RetrievalError(f"retriever at {self.url} sent a malformed body "
                                 f"({type(e).__name__}: {e}): {raw[:200]!r}") from e
