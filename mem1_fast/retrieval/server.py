"""MEM1's retrieval server over a corpus: POST /retrieve (MEM1's contract), GET /health. FastAPI + uvicorn.

    python -m mem1_fast.retrieval.server --corpus corpus.jsonl [--host 127.0.0.1] [--port 8000]

The bm25s index is built once and saved beside the corpus (`<corpus>.bm25s/`, with the corpus' size and
modification time), then memory-mapped on later starts while the corpus still has that size and time. With
`--encoder DIR` retrieval is dense instead (dense.py: a local sentence-transformers encoder, faiss, exact cosine;
the index in `<corpus>.dense/`, stamped with the encoder's files too). Requests are bounded (queries per request, topk, body bytes) and malformed ones
get a 4xx naming the problem. Loopback by default: the server has no authentication.

    POST /retrieve {"queries": ["..."], "topk": 3, "return_scores": true}
      -> {"result": [[{"document": {"id", "contents"}, "score"}, ...] per query]}   (documents alone without scores)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .bm25 import BM25Retriever
from .corpus import load_corpus

MAX_QUERIES = 256  # per request
MAX_TOPK = 100
MAX_QUERY_CHARS = 2000
MAX_BODY_BYTES = 1 << 20


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    queries: list[str] = Field(min_length=1, max_length=MAX_QUERIES)
    topk: int = Field(default=3, ge=1, le=MAX_TOPK)
    return_scores: bool = True

    @field_validator("queries")
    @classmethod
    def _queries(cls, qs: list[str]) -> list[str]:
        for i, q in enumerate(qs):
            if not q.strip():
                raise ValueError(f"query {i} is empty")
            if len(q) > MAX_QUERY_CHARS:
                raise ValueError(f"query {i} has {len(q)} characters (at most {MAX_QUERY_CHARS})")
        return qs


def _corpus_stamp(corpus: Path) -> dict:
    st = corpus.stat()
    return {"corpus_bytes": st.st_size, "corpus_mtime_ns": st.st_mtime_ns}


def open_index(corpus: Path, rebuild: bool = False, encoder_dir: str | Path | None = None):
    """The corpus' index: BM25 (`<corpus>.bm25s/`), or dense with the encoder in `encoder_dir` (`<corpus>.dense/`).
    Loaded (memory-mapped) when it was built from the corpus (and encoder) as they are now, by size and modification
    time; else built and saved there."""
    docs = load_corpus(corpus)
    if not docs:
        raise ValueError(f"{corpus}: no documents")
    current = _corpus_stamp(corpus)
    if encoder_dir is None:
        kind, build, load = "bm25s", lambda: BM25Retriever(docs), lambda d: BM25Retriever.load(d, docs, mmap=True)
    else:
        from .dense import DenseRetriever, encoder_stamp, load_encoder
        encoder = load_encoder(encoder_dir)
        kind, build, load = "dense", lambda: DenseRetriever(docs, encoder), lambda d: DenseRetriever.load(d, docs, encoder)
        current["encoder"] = encoder_stamp(encoder_dir)
    index_dir = corpus.with_name(f"{corpus.name}.{kind}")
    stamp = index_dir / "corpus_stamp.json"
    if not rebuild and stamp.is_file() and json.loads(stamp.read_text()) == current:
        try:
            return load(index_dir)
        except (ValueError, OSError, RuntimeError) as e:  # faiss reports a bad file as RuntimeError
            print(f"retrieval server: rebuilding the index ({e})", file=sys.stderr)
    retriever = build()
    retriever.save(index_dir)
    stamp.write_text(json.dumps(current))
    return retriever


def create_app(retriever) -> FastAPI:
    app = FastAPI(title="mem1_fast retrieval", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def bound_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if request.method == "POST" and size is None:  # a chunked body would get past the bound below
            return JSONResponse({"detail": "a Content-Length header is required"}, status_code=411)
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
            return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
        return await call_next(request)

    @app.get("/health")
    def health():
        return {"status": "ok", "documents": len(retriever.docs), "index": type(retriever).__name__}

    @app.post("/retrieve")
    def retrieve(req: RetrieveRequest):  # sync: FastAPI runs it in its thread pool, bm25s scoring is numpy
        hits = retriever.search(req.queries, req.topk)
        if req.return_scores:
            return {"result": [[{"document": {"id": d.id, "contents": d.contents}, "score": s} for d, s in h]
                               for h in hits]}
        return {"result": [[{"id": d.id, "contents": d.contents} for d, _ in h] for h in hits]}

    return app


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mem1_fast.retrieval.server", description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="MEM1 JSONL corpus ({'id', 'contents'} per line)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; there is no auth)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--encoder", default=None, metavar="DIR",
                   help="dense retrieval with the sentence-transformers encoder saved in DIR (faiss, exact cosine; "
                        "needs mem1_fast[dense]); BM25 when absent")
    p.add_argument("--rebuild-index", action="store_true",
                   help="rebuild <corpus>.bm25s/ (or .dense/) even if it is current")
    args = p.parse_args(argv)
    corpus = Path(args.corpus)
    if not corpus.is_file():
        p.exit(2, f"{p.prog}: error: --corpus: {args.corpus!r} is not a file\n")
    try:
        retriever = open_index(corpus, args.rebuild_index, args.encoder)
    except ImportError as e:  # --encoder without the dense extra
        p.exit(2, f"{p.prog}: error: --encoder: {' '.join(str(e).split())}\n")
    except (ValueError, UnicodeDecodeError, OSError) as e:  # unreadable corpus or encoder, read-only index folder
        where = "--encoder" if args.encoder and "encoder" in str(e) else "--corpus"
        p.exit(2, f"{p.prog}: error: {where}: {' '.join(str(e).split())}\n")
    import uvicorn
    print(f"retrieval server: {len(retriever.docs)} documents, http://{args.host}:{args.port}/retrieve", flush=True)
    uvicorn.run(create_app(retriever), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
