"""Tiny models and tokenizers built offline: the CPU default and the tests. No hub access anywhere.

The tokenizer is word-level over a fixed vocabulary (the synthetic task's words by default), with the chat-free
special tokens <unk>, <pad>, <eos> first. Tags like `<think>` are single tokens, so stops and the STATE/ACTION split
are token-level.

The default tiny model is a Llama (no q/k/v bias), not a Qwen2: for `model_type == "qwen2"` transformers'
AutoTokenizer ignores the saved tokenizer class and rebuilds a byte-level BPE `Qwen2Tokenizer` from the vocabulary,
so a word-level tokenizer saved beside a Qwen2 config does not reload as itself. Beside a Llama config it reloads
as the same `TokenizersBackend` (tests/test_checkpoint.py checks ids and logits in a fresh process). Qwen2 stays
available (`arch="qwen2"`) for tests that keep model and tokenizer in memory.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from . import hf  # noqa: F401  (registers the mem1_fast attention)

SPECIALS = ["<unk>", "<pad>", "<eos>"]


def word_tokenizer(words: Sequence[str], punctuation: str = "") -> PreTrainedTokenizerFast:
    """Word-level over `words` (whitespace-separated); each character of `punctuation` is also split off as a word
    of its own (the shopping task's `click[b07]` is click [ b07 ])."""
    vocab = {}
    for w in list(SPECIALS) + list(words):
        if w in vocab:
            continue
        if any(c.isspace() for c in w) or not w:
            raise ValueError(f"vocabulary word {w!r} is empty or contains whitespace")
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if punctuation:
        chars = Regex("[" + "".join("\\" + c for c in punctuation) + "]")
        tok.pre_tokenizer = pre_tokenizers.Sequence([tok.pre_tokenizer, pre_tokenizers.Split(chars, "isolated")])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def bpe_tokenizer(texts: Sequence[str], vocab_size: int = 1000):
    """A byte-level BPE trained on `texts` in Qwen2's pipeline (its pre-tokenizer regex, byte-level decoder), as a
    `Qwen2Tokenizer`: a realistic tokenizer for tests (tags like `</think>` span several tokens), which
    AutoTokenizer reloads as itself beside a Qwen2 config."""
    import json

    from tokenizers import trainers
    from transformers import Qwen2Tokenizer

    base = Qwen2Tokenizer()  # empty vocabulary, Qwen2's normalizer / pre-tokenizer / decoder
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    base._tokenizer.train_from_iterator(texts, trainer)
    bpe = json.loads(base._tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
    return Qwen2Tokenizer(vocab=bpe["vocab"], merges=merges)


def default_vocabulary(task: str = "synthetic") -> list[str]:
    from . import tasks
    return tasks.get(task).vocabulary()


ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny_model(vocab_size: int, arch: str = "llama", hidden: int = 128, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, head_dim: int = 32, max_positions: int = 4096, seed: int = 0,
               init_std: float = 0.02, attn_implementation: str = hf.NAME, pad_token_id: int = 1,
               eos_token_id: int = 2):
    """A randomly initialized decoder (tied embeddings, fp32) of architecture `arch` ("llama" or "qwen2")."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if head_dim < 32:
        raise ValueError(f"head_dim must be >= 32 (vLLM refuses smaller heads), got {head_dim}")
    config_cls, model_cls = ARCHS[arch]
    cfg = config_cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
                     num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                     head_dim=head_dim, max_position_embeddings=max_positions, rope_theta=10000.0,
                     tie_word_embeddings=True, initializer_range=init_std, pad_token_id=pad_token_id,
                     eos_token_id=eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    model.config._attn_implementation = attn_implementation
    return model


def tiny_qwen2(vocab_size: int, **kw) -> Qwen2ForCausalLM:
    return tiny_model(vocab_size, arch="qwen2", **kw)


def default_agent(seed: int = 0, task: str = "synthetic"):
    """The trainer's default model: the tiny Llama with full multi-head attention (4 key/value heads, 0.47M
    parameters). With 2 key/value heads, the warm start on the synthetic task formed its copy lookups (an entity from
    an observation into the state) within 1000 steps for some seeds only; with 4 it did for every seed tried."""
    from . import tasks
    cls = tasks.get(task)
    return tiny_model_and_tokenizer(cls.vocabulary(), punctuation=cls.PUNCTUATION, seed=seed, kv_heads=4)


def tiny_model_and_tokenizer(words: Sequence[str] | None = None, punctuation: str = "", **kw):
    tok = word_tokenizer(default_vocabulary() if words is None else words, punctuation)
    model = tiny_model(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
    return model, tok
