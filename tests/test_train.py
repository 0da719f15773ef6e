"""The trainer end to end on the CPU default (shrunk): metrics, an HF checkpoint, resume, --help."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from mem1_fast import rollout, train
from mem1_fast.tiny import tiny_model


def small_args(out, **kw):
    base = dict(output_dir=str(out), sft_steps=3, sft_batch=4, steps=2, episodes_per_step=2, group_size=2,
                eval_every=1, eval_episodes=3, save_every=1, max_new_tokens=10, n_max=2, eval_objectives="1,3")
    base.update(kw)
    return train.Args(**base)


@pytest.mark.parametrize("mode", ["recompute", "retain"])
def test_short_run_writes_metrics_and_checkpoint(tmp_path, mode):
    train.main(small_args(tmp_path, mode=mode))
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in recs if r["phase"] == "sft"] == [1, 2, 3]
    assert [r["step"] for r in recs if r["phase"] == "rl"] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs if r["phase"] == "sft")
    assert all(torch.isfinite(torch.tensor(r["loss/policy"])) for r in recs if r["phase"] == "rl")
    evals = [r for r in recs if r["phase"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2]
    for r in evals:  # per N of --eval-objectives (3 lies past --n-max 2), and pooled
        assert {"eval/n1/em_per_objective", "eval/n3/em_per_objective", "eval/n3/peak_kv_tokens",
                "eval/em_per_objective"} <= set(r)
        assert r["eval/n1/episodes"] == r["eval/n3/episodes"] == 3 and "time/eval/n3/wall_s" in r
    ckpt = tmp_path / "checkpoint"  # that it reloads as what was trained: tests/test_checkpoint.py
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["rl_step"] == 2 and state["phase"] == "rl"


def test_webshop_short_run_and_resume(tmp_path):
    """--task webshop through the same trainer: its own tokenizer (brackets split; the save checks it reloads as
    itself), the shopping metrics per number of purchases, and a resumed run picking up where it stopped."""
    kw = dict(task="webshop", eval_objectives="1,2", n_max=1)
    model, tok = train.main(small_args(tmp_path, steps=1, **kw))
    assert tok.tokenize("click[b07]") == ["click", "[", "b07", "]"]
    train.main(small_args(tmp_path, steps=2, **kw))
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in recs if r["phase"] == "sft"] == [1, 2, 3]
    assert [r["step"] for r in recs if r["phase"] == "rl"] == [1, 2]
    rl = [r for r in recs if r["phase"] == "rl"]
    assert all({"rollout/score_per_objective", "rollout/success_per_objective"} <= set(r) for r in rl)
    assert not any("rollout/em_per_objective" in r for r in rl)
    for r in (r for r in recs if r["phase"] == "eval"):
        assert {"eval/n1/score_per_objective", "eval/n2/success_per_objective", "eval/n2/peak_kv_tokens"} <= set(r)
        assert 0 <= r["eval/n2/score_per_objective"] <= 1


def test_task_recipe_sets_the_defaults_and_options_override_it(monkeypatch):
    from mem1_fast.tasks.webshop import ShopTask
    seen = []
    monkeypatch.setattr(train, "main", seen.append)
    train.cli(["--task", "webshop", "--sft-batch", "8"])
    train.cli([])
    shop, default = seen
    assert shop.task == "webshop" and shop.sft_batch == 8  # the command line wins over the recipe
    for k, v in ShopTask.RECIPE.items():
        if k != "sft_batch":
            assert getattr(shop, k) == v, k
    assert default == train.Args() and default.n_max == 4 and default.sft_position_jitter == 64
    assert train.task_args("webshop", steps=3) == shop.__class__(**{**vars(train.Args(task="webshop")),
                                                                   **ShopTask.RECIPE, "steps": 3})
    out = subprocess.run([sys.executable, "-m", "mem1_fast.train", "--task", "webshop", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "(default: 1600)" in out.stdout  # --help shows the task's defaults


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
    assert all("loss/kl_ref" in r for r in recs if r["phase"] == "rl")


# --- user mistakes: one line naming the option, exit status 2, no traceback, before any model is built ---------
def write_parquet(path, rows=None):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = rows or {"prompt": [[{"role": "user", "content": "<q> where was x born ?"}]], "data_source": ["toy"],
                    "reward_model": [{"style": "rule", "ground_truth": {"target": [["y"]]}}],
                    "extra_info": [{"i": 0}]}
    pq.write_table(pa.table(rows), path)
    return str(path)


def bad_inputs(tmp):
    """(argv, option the message must name, words it must contain) per mistake."""
    good = write_parquet(tmp / "good.parquet")
    (tmp / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    no_target = write_parquet(tmp / "no_target.parquet", {"prompt": ["q"], "data_source": ["x"],
                                                          "reward_model": [{"style": "rule"}]})
    no_column = write_parquet(tmp / "no_column.parquet", {"prompt": ["q"], "data_source": ["x"]})
    (tmp / "corpus.jsonl").write_text('{"id": "0", "contents": "\\"t\\"\\nx"}\n{not json\n')
    (tmp / "empty.jsonl").write_text("\n")
    (tmp / "no_tok").mkdir()
    tiny_model(40).save_pretrained(tmp / "no_tok")
    (tmp / "a_file").write_text("x")
    return [
        (["--n-min", "3", "--n-max", "1"], "--n-max", "smaller than --n-min"),
        (["--n-min", "0"], "--n-min", "at least 1"),
        (["--n-max", "21"], "--n-max", "turns, which must be"),
        (["--sft-teacher-shortcut", "1.5"], "--sft-teacher-shortcut", "probability"),
        (["--temperature", "0"], "--temperature", "> 0"),
        (["--temperature", "nan"], "--temperature", "> 0"),
        (["--group-size", "1"], "--group-size", "2 or more"),
        (["--steps", "-1"], "--steps", ">= 0"),
        (["--lr", "0"], "--lr", "> 0"),
        (["--kl-coef", "-1"], "--kl-coef", ">= 0"),
        (["--task", str(tmp / "missing.parquet"), "--corpus", str(tmp / "corpus.jsonl")], "--task", "existing"),
        (["--task", str(tmp / "corrupt.parquet"), "--corpus", str(tmp / "corpus.jsonl")], "--task", "not a readable"),
        (["--task", no_target, "--corpus", str(tmp / "corpus.jsonl")], "--task", "ground_truth"),
        (["--task", no_column, "--corpus", str(tmp / "corpus.jsonl")], "--task", "missing column"),
        (["--task", good], "--corpus/--retriever-url", "exactly one"),
        (["--task", good, "--corpus", "c.jsonl", "--retriever-url", "http://127.0.0.1:1/retrieve"],
         "--corpus/--retriever-url", "exactly one"),
        (["--task", good, "--retriever-url", "localhost:8000"], "--retriever-url", "not an http(s) URL"),
        (["--task", good, "--corpus", str(tmp / "missing.jsonl")], "--corpus", "not a readable"),
        (["--task", good, "--corpus", str(tmp / "corpus.jsonl")], "--corpus", ":2"),
        (["--task", good, "--corpus", str(tmp / "empty.jsonl")], "--corpus", "no documents"),
        (["--corpus", str(tmp / "corpus.jsonl")], "--corpus/--retriever-url", "synthetic task"),
        (["--task", "webshop", "--n-max", "9"], "--n-max", "one product type per instruction"),
        (["--task", "webshop", "--eval-objectives", "1,12"], "--eval-objectives", "12 objectives"),
        (["--task", "nonsense"], "--task", "neither a generated task (synthetic, webshop)"),
        (["--model", str(tmp / "missing")], "--model", "no config.json"),
        (["--model", str(tmp / "no_tok")], "--model", "no usable tokenizer"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device", "CUDA device"),
        (["--device", "nonsense"], "--device", "not a torch device"),
        (["--device", "meta"], "--device", "only cpu and cuda"),
        (["--output-dir", str(tmp / "a_file" / "below")], "--output-dir", "cannot create"),
        (["--output-dir", str(tmp / "a_file")], "--output-dir", "not a directory"),
    ] + ([(["--engine", "vllm", "--mode", "retain"], "--engine", "cannot serve --mode 'retain'")]
         if "vllm" in rollout.names() else [])


def test_user_mistakes_are_one_line_errors_before_any_model_is_built(tmp_path, monkeypatch, capsys):
    import transformers
    cases = bad_inputs(tmp_path)

    def no_model(*a, **k):
        raise AssertionError("a model was built before the input was checked")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    monkeypatch.setattr("mem1_fast.tiny.tiny_model", no_model)
    capsys.readouterr()  # the progress bars of writing the test's own model directory
    for argv, option, words in cases:
        argv = ["--output-dir", str(tmp_path / "out"), *argv] if "--output-dir" not in argv else argv
        with pytest.raises(SystemExit) as e:
            train.cli(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"mem1_fast.train: error: {option}"), (argv, err)
        assert words in lines[0], (argv, err)
        assert "Traceback" not in err


def test_cli_error_has_no_traceback_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mem1_fast.train", "--output-dir", str(tmp_path), "--n-min", "3",
                        "--n-max", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "mem1_fast.train: error: --n-max: 1 is smaller than --n-min 3"
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_tokenizer_that_would_not_reload_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """The bug the tiny Llama fixes, put back: a word-level tokenizer with a qwen2 model, which AutoTokenizer would
    reload from a checkpoint as a byte-level Qwen2Tokenizer. The run stops before any step, not at its first save."""
    from mem1_fast import tiny
    def qwen2_with_word_tokenizer(words=None, punctuation="", seed=0, **kw):
        tok = tiny.word_tokenizer(tiny.default_vocabulary())
        return tiny.tiny_model(len(tok), arch="qwen2", seed=seed), tok
    monkeypatch.setattr(tiny, "tiny_model_and_tokenizer", qwen2_with_word_tokenizer)
    with pytest.raises(SystemExit) as e:
        train.cli(["--output-dir", str(tmp_path / "out"), "--sft-steps", "1000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("mem1_fast.train: error: --model: AutoTokenizer would not")
    assert "Qwen2Tokenizer" in err[-1]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


# --- the PPO trainer's estimators, aggregation, off-policy correction and exact resume -------------------------
def rl_records(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl") if json.loads(line)["phase"] != "sft"]


@pytest.mark.parametrize("kw", [dict(advantage="gae"), dict(advantage="gae", critic="shared", gamma=0.99, lam=0.95,
                                                            ppo_minibatches=2, ppo_epochs=2),
                                dict(advantage="rloo", loss_agg="seq-mean-token-mean"),
                                dict(advantage="grpo", loss_agg="seq-mean-token-sum", kl_coef=0.1, kl_in="reward",
                                     kl_estimator="k1", share_question=True)],
                         ids=["gae", "gae-shared", "rloo-seqmean", "grpo-klreward-sharedq"])
def test_estimators_train_and_log_their_metrics(tmp_path, kw):
    train.main(small_args(tmp_path, **kw))
    recs = [r for r in rl_records(tmp_path) if r["phase"] == "rl"]
    assert len(recs) == 2
    for r in recs:
        for k in ("loss/policy", "loss/entropy", "loss/approx_kl", "loss/old_approx_kl", "loss/clipfrac"):
            assert math.isfinite(r[k]), k
        assert r["loss/approx_kl"] >= 0  # k3
        if kw["advantage"] == "gae":
            assert math.isfinite(r["loss/value"]) and math.isfinite(r["value/explained_variance"])
            assert not r["skipped_update"]  # the critic learns from every step
        if kw.get("kl_in") == "reward":
            assert "rollout/kl_ref" in r and "loss/kl_ref" not in r
        saved = r["shared_question_tokens_saved"]
        assert (saved > 0) == bool(kw.get("share_question")) and r["packed_tokens"] > 0
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert ("critic" in state) == (kw["advantage"] == "gae")
    if kw["advantage"] == "gae":  # never skipped: one optimizer step per mini-batch per epoch per RL step
        steps = {int(v["step"]) for v in state["optimizer"]["state"].values()}
        assert steps == {2 * kw.get("ppo_epochs", 1) * kw.get("ppo_minibatches", 1)}


def test_gae_critic_learns_the_value_of_a_fixed_reward(tmp_path, monkeypatch):
    """Every rollout rewarded 1 with gamma = lam = 1: the return of every token is 1, so the zero-initialized
    critic's mean value at rollout time rises from 0 towards 1 step after step."""
    run = rollout.run_episodes

    def rewarded(*a, **k):
        trajs = run(*a, **k)
        for t in trajs:
            t.reward = 1.0
        return trajs

    monkeypatch.setattr(rollout, "run_episodes", rewarded)
    train.main(small_args(tmp_path, advantage="gae", steps=4, critic_lr=3e-3, vf_clip=0.0, eval_every=0))
    recs = [r for r in rl_records(tmp_path) if r["phase"] == "rl"]
    assert [r["value/returns_mean"] for r in recs] == [1.0] * 4
    values = [r["value/mean"] for r in recs]
    assert values[0] == 0.0 and 0.0 < values[1] < values[3] <= 1.5, values


class _InexactEngine:
    """The HF engine with every recorded log-prob shifted by -0.05: an engine whose numerics differ from the
    trainer's, as a bf16 vLLM's do."""
    exact_logprobs = False

    def __init__(self, *a, **k):
        from mem1_fast.rollout.hf import HFEngine
        self.inner = HFEngine(*a, **k)

    def step(self, idx, observations=None):
        gens = self.inner.step(idx, observations)
        for g in gens:
            g.logprobs[:] = [lp - 0.05 for lp in g.logprobs]
        return gens

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("tis", ["token", "sequence"])
def test_an_inexact_engine_gets_recomputed_old_logprobs_and_importance_weights(tmp_path, monkeypatch, tis):
    from mem1_fast.rollout import base
    monkeypatch.setitem(base._ENGINES, "inexact", (_InexactEngine, lambda plan: True))
    train.main(small_args(tmp_path, engine="inexact", tis=tis, tis_cap=1.02, eval_every=0))
    for r in (r for r in rl_records(tmp_path) if r["phase"] == "rl"):
        # the trainer's own log-probs are the engine's + 0.05 (up to fp32 noise): the mismatch is measured
        assert r["mismatch/logprob_abs_mean"] == pytest.approx(0.05, abs=1e-4)
        assert r["mismatch/logprob_abs_max"] == pytest.approx(0.05, abs=1e-4)
        assert r["mismatch/ratio_p50"] == pytest.approx(math.exp(0.05), abs=1e-4)
        # exp(0.05) = 1.051 > cap 1.02 per token: every token truncated; sequences: their products are larger still
        assert r["mismatch/tis_truncated_frac"] == 1.0


def varied_rewards(monkeypatch):
    """Rewards that vary between rollouts (the tiny model of these short runs never answers right, and all-zero
    rewards would leave nothing to update), as a function of the sampled tokens only."""
    run = rollout.run_episodes

    def rewarded(*a, **k):
        trajs = run(*a, **k)
        for t in trajs:
            t.reward = sum(i for j in range(t.num_turns) for i in t.generation(j)) % 5 / 4
        return trajs

    monkeypatch.setattr(rollout, "run_episodes", rewarded)


@pytest.mark.parametrize("kw", [dict(), dict(advantage="gae")], ids=["grpo", "gae"])
def test_a_killed_run_resumes_into_the_same_run(tmp_path, kw, monkeypatch):
    """Stopped after RL step 1 and resumed, a run logs exactly what an uninterrupted run logs (losses, rewards,
    values, evaluations: every metric but the clocks), and ends with the same weights."""
    varied_rewards(monkeypatch)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    m1, _ = train.main(small_args(whole, steps=3, **kw))
    train.main(small_args(parts, steps=1, **kw))
    m2, _ = train.main(small_args(parts, steps=3, **kw))
    strip = lambda recs: [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"}  # noqa: E731
                          for r in recs]
    a = strip(json.loads(line) for line in open(whole / "metrics.jsonl"))
    b = strip(json.loads(line) for line in open(parts / "metrics.jsonl"))
    assert a == b
    rl = [r for r in a if r["phase"] == "rl"]
    assert not any(r["skipped_update"] for r in rl) and len({r["rollout/reward"] for r in rl}) > 1
    assert all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(), m2.state_dict().values()))
    sa = torch.load(whole / "checkpoint" / "trainer_state.pt", weights_only=False)
    sb = torch.load(parts / "checkpoint" / "trainer_state.pt", weights_only=False)
    if "critic" in sa:
        assert all(torch.equal(sa["critic"][k], sb["critic"][k]) for k in sa["critic"])


def test_trim_metrics_drops_what_came_after_the_checkpoint(tmp_path):
    from mem1_fast.checkpoint import trim_metrics
    recs = ([{"phase": "sft", "step": s} for s in (1, 2, 3)] + [{"phase": "eval", "step": 0}]
            + [r for s in (1, 2, 3) for r in ({"phase": "rl", "step": s}, {"phase": "eval", "step": s})])
    f = tmp_path / "metrics.jsonl"
    for state, want in ((dict(phase="sft", sft_step=2, rl_step=0), recs[:2]),
                        (dict(phase="rl", sft_step=3, rl_step=0), recs[:3]),
                        (dict(phase="rl", sft_step=3, rl_step=2), recs[:8])):
        f.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"phase": "rl", "st')  # a line cut mid-write
        trim_metrics(f, state)
        assert [json.loads(line) for line in f.read_text().splitlines()] == want


def test_sigkill_mid_run_and_the_same_command_end_where_an_uninterrupted_run_ends(tmp_path):
    """`kill -9` while RL step 3 runs (or while step 2 is being saved), then the same command again: the final
    weights, critic and optimizer equal an uninterrupted run's, and metrics.jsonl holds each record once."""
    import signal
    import time

    cmd = [sys.executable, "-m", "mem1_fast.train", "--sft-steps", "3", "--sft-batch", "4", "--steps", "5",
           "--episodes-per-step", "2", "--group-size", "2", "--eval-every", "2", "--eval-episodes", "3",
           "--save-every", "1", "--max-new-tokens", "10", "--advantage", "gae", "--entropy-coef", "0.01"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd + ["--output-dir", str(tmp_path / "whole")], check=True, capture_output=True, env=env,
                   timeout=600)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    p = subprocess.Popen(cmd + ["--output-dir", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 600
    while not (metrics.is_file() and '"phase": "rl", "step": 2' in metrics.read_text()):
        assert p.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    subprocess.run(cmd + ["--output-dir", str(tmp_path / "killed")], check=True, capture_output=True, env=env,
                   timeout=600)
    strip = lambda run: [{k: v for k, v in json.loads(line).items()  # noqa: E731
                          if not k.startswith("time/") and k != "tokens_per_s"}
                         for line in open(tmp_path / run / "metrics.jsonl")]
    assert strip("killed") == strip("whole")
    a = torch.load(tmp_path / "whole" / "checkpoint" / "trainer_state.pt", weights_only=False)
    b = torch.load(tmp_path / "killed" / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert a["rl_step"] == b["rl_step"] == 5
    assert all(torch.equal(a["critic"][k], b["critic"][k]) for k in a["critic"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "checkpoint").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "killed" / "checkpoint").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_tensorboard_events_hold_the_metrics_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train.main(small_args(tmp_path, steps=2, tensorboard=True))
    ev = EventAccumulator(str(tmp_path / "tensorboard"))
    ev.Reload()
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    for tag, phase, key in (("sft/loss", "sft", "loss"), ("loss/entropy", "rl", "loss/entropy"),
                            ("eval/answered", "eval", "eval/answered"), ("rl/trained_tokens", "rl", "trained_tokens")):
        got = [(e.step, e.value) for e in ev.Scalars(tag)]
        want = [(r["step"], pytest.approx(float(r[key]), rel=1e-6)) for r in recs if r["phase"] == phase]
        assert got == want, tag


def test_wandb_without_wandb_is_a_usage_error(tmp_path):
    from mem1_fast.metrics import available
    if available("wandb"):
        pytest.skip("wandb is installed")
    with pytest.raises(train.UsageError, match="--wandb-project: wandb is not installed"):
        train.check_args(small_args(tmp_path, wandb_project="mem1"))


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["more", "fewer"])
@pytest.mark.parametrize("advantage", ["grpo", "gae"])
def test_rl_moves_the_policy_toward_the_reward(tmp_path, monkeypatch, sign, advantage):
    """The end-to-end sign check: reward = +/- the share of sampled tokens in the lower half of the vocabulary (about
    half of them for a random model). A few RL steps must raise that share when it is rewarded and lower it when it
    is penalized."""
    from mem1_fast.tiny import tiny_model_and_tokenizer
    half = len(tiny_model_and_tokenizer()[1]) // 2
    run, shares = rollout.run_episodes, []

    def rewarded(*a, **k):
        trajs = run(*a, **k)
        if not k.get("greedy"):
            ids = [i for t in trajs for j in range(t.num_turns) for i in t.generation(j)]
            shares.append(sum(i < half for i in ids) / len(ids))
            for t in trajs:
                g = [i for j in range(t.num_turns) for i in t.generation(j)]
                t.reward = sign * sum(i < half for i in g) / len(g)
        return trajs

    monkeypatch.setattr(rollout, "run_episodes", rewarded)
    train.main(small_args(tmp_path, sft_steps=0, steps=12, episodes_per_step=4, group_size=4, lr=3e-3,
                          critic_lr=3e-3, eval_every=0, max_new_tokens=8, advantage=advantage))
    before, after = sum(shares[:3]) / 3, sum(shares[-3:]) / 3
    assert (after - before) * sign > 0.05, shares  # a share estimate over 3 steps varies by about 0.02


def test_sft_position_jitter_shifts_each_trajectory_after_its_question():
    """skip_positions moves every token after a trajectory's question by that trajectory's gap, in every mode's
    layout, and leaves the question (and so the relative positions inside the rest) alone."""
    import random as _random

    from mem1_fast.consolidation import EXACT_MODES, pack
    from mem1_fast.tasks.synthetic import SyntheticTask
    from mem1_fast.tiny import word_tokenizer, default_vocabulary
    from mem1_fast.trajectory import Kind
    tok = word_tokenizer(default_vocabulary())
    task = SyntheticTask(seed=3, n_range=(1, 3))
    trajs = [train.expert_as_trajectory(type(task), task.sample(_random.Random(i)), tok) for i in range(5)]
    gaps = torch.tensor([0, 7, 64, 1, 30])
    for mode in EXACT_MODES:
        for b in pack(trajs, mode, max_tokens=700):
            before = b.position_ids.clone()
            train.skip_positions(b, gaps)
            prompt = b.kind == int(Kind.PROMPT)
            assert torch.equal(b.position_ids[prompt], before[prompt])
            assert torch.equal(b.position_ids[~prompt] - before[~prompt], gaps[b.traj_ids[~prompt]])
