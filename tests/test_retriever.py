import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, settings, strategies as st

from mem1_fast.retrieval import BM25Retriever, Doc, HttpRetriever, RetrievalError, docs_from_dicts, load_corpus


def test_doc_title_and_text():
    d = Doc("0", '"Evan Morris"\nEvan Morris Evan L. Morris (January 26, 1977 – ...')
    assert d.title == "Evan Morris"
    assert d.text.startswith("Evan Morris Evan L.")
    assert Doc("1", "No quotes").title == "No quotes" and Doc("1", "No quotes").text == ""
    assert Doc("2", '"A"\nline1\nline2').text == "line1\nline2"


def test_load_corpus(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"id": "0", "contents": "\\"T0\\"\\nalpha"}\n\n{"id": 1, "contents": "\\"T1\\"\\nbeta"}\n')
    docs = load_corpus(p)
    assert [(d.id, d.title, d.text) for d in docs] == [("0", "T0", "alpha"), ("1", "T1", "beta")]


def test_load_corpus_missing_contents_names_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"id": "0", "contents": "\\"T\\"\\nx"}\n{"id": "1", "text": "no contents"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: missing 'contents'"):
        load_corpus(p)


def test_load_corpus_bad_json_names_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"id": "0", "contents": "x"}\n{"id": "1", "contents": \n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: invalid JSON"):
        load_corpus(p)


def test_docs_from_dicts():
    assert docs_from_dicts([{"id": 3, "contents": '"a"\nb'}]) == [Doc("3", '"a"\nb')]
    with pytest.raises(ValueError, match="document 1: missing 'contents'"):
        docs_from_dicts([{"contents": "x"}, {"id": "1"}])


def _corpus():
    return [Doc(str(i), f'"Doc {i}"\ncommon words about the river and the town number {i}') for i in range(20)]


def test_bm25_rare_word_first():
    docs = _corpus()
    docs[13] = Doc("13", '"Doc 13"\ncommon words about the river and the zanzibar town')
    [hits] = BM25Retriever(docs).search(["town near zanzibar river"], topk=3)
    assert hits[0][0].id == "13"
    assert len(hits) == 3 and hits[0][1] > hits[1][1] >= hits[2][1] > 0


@settings(max_examples=25, deadline=None)
@given(target=st.integers(0, 19), rare=st.sampled_from(["quokka", "zephyrine", "ostrakon"]), k=st.integers(1, 5))
def test_bm25_rare_word_first_property(target, rare, k):
    docs = _corpus()
    docs[target] = Doc(docs[target].id, docs[target].contents + " " + rare)
    [hits] = BM25Retriever(docs).search([f"the river {rare}"], topk=k)
    assert hits[0][0] is docs[target] and len(hits) == k
    assert all(a[1] >= b[1] for a, b in zip(hits, hits[1:]))


def test_bm25_empty_and_unknown_queries():
    r = BM25Retriever(_corpus())
    assert r.search(["", "   ", "the of and", "unseenword", "river"], topk=2)[:4] == [[], [], [], []]
    assert r.search([], topk=2) == []
    with pytest.raises(TypeError):
        r.search("river", topk=2)
    with pytest.raises(ValueError, match="topk"):
        r.search(["river"], topk=0)
    with pytest.raises(ValueError, match="at least one document"):
        BM25Retriever([])


# ------------------------------------------------------------------------------------------------ HTTP, loopback

class _Handler(BaseHTTPRequestHandler):
    bodies = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.bodies.append((self.path, body))
        if self.path == "/slow":
            time.sleep(1.5)
        if self.path == "/flaky" and sum(p == "/flaky" for p, _ in _Handler.bodies) <= 2:  # 503 twice, then fine
            out, code = b"busy", 503
        elif self.path == "/400":
            out, code = b"bad request", 400
        elif self.path in ("/retrieve", "/flaky", "/slow"):
            result = [[{"document": {"id": str(i), "contents": f'"T{i}"\n{q} text'}, "score": 1.0 / (i + 1)}
                       for i in range(body["topk"])] for q in body["queries"]]
            out, code = json.dumps({"result": result}).encode(), 200
        elif self.path == "/500":
            out, code = b"internal boom", 500
        elif self.path == "/garbage":
            out, code = b"{not json", 200
        elif self.path == "/short":  # one result list fewer than queries
            out, code = json.dumps({"result": []}).encode(), 200
        else:  # /nocontents
            hits = [[{"document": {"id": "0"}, "score": 1}] for _ in body["queries"]]
            out, code = json.dumps({"result": hits}).encode(), 200
        self.send_response(code)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.handle_error = lambda *a: None  # the slow handler writes after the client gave up: expected here
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_http_contract(server):
    _Handler.bodies.clear()
    res = HttpRetriever(server + "/retrieve").search(["who", "", "what"], topk=2)
    assert _Handler.bodies == [("/retrieve", {"queries": ["who", "what"], "topk": 2, "return_scores": True})]
    assert res[1] == []
    assert [(d.id, d.title, d.text, s) for d, s in res[2]] == [("0", "T0", "what text", 1.0),
                                                                ("1", "T1", "what text", 0.5)]
    assert HttpRetriever(server + "/retrieve").search(["", ""], topk=1) == [[], []]
    assert len(_Handler.bodies) == 1  # nothing sent when every query is empty


@pytest.mark.parametrize("path,match", [("/500", "HTTP 500.*internal boom"), ("/garbage", "malformed body"),
                                        ("/short", "expected 1 result lists"), ("/nocontents", "missing 'contents'")])
def test_http_errors(server, path, match):
    with pytest.raises(RetrievalError, match=match):
        HttpRetriever(server + path).search(["q"], topk=1)


def test_http_unreachable():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t = time.perf_counter()
    with pytest.raises(RetrievalError, match="unreachable.*after 3 attempts"):
        HttpRetriever(f"http://127.0.0.1:{port}/retrieve", timeout=2, retries=2, backoff=0.05).search(["q"], topk=1)
    assert time.perf_counter() - t >= 0.05 + 0.1  # it backed off between the attempts


def test_http_retries_transient_errors_then_succeeds(server):
    _Handler.bodies.clear()
    res = HttpRetriever(server + "/flaky", retries=3, backoff=0.01).search(["q"], topk=1)
    assert [p for p, _ in _Handler.bodies] == ["/flaky"] * 3 and res[0][0][0].text == "q text"


def test_http_client_errors_are_not_retried(server):
    _Handler.bodies.clear()
    with pytest.raises(RetrievalError, match="HTTP 400.*bad request"):
        HttpRetriever(server + "/400", retries=3, backoff=0.01).search(["q"], topk=1)
    assert len(_Handler.bodies) == 1


def test_http_slower_than_the_timeout_is_an_error(server):
    with pytest.raises(RetrievalError, match="unreachable.*timed out.*after 2 attempts"):
        HttpRetriever(server + "/slow", timeout=0.3, retries=1, backoff=0.01).search(["q"], topk=1)


def test_http_batches_are_split_and_sent_concurrently_in_order(server):
    _Handler.bodies.clear()
    queries = [f"q{i}" for i in range(7)]
    res = HttpRetriever(server + "/retrieve", max_batch=3, workers=3).search(queries[:3] + [""] + queries[3:], topk=1)
    assert sorted(len(b["queries"]) for _, b in _Handler.bodies) == [1, 3, 3]
    t = time.perf_counter()  # three 1.5 s requests at once take one request's time, not three
    HttpRetriever(server + "/slow", max_batch=1, workers=3, timeout=10).search(["a", "b", "c"], topk=1)
    assert time.perf_counter() - t < 2 * 1.5
    assert [r[0][0].text if r else None for r in res] == [f"q{i} text" for i in range(3)] + [None] + \
        [f"q{i} text" for i in range(3, 7)]
