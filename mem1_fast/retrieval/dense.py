"""In-process dense retrieval: a sentence-transformers encoder from a local directory, exact cosine search with faiss.

Optional (`pip install 'mem1_fast[dense]'`: faiss-cpu, sentence-transformers). The encoder is read from a local
directory only (`local_files_only`: nothing is downloaded), e.g. a saved e5 or bge model, or any transformers
encoder directory (sentence-transformers then mean-pools it). Documents are embedded once as "title\ntext"
(MEM1's `contents`), L2-normalized, and searched exactly (`IndexFlatIP`: inner product of unit vectors = cosine);
the index can be saved and memory-mapped on reload like the BM25 one.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .corpus import Doc


def _deps():
    try:
        import faiss
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError(f"dense retrieval needs faiss and sentence-transformers ({e}): "
                          f"pip install 'mem1_fast[dense]'") from None
    return faiss, SentenceTransformer


def load_encoder(encoder_dir: str | Path, device: str = "cpu"):
    """The sentence-transformers encoder saved in `encoder_dir` (never fetched from the Hub)."""
    _, SentenceTransformer = _deps()
    path = Path(encoder_dir)
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise ValueError(f"{encoder_dir!r} is not an encoder directory (no config.json or modules.json)")
    return SentenceTransformer(str(path), device=device, local_files_only=True)


def encoder_stamp(encoder_dir: str | Path) -> dict:
    """What an index depends on besides the corpus: every file of the encoder directory, by size and mtime."""
    root = Path(encoder_dir).resolve()
    return {str(p.relative_to(root)): [p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(root.rglob("*")) if p.is_file()}


class DenseRetriever:
    """Exact cosine top-k over the corpus' embeddings, best first; equal scores in corpus order."""

    def __init__(self, docs: list[Doc], encoder, index=None, batch_size: int = 64):
        self._faiss, _ = _deps()
        if not docs:
            raise ValueError("DenseRetriever needs at least one document")
        self.docs, self.encoder, self.batch_size = list(docs), encoder, batch_size
        if index is None:
            emb = self._encode([d.contents for d in self.docs])
            index = self._faiss.IndexFlatIP(emb.shape[1])
            index.add(emb)
        self.index = index

    def _encode(self, texts: list[str]) -> np.ndarray:
        emb = self.encoder.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                  convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(emb, dtype=np.float32)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._faiss.write_index(self.index, str(directory / "index.faiss"))
        (directory / "params.json").write_text(json.dumps({"num_docs": len(self.docs), "dim": self.index.d}))

    @classmethod
    def load(cls, directory: str | Path, docs: list[Doc], encoder, mmap: bool = True):
        faiss, _ = _deps()
        directory = Path(directory)
        index = faiss.read_index(str(directory / "index.faiss"), faiss.IO_FLAG_MMAP if mmap else 0)
        if index.ntotal != len(docs):
            raise ValueError(f"index at {directory} covers {index.ntotal} documents, the corpus has {len(docs)}")
        dim = encoder.get_embedding_dimension()
        if dim is not None and index.d != dim:
            raise ValueError(f"index at {directory} has dimension {index.d}, the encoder gives {dim}")
        return cls(docs, encoder, index=index)

    def search(self, queries: list[str], topk: int) -> list[list[tuple[Doc, float]]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries, not a single string")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        queries = list(queries)
        out: list[list[tuple[Doc, float]]] = [[] for _ in queries]
        live = [k for k, q in enumerate(queries) if q.strip()]  # an empty query has no meaning to embed
        if not live:
            return out
        scores, ids = self.index.search(self._encode([queries[k] for k in live]), min(topk, len(self.docs)))
        for k, row_s, row_i in zip(live, scores, ids):
            hits = sorted((-float(s), int(i)) for s, i in zip(row_s, row_i) if i >= 0)  # faiss' heap mixes ties
            out[k] = [(self.docs[i], -s) for s, i in hits]
        return out
