"""The trainer end to end on the CPU default (shrunk): metrics, an HF checkpoint, resume, --help."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mem1_fast import train


def small_args(out, **kw):
    base = dict(output_dir=str(out), sft_steps=3, sft_batch=4, steps=2, episodes_per_step=2, group_size=2,
                eval_every=1, eval_episodes=3, save_every=1, max_new_tokens=10)
    base.update(kw)
    return train.Args(**base)


@pytest.mark.parametrize("mode", ["recompute", "retain"])
def test_short_run_writes_metrics_and_checkpoint(tmp_path, mode):
    train.main(small_args(tmp_path, mode=mode))
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in recs if r["phase"] == "sft"] == [1, 2, 3]
    assert [r["step"] for r in recs if r["phase"] == "rl"] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs if r["phase"] in ("sft", "rl"))
    ckpt = tmp_path / "checkpoint"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert model.config.vocab_size == len(tok)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["rl_step"] == 2 and state["phase"] == "rl"


def test_resume_continues_where_it_stopped(tmp_path):
    train.main(small_args(tmp_path, steps=1))
    train.main(small_args(tmp_path, steps=3))
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in recs if r["phase"] == "sft"] == [1, 2, 3]  # SFT not repeated
    assert [r["step"] for r in recs if r["phase"] == "rl"] == [1, 2, 3]  # RL picks up at step 2
    assert torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)["rl_step"] == 3


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "mem1_fast.train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    import dataclasses
    for f in dataclasses.fields(train.Args):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out.stdout, f"{flag} missing from --help"
    assert "consolidation mode" in out.stdout


def test_parquet_task_needs_a_retriever(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = {"prompt": [[{"role": "user", "content": "<q> where was x born ?"}]], "data_source": ["toy"],
            "reward_model": [{"style": "rule", "ground_truth": {"target": [["y"]]}}], "extra_info": [{"i": 0}]}
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table(rows), path)
    with pytest.raises(ValueError, match="--corpus"):
        train.main(small_args(tmp_path / "o", task=str(path)))


def test_kl_reference_survives_resume(tmp_path):
    """With a KL term the reference is the policy RL started from, also after a resume."""
    train.main(small_args(tmp_path, steps=1, kl_coef=0.1))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "reference").state_dict()
    start = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert start["rl_step"] == 1
    train.main(small_args(tmp_path, steps=2, kl_coef=0.1))
    ref2 = AutoModelForCausalLM.from_pretrained(tmp_path / "reference").state_dict()
    assert all(torch.equal(ref[k], ref2[k]) for k in ref)
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all("kl_ref" in r for r in recs if r["phase"] == "rl")
