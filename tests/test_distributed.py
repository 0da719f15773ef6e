"""FSDP2 under torchrun, on CPU (gloo, 2 ranks): a sharded PPO update equals the one-process update on all the
data, and `torchrun -m mem1_fast.train` trains end to end and resumes into the same run."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from mem1_fast.tiny import default_agent

HERE = Path(__file__).resolve().parent
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available() and TORCHRUN),
                                reason="needs torch.distributed with gloo and torchrun")


def torchrun(args, tmp_path, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", *args], capture_output=True,
                       text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_sharded_update_equals_one_process_update(tmp_path):
    """Policy (fused PPO loss on the tied LM head) and critic, FSDP2 over 2 ranks with 1 and 5 packed batches
    (the first rank runs 4 padding passes), three steps: gradients and weights equal the unsharded updates on all 8
    trajectories; without the world-size loss scale they are not (negative control)."""
    torchrun([str(HERE / "dist_worker.py"), str(tmp_path)], tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["world"] == 2 and r["sharded"].startswith("FSDP") and r["passes"] == 5
        assert r["max_grad_rel_diff"] < 1e-5 and r["max_param_diff"] < 1e-6 < r["moved"]
        assert r["unscaled_grad_rel_diff"] > 0.3  # half the gradient at the first step, then apart
    assert sorted(r["batches"] for r in ranks) == [1, 5]


def test_torchrun_trains_and_resumes_into_the_same_run(tmp_path):
    """gae with a separate critic, a KL reference and 2 PPO mini-batches, 2 ranks: rank 0 writes one metrics
    file and an HF checkpoint; stopped after RL step 1 and resumed, the run logs what the uninterrupted one logs."""
    common = ["-m", "mem1_fast.train", "--sft-steps", "3", "--sft-batch", "4", "--episodes-per-step", "2",
              "--group-size", "2", "--eval-every", "1", "--eval-episodes", "3", "--save-every", "1",
              "--max-new-tokens", "10", "--advantage", "gae", "--kl-coef", "0.1", "--entropy-coef", "0.01",
              "--ppo-minibatches", "2", "--n-max", "2", "--eval-objectives", "1,3"]
    torchrun(common + ["--output-dir", "whole", "--steps", "3"], tmp_path)
    torchrun(common + ["--output-dir", "parts", "--steps", "1"], tmp_path)
    torchrun(common + ["--output-dir", "parts", "--steps", "3"], tmp_path)

    def records(run):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/") and k != "tokens_per_s"}
                for line in open(tmp_path / run / "metrics.jsonl")]

    whole = records("whole")
    assert [r["step"] for r in whole if r["phase"] == "rl"] == [1, 2, 3]  # one writer
    assert [r["step"] for r in whole if r["phase"] == "eval"] == [0, 1, 2, 3]
    assert all(r["loss/entropy"] > 0 for r in whole if r["phase"] == "rl")
    assert records("parts") == whole
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "checkpoint")  # whole, unsharded weights
    assert model.get_input_embeddings().weight.shape[0] == len(AutoTokenizer.from_pretrained(
        tmp_path / "whole" / "checkpoint")) == len(default_agent()[1])
