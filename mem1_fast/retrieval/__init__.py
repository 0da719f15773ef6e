"""Document retrieval for the search agent: MEM1's corpus format (corpus.py), in-process BM25 (bm25.py), and MEM1's
HTTP contract, client (client.py) and server (server.py). Every retriever has
`search(queries, topk) -> one list of (Doc, score) per query, best first`."""
from .bm25 import BM25Retriever
from .client import HttpRetriever
from .corpus import Doc, RetrievalError, docs_from_dicts, load_corpus

__all__ = ["BM25Retriever", "Doc", "HttpRetriever", "RetrievalError", "docs_from_dicts", "load_corpus"]
