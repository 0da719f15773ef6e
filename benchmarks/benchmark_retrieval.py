"""Retrieval: the HTTP server (mem1_fast.retrieval.server, loopback) against in-process BM25 on the same corpus and
queries. Bounded load: a fixed number of queries, a fixed number of client threads, and a time cap.

Corpus: 20,000 synthetic documents of 20-60 words over a 5,000-word vocabulary (Zipf-like word frequencies);
queries of 2-5 words drawn the same way. Variants: in-process `BM25Retriever.search` one query at a time (the
baseline: what the synthetic task does); the server with one query per request from 1 and from 8 client threads
(what rollouts of many episodes do); the server with 32 queries per request. Reported: queries/s, and p50/p99
latency of one request.
"""
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import record

N_DOCS, VOCAB, N_QUERIES, TIME_CAP_S = 20_000, 5_000, 2_000, 120


def make_corpus(path, seed=0):
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(VOCAB)])
    p = 1.0 / np.arange(1, VOCAB + 1)
    p /= p.sum()
    with open(path, "w") as f:
        for i in range(N_DOCS):
            text = " ".join(rng.choice(words, size=rng.integers(20, 61), p=p))
            f.write(json.dumps({"id": str(i), "contents": f'"Doc {i}"\n{text}'}) + "\n")
    qrng = random.Random(seed + 1)
    return [" ".join(rng.choice(words, size=qrng.randint(2, 5), p=p)) for _ in range(N_QUERIES)]


def run_load(call, batches, threads):
    """Each batch once (bounded by TIME_CAP_S); returns (queries/s, p50 ms, p99 ms, queries done)."""
    lat, done, t_end = [], [0], time.perf_counter() + TIME_CAP_S
    lock = threading.Lock()

    def one(batch):
        if time.perf_counter() > t_end:
            return
        t = time.perf_counter()
        call(batch)
        dt = time.perf_counter() - t
        with lock:
            lat.append(dt)
            done[0] += len(batch)

    t0 = time.perf_counter()
    if threads == 1:
        for b in batches:
            one(b)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, batches))
    wall = time.perf_counter() - t0
    return done[0] / wall, 1e3 * float(np.percentile(lat, 50)), 1e3 * float(np.percentile(lat, 99)), done[0]


def test_retrieval_server_vs_in_process(benchmark, tmp_path):
    from test_retrieval_server import start_in_thread

    from mem1_fast.retrieval import HttpRetriever
    from mem1_fast.retrieval import server as srv

    queries = make_corpus(tmp_path / "corpus.jsonl")
    retriever = srv.open_index(tmp_path / "corpus.jsonl")
    server, th, url = start_in_thread(srv.create_app(retriever))
    client = HttpRetriever(url + "/retrieve", max_batch=32)
    try:
        group = f"retrieval, {N_DOCS} docs, {N_QUERIES} queries, top-3"
        singles = [[q] for q in queries]
        variants = [("in-process BM25, 1 query/call", lambda b: retriever.search(b, 3), singles, 1, True),
                    ("server, 1 query/request, 1 thread", lambda b: client.search(b, 3), singles, 1, False),
                    ("server, 1 query/request, 8 threads", lambda b: client.search(b, 3), singles, 8, False),
                    ("server, 32 queries/request, 1 thread", lambda b: client.search(b, 3),
                     [queries[i:i + 32] for i in range(0, N_QUERIES, 32)], 1, False)]
        for name, call, batches, threads, base in variants:
            qps, p50, p99, n = run_load(call, batches, threads)
            record(group, name, 1.0 / qps, baseline=base, queries_per_s=round(qps), p50_ms=round(p50, 2),
                   p99_ms=round(p99, 2), queries=n)
        benchmark.pedantic(lambda: client.search(queries[:32], 3), rounds=3, iterations=1)
    finally:
        server.should_exit = True
        th.join(timeout=10)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
