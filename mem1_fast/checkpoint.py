"""Checkpoints in the format users load: `save_pretrained` model and tokenizer, the trainer's state beside them.

    AutoModelForCausalLM.from_pretrained(dir), AutoTokenizer.from_pretrained(dir)   # what a user (or vLLM) does

`save` writes into `<dir>.tmp`, checks there that `AutoTokenizer.from_pretrained` gives back the tokenizer that was
saved (same ids on probe texts, same special tokens), then swaps the folder in. A tokenizer that would reload as
something else (transformers maps some model types to their own tokenizer class whatever was saved) is an error
at the first save, not a silently different tokenization after a resume. A crash during the swap leaves
`<dir>.old`, which `recover` puts back.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import torch

STATE_FILE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint would not reload as what was saved."""


def tokenizer_mismatch(tok, other, probe_texts: Sequence[str]) -> str | None:
    """Why `other` is not the same tokenizer as `tok` on these texts (ids, special tokens, size), or None."""
    if type(other).__name__ != type(tok).__name__:
        kind = f" ({type(tok).__name__} saved, {type(other).__name__} loaded)"
    else:
        kind = ""
    if len(other) != len(tok):
        return f"vocabulary of {len(other)} tokens instead of {len(tok)}{kind}"
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(other, name, None) != getattr(tok, name, None):
            return f"{name} {getattr(other, name, None)} instead of {getattr(tok, name, None)}{kind}"
    for text in probe_texts:
        a, b = tok.encode(text, add_special_tokens=False), other.encode(text, add_special_tokens=False)
        if a != b:
            return f"{text[:60]!r} encodes to {b[:12]}... instead of {a[:12]}...{kind}"
    return None


def reload_mismatch(tok, probe_texts: Sequence[str], directory: Path | None = None, config=None) -> str | None:
    """Why `AutoTokenizer.from_pretrained` would not give back `tok` from a checkpoint folder (`directory`, where the
    caller saved model and tokenizer, or a scratch folder with `tok` and the model's `config`: the model type is
    what makes transformers override the saved tokenizer class), or None."""
    import tempfile

    from transformers import AutoTokenizer

    if directory is None:
        with tempfile.TemporaryDirectory() as d:
            tok.save_pretrained(d)
            if config is not None:
                config.save_pretrained(d)
            return reload_mismatch(tok, probe_texts, Path(d))
    return tokenizer_mismatch(tok, AutoTokenizer.from_pretrained(directory), probe_texts)


def save(path: Path, model, tok, trainer_state: dict, probe_texts: Sequence[str], state_dict=None) -> None:
    """Write model, tokenizer and `trainer_state` (anything torch.save takes) to `path`, replacing it whole.
    `state_dict`: the model's weights when its own are sharded (rollout.full_state_dict)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
    tok.save_pretrained(tmp)
    why = reload_mismatch(tok, probe_texts, tmp)
    if why:
        raise CheckpointError(f"AutoTokenizer.from_pretrained({str(tmp)!r}) does not give back the saved tokenizer: "
                              f"{why}")
    torch.save(trainer_state, tmp / STATE_FILE)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)


def recover(path: Path) -> None:
    """Finish a swap that a crash interrupted: `<dir>.old` without `<dir>` is the last complete checkpoint; beside
    `<dir>` it is a leftover (the crash came after the new one was in place)."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if old.exists():
        if path.exists():
            shutil.rmtree(old)
        else:
            old.rename(path)


def has_state(path: Path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def load_state(path: Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, weights_only=False)


def reference_model(path: Path, policy, write: bool = True, wait=lambda: None):
    """The frozen reference policy kept at `path`: saved there from `policy` the first time (to `<path>.tmp`, then
    renamed, so a crash never leaves half a reference that a resumed run would load), loaded from it afterwards.
    Under torchrun one rank writes (`write`) and every rank loads after `wait()`."""
    from transformers import AutoModelForCausalLM

    from .hf import NAME
    path = Path(path)
    if write and not (path / "config.json").is_file():
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        policy.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    wait()
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=NAME, dtype=torch.float32)


def trim_metrics(path: Path, state: dict) -> int:
    """Drop the metric records a killed run wrote after its last checkpoint (the resumed run writes them again):
    SFT records past `state["sft_step"]`, RL and evaluation records past `state["rl_step"]` (the evaluation before
    RL counts as written only once an RL step was saved), and a last line cut off mid-write. Rewrites the file
    atomically; returns how many records were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    rl = state["phase"] == "rl"
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # the kill came mid-line
            dropped += 1
            continue
        step, phase = rec.get("step", 0), rec.get("phase")
        ok = (step <= state["sft_step"] if phase == "sft" else
              rl and (step <= state["rl_step"] if phase == "rl" else
                      step < state["rl_step"] or 0 < step == state["rl_step"]))
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.rename(path)
    return dropped
