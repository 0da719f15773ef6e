"""The retrieval server on loopback: MEM1's contract, the same hits as in-process BM25, bounded and validated
requests, the saved memory-mapped index, and the CLI."""
import json
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import uvicorn

from mem1_fast.retrieval import BM25Retriever, HttpRetriever, RetrievalError, load_corpus
from mem1_fast.retrieval import server as srv

WORDS = "river bank money loan fish boat tree forest city road bridge tower music film book paper stone".split()


def write_corpus(path, n=200, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))
            f.write(json.dumps({"id": str(i), "contents": f'"Doc {i}"\n{text}'}) + "\n")
    return path


def start_in_thread(app):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, th, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")
    retriever = srv.open_index(corpus)
    server, th, url = start_in_thread(srv.create_app(retriever))
    yield url, corpus, retriever
    server.should_exit = True
    th.join(timeout=10)


def post(url, payload, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_contract_and_hits_equal_in_process_bm25(served):
    url, corpus, _ = served
    ref = BM25Retriever(load_corpus(corpus))  # built independently of the server's (saved, memory-mapped) index
    queries = ["river bank", "music film book", "stone tower bridge", "unknownword"]
    code, body = post(url + "/retrieve", {"queries": queries, "topk": 4, "return_scores": True})
    assert code == 200 and set(body) == {"result"} and len(body["result"]) == 4
    for hits, expected in zip(body["result"], ref.search(queries, 4)):
        assert all(set(h) == {"document", "score"} and set(h["document"]) == {"id", "contents"} for h in hits)
        assert [h["document"]["id"] for h in hits] == [d.id for d, _ in expected]
        np.testing.assert_allclose([h["score"] for h in hits], [s for _, s in expected], rtol=1e-6)
    assert body["result"][3] == []
    code, body = post(url + "/retrieve", {"queries": ["river"], "topk": 2, "return_scores": False})
    assert code == 200 and [set(d) for d in body["result"][0]] == [{"id", "contents"}] * 2
    via_client = HttpRetriever(url + "/retrieve").search(queries, 4)
    assert [[d.id for d, _ in h] for h in via_client] == [[d.id for d, _ in h] for h in ref.search(queries, 4)]


def test_health(served):
    url, _, retriever = served
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok", "documents": len(retriever.docs), "index": "BM25Retriever"}


@pytest.mark.parametrize("payload,code,words", [
    ({"queries": "river", "topk": 2}, 422, "queries"),            # wrong type
    ({"queries": ["river"], "topk": "2"}, 422, "topk"),           # no silent coercion
    ({"queries": ["river"], "topk": 0}, 422, "topk"),
    ({"queries": ["river"], "topk": srv.MAX_TOPK + 1}, 422, "topk"),
    ({"topk": 2}, 422, "queries"),                                # missing field
    ({"queries": [], "topk": 2}, 422, "queries"),
    ({"queries": ["river", "  "], "topk": 2}, 422, "query 1 is empty"),
    ({"queries": ["x"] * (srv.MAX_QUERIES + 1), "topk": 1}, 422, "queries"),
    ({"queries": ["river"], "topk": 2, "filters": {}}, 422, "filters"),
    ({"queries": ["a" * (srv.MAX_QUERY_CHARS + 1)]}, 422, "characters"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(served, payload, code, words):
    got, body = post(served[0] + "/retrieve", payload)
    assert got == code and words in json.dumps(body)


def test_oversize_and_unparsable_bodies(served):
    import http.client
    from urllib.parse import urlparse
    u = urlparse(served[0])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.putrequest("POST", "/retrieve")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(srv.MAX_BODY_BYTES + 1))
    conn.endheaders()
    conn.send(b'{"queries": ["')  # refused on the header alone: the body is never read
    r = conn.getresponse()
    assert r.status == 413 and "bytes" in json.loads(r.read())["detail"]
    conn.close()
    got, body = post(served[0] + "/retrieve", None, raw=b"{not json")
    assert got == 422 and "json" in json.dumps(body).lower()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)  # chunked: no Content-Length to bound
    conn.putrequest("POST", "/retrieve")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"5\r\n{}{}{\r\n0\r\n\r\n")
    r = conn.getresponse()
    assert r.status == 411 and "Content-Length" in json.loads(r.read())["detail"]
    conn.close()


def test_index_is_saved_then_memory_mapped(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", n=50, seed=3)
    first = srv.open_index(corpus)
    assert (tmp_path / "c.jsonl.bm25s" / "params.index.json").is_file()
    again = srv.open_index(corpus)
    assert isinstance(again.model.scores["data"], np.memmap)
    q = ["fish boat", "tree"]
    assert [[(d.id, s) for d, s in h] for h in again.search(q, 5)] == [[(d.id, s) for d, s in h]
                                                                       for h in first.search(q, 5)]
    write_corpus(corpus, n=50, seed=4)  # the same number of documents, other contents: rebuilt, not reused
    rebuilt = srv.open_index(corpus)
    assert not isinstance(rebuilt.model.scores["data"], np.memmap)
    assert [[(d.id, s) for d, s in h] for h in rebuilt.search(q, 5)] == \
        [[(d.id, s) for d, s in h] for h in BM25Retriever(load_corpus(corpus)).search(q, 5)]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_cli_serves_on_loopback_and_rejects_a_bad_corpus(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", n=30)
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "mem1_fast.retrieval.server", "--corpus", str(corpus), "--port",
                          str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    assert json.loads(r.read())["documents"] == 30
                break
            except (urllib.error.URLError, ConnectionError):
                assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else ""
                time.sleep(0.2)
        hits = HttpRetriever(f"http://127.0.0.1:{port}/retrieve").search(["river"], 2)
        assert len(hits[0]) == 2
    finally:
        p.terminate()
        p.wait(timeout=30)
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    r = subprocess.run([sys.executable, "-m", "mem1_fast.retrieval.server", "--corpus", str(tmp_path / "bad.jsonl")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--corpus" in r.stderr and "contents" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "mem1_fast.retrieval.server", "--corpus", str(corpus), "--port", "70000"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a port number" in r.stderr and len(r.stderr) < 400


def test_a_stopped_server_is_a_retrieval_error(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", n=10)
    server, th, url = start_in_thread(srv.create_app(srv.open_index(corpus)))
    assert HttpRetriever(url + "/retrieve").search(["river"], 1)
    server.should_exit = True
    th.join(timeout=10)
    with pytest.raises(RetrievalError, match="unreachable"):
        HttpRetriever(url + "/retrieve", timeout=1, retries=1, backoff=0.01).search(["river"], 1)
