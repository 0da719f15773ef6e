"""Dense retrieval (faiss + a local sentence-transformers encoder): hits equal a plain-transformers reference
(mean pooling, cosine, numpy top-k), the index is saved and memory-mapped, rebuilt when the encoder changes, and
served through MEM1's contract; the CLI refuses a missing encoder with one line."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")
pytest.importorskip("sentence_transformers")

from mem1_fast.retrieval import HttpRetriever, load_corpus  # noqa: E402
from mem1_fast.retrieval import server as srv  # noqa: E402
from mem1_fast.retrieval.dense import DenseRetriever, load_encoder  # noqa: E402
from test_retrieval_server import WORDS, start_in_thread, write_corpus  # noqa: E402

QUERIES = ["river bank money", "fish boat", "tower", "music film book paper", "stone bridge road city"]


def tiny_encoder(path, seed=0):
    """A random 2-layer BERT and a WordPiece vocabulary of the corpus' words, saved as a transformers directory
    (sentence-transformers mean-pools such a directory)."""
    from transformers import BertConfig, BertModel, BertTokenizer
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", '"', "doc"] + [str(i) for i in range(300)] + WORDS
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    assert tok.tokenize("fish boat") == ["fish", "boat"]  # a real vocabulary, not [UNK] everywhere
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).eval().save_pretrained(path)
    return path


def reference_hits(encoder_dir, docs, queries, topk):
    """Cosine top-k from plain transformers: mean of the last hidden states over real tokens, normalized."""
    from transformers import AutoModel, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(encoder_dir), AutoModel.from_pretrained(encoder_dir).eval()

    def embed(texts):
        enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state.double()
        m = enc["attention_mask"][..., None].double()
        e = (h * m).sum(1) / m.sum(1)
        return (e / e.norm(dim=1, keepdim=True)).numpy()

    scores = embed(queries) @ embed([d.contents for d in docs]).T
    return [[(docs[i].id, float(row[i])) for i in np.argsort(-row, kind="stable")[:topk]] for row in scores]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return write_corpus(root / "corpus.jsonl", n=120, seed=5), tiny_encoder(root / "encoder")


def ids_scores(hits):
    return [[(d.id, s) for d, s in h] for h in hits]


def test_hits_equal_the_plain_transformers_reference(setup):
    corpus, enc = setup
    docs = load_corpus(corpus)
    got = ids_scores(DenseRetriever(docs, load_encoder(enc)).search(QUERIES, 5))
    ref = reference_hits(enc, docs, QUERIES, 5)
    for g, r in zip(got, ref):
        np.testing.assert_allclose([s for _, s in g], [s for _, s in r], atol=1e-5)
        assert [i for i, _ in g] == [i for i, _ in r]
    # negative control: another encoder (other random weights) ranks differently, so the comparison can fail
    other = reference_hits(tiny_encoder(corpus.parent / "other", seed=1), docs, QUERIES, 5)
    assert [[i for i, _ in h] for h in other] != [[i for i, _ in h] for h in got]


def test_a_document_finds_itself_and_empty_queries_get_nothing(setup):
    corpus, enc = setup
    docs = load_corpus(corpus)
    r = DenseRetriever(docs, load_encoder(enc))
    hits = r.search([docs[7].contents, "  ", docs[42].contents], 3)
    assert hits[0][0][0].id == "7" and hits[0][0][1] == pytest.approx(1.0, abs=1e-5)
    assert hits[1] == [] and hits[2][0][0].id == "42"
    assert len(r.search(["river"], 500)[0]) == len(docs)  # topk above the corpus size: every document, once
    with pytest.raises(TypeError):
        r.search("river", 3)


def test_index_is_saved_memory_mapped_and_rebuilt_when_the_encoder_changes(setup, tmp_path):
    corpus, enc = setup
    corpus = write_corpus(tmp_path / "c.jsonl", n=40, seed=6)
    first = srv.open_index(corpus, encoder_dir=enc)
    index_file = tmp_path / "c.jsonl.dense" / "index.faiss"
    assert index_file.is_file()
    built_at = index_file.stat().st_mtime_ns
    again = srv.open_index(corpus, encoder_dir=enc)
    assert index_file.stat().st_mtime_ns == built_at  # loaded, not rebuilt
    assert ids_scores(again.search(QUERIES, 4)) == ids_scores(first.search(QUERIES, 4))
    enc2 = tiny_encoder(tmp_path / "enc2", seed=2)
    changed = srv.open_index(corpus, encoder_dir=enc2)
    assert ids_scores(changed.search(QUERIES, 4)) == ids_scores(
        DenseRetriever(load_corpus(corpus), load_encoder(enc2)).search(QUERIES, 4))
    assert ids_scores(changed.search(QUERIES, 4)) != ids_scores(first.search(QUERIES, 4))


def test_served_through_the_contract(setup):
    corpus, enc = setup
    retriever = srv.open_index(corpus, encoder_dir=enc)
    server, th, url = start_in_thread(srv.create_app(retriever))
    try:
        got = HttpRetriever(url + "/retrieve").search(QUERIES, 3)
    finally:
        server.should_exit = True
        th.join(timeout=10)
    want = retriever.search(QUERIES, 3)
    assert [[d.id for d, _ in h] for h in got] == [[d.id for d, _ in h] for h in want]
    np.testing.assert_allclose([s for h in got for _, s in h], [s for h in want for _, s in h], atol=1e-6)


def test_cli_refuses_a_missing_encoder(setup, tmp_path):
    corpus, _ = setup
    r = subprocess.run([sys.executable, "-m", "mem1_fast.retrieval.server", "--corpus", str(corpus), "--encoder",
                        str(tmp_path / "nope")], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 2 and "--encoder" in r.stderr and "not an encoder directory" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
