"""Checkpoints reload the way users load them: the plain transformers API in a fresh process gives back the
tokenizer (same ids on task text, same special tokens) and the model (same logits) the trainer had; a resumed run
continues on the same tokenizer and weights."""
import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from mem1_fast import checkpoint, train
from mem1_fast.tasks.synthetic import SyntheticTask, expert_trajectory
from mem1_fast.tiny import bpe_tokenizer, default_vocabulary, tiny_model, tiny_model_and_tokenizer, word_tokenizer

# what a user does, and nothing from mem1_fast: a fresh interpreter, AutoTokenizer, AutoModelForCausalLM
LOADER = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, texts_file, out_file = sys.argv[1:]
    texts = json.load(open(texts_file))
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    with torch.no_grad():
        logits = model(torch.tensor([ids[0]])).logits[0]
    torch.save({"ids": ids, "logits": logits, "class": type(tok).__name__, "len": len(tok),
                "special": {n: getattr(tok, n) for n in ("eos_token_id", "pad_token_id", "unk_token_id")}}, out_file)
""")


def task_texts(n_episodes: int = 3) -> list[str]:
    task, rng, texts = SyntheticTask(seed=5, n_range=(1, 3)), random.Random(11), []
    for _ in range(n_episodes):
        ep = task.sample(rng)
        texts += [ep.prompt] + [f"{g} {o}" for g, o in expert_trajectory(ep)]
    return texts


def load_in_fresh_process(directory, texts, tmp_path) -> dict:
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    out = tmp_path / "loaded.pt"
    r = subprocess.run([sys.executable, "-c", LOADER, str(directory), str(tmp_path / "texts.json"), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


def assert_same_as_loaded(model, tok, loaded, texts):
    assert loaded["class"] == type(tok).__name__
    assert loaded["len"] == len(tok)
    assert loaded["special"] == {n: getattr(tok, n) for n in ("eos_token_id", "pad_token_id", "unk_token_id")}
    assert loaded["ids"] == [tok.encode(t, add_special_tokens=False) for t in texts]
    with torch.no_grad():
        logits = model.eval()(torch.tensor([loaded["ids"][0]])).logits[0]
    # the trainer's model runs the mem1_fast attention, the reloaded one transformers' default: fp32 noise only
    torch.testing.assert_close(loaded["logits"], logits, atol=1e-5, rtol=0)


def short_args(out, **kw):
    base = dict(output_dir=str(out), sft_steps=2, sft_batch=4, steps=1, episodes_per_step=2, group_size=2,
                eval_every=0, save_every=1, max_new_tokens=8)
    base.update(kw)
    return train.Args(**base)


def test_default_run_checkpoint_reloads_with_plain_transformers(tmp_path):
    model, tok = train.main(short_args(tmp_path / "run"))
    texts = task_texts()
    loaded = load_in_fresh_process(tmp_path / "run" / "checkpoint", texts, tmp_path)
    assert_same_as_loaded(model, tok, loaded, texts)
    # the ids are the word-level ones the task was trained on, one token per word (not a byte-level rebuild)
    assert loaded["ids"][0] == [tok.convert_tokens_to_ids(w) for w in texts[0].split()]


def save_model_dir(directory, model, tok):
    model.save_pretrained(directory)
    tok.save_pretrained(directory)


@pytest.mark.parametrize("kind", ["word-level llama", "byte-level BPE qwen2"])
def test_checkpoint_of_a_given_model_directory_reloads_as_the_input(tmp_path, kind):
    """--model DIR: the checkpoint's tokenizer is the one AutoTokenizer gives for DIR, and reloads as it."""
    from transformers import AutoTokenizer
    texts = task_texts()
    if kind == "word-level llama":
        model, tok = tiny_model_and_tokenizer(seed=3)
    else:
        tok = bpe_tokenizer(texts * 20, vocab_size=800)
        model = tiny_model(len(tok), arch="qwen2", pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    save_model_dir(tmp_path / "given", model, tok)
    given = AutoTokenizer.from_pretrained(tmp_path / "given")
    assert checkpoint.tokenizer_mismatch(tok, given, texts) is None
    trained, trained_tok = train.main(short_args(tmp_path / "run", model=str(tmp_path / "given")))
    loaded = load_in_fresh_process(tmp_path / "run" / "checkpoint", texts, tmp_path)
    assert loaded["ids"] == [given.encode(t, add_special_tokens=False) for t in texts]
    assert_same_as_loaded(trained, trained_tok, loaded, texts)


def test_save_refuses_a_tokenizer_that_reloads_as_another(tmp_path):
    """Negative control, and the bug this guards against: beside a qwen2 config, AutoTokenizer rebuilds a
    word-level tokenizer as a byte-level Qwen2Tokenizer, which encodes task text to other ids."""
    tok = word_tokenizer(default_vocabulary())
    model = tiny_model(len(tok), arch="qwen2", pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with pytest.raises(checkpoint.CheckpointError, match="does not give back the saved tokenizer"):
        checkpoint.save(tmp_path / "ckpt", model, tok, {}, task_texts(1))
    assert not (tmp_path / "ckpt").exists()


def test_resume_continues_on_the_same_tokenizer_and_weights(tmp_path):
    texts = task_texts()
    model1, tok1 = train.main(short_args(tmp_path, steps=1))
    with torch.no_grad():
        ids = torch.tensor([tok1.encode(texts[1], add_special_tokens=False)])
        before = model1.eval()(ids).logits
    model2, tok2 = train.main(short_args(tmp_path, steps=1))  # resumes; nothing left to train
    assert checkpoint.tokenizer_mismatch(tok1, tok2, texts) is None
    assert [tok2.encode(t, add_special_tokens=False) for t in texts] == [tok1.encode(t, add_special_tokens=False)
                                                                         for t in texts]
    with torch.no_grad():
        after = model2.eval()(ids).logits
    assert torch.equal(before, after)
    s1, s2 = model1.state_dict(), model2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_an_interrupted_swap_is_recovered(tmp_path):
    model, tok = tiny_model_and_tokenizer(seed=1)
    checkpoint.save(tmp_path / "ckpt", model, tok, {"step": 1}, task_texts(1))
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old")  # a crash between the two renames of the swap
    checkpoint.recover(tmp_path / "ckpt")
    assert checkpoint.load_state(tmp_path / "ckpt")["step"] == 1 and not (tmp_path / "ckpt.old").exists()


def test_a_leftover_old_checkpoint_beside_the_new_one_is_removed(tmp_path):
    model, tok = tiny_model_and_tokenizer(seed=1)
    checkpoint.save(tmp_path / "ckpt", model, tok, {"step": 2}, task_texts(1))
    (tmp_path / "ckpt.old").mkdir()  # a crash after the new checkpoint was in place, before the old was deleted
    (tmp_path / "ckpt.old" / "x").write_text("stale")
    checkpoint.recover(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt.old").exists() and checkpoint.load_state(tmp_path / "ckpt")["step"] == 2
    checkpoint.save(tmp_path / "ckpt", model, tok, {"step": 3}, task_texts(1))  # and saving works again
    assert checkpoint.load_state(tmp_path / "ckpt")["step"] == 3
