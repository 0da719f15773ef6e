"""MEM1's corpus format: documents, JSONL corpora, and the error every retriever raises when it cannot answer.

Corpus line (MEM1 / Search-R1): {"id": "0", "contents": "\"Title\"\ntext"}.
"""
from __future__ import annotations

import json
from dataclasses import dataclass


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
