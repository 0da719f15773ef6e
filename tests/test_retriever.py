import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, settings, strategies as st

from mem1_fast.retriever import BM25Retriever, Doc, HttpRetriever, RetrievalError, docs_from_dicts, load_corpus


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
        if self.path == "/retrieve":
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
    with pytest.raises(RetrievalError, match="unreachable"):
        HttpRetriever(f"http://127.0.0.1:{port}/retrieve", timeout=2).search(["q"], topk=1)
