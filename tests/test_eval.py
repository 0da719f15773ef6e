"""mem1_fast.eval end to end: short training runs (MEM1 `recompute` and the full-context baseline), evaluated by the
CLI (JSON fields, table, PNG plots), the KV accounting checked against the trajectories, parquet test sets per
data_source, and the CLI's one-line errors."""
import json
import random

import pytest

from mem1_fast import eval as ev
from mem1_fast import rollout, train
from mem1_fast.trajectory import GENERATED, Kind

FIELDS = ("episodes", "em_per_objective", "f1_per_objective", "answered", "valid", "turns", "searches",
          "peak_kv_tokens", "peak_kv_tokens_max", "generated_tokens", "wall_s", "latency_per_turn_s", "em_by_position")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One short run per mode; 60 expert steps are enough for the format (search turns), not for the answers."""
    out = {}
    for mode in ("recompute", "full"):
        d = tmp_path_factory.mktemp(mode)
        train.main(train.Args(output_dir=str(d), mode=mode, sft_steps=60, sft_batch=8, sft_lr=5e-3, steps=0,
                              eval_every=0, tensorboard=False, n_max=2))
        out[mode] = d / "checkpoint"
    return out


def test_cli_writes_json_table_and_plots_and_full_context_grows(checkpoints, tmp_path, capsys):
    out = tmp_path / "eval"
    ev.cli(["--checkpoint", str(checkpoints["recompute"]), str(checkpoints["full"]), "--objectives", "1,3",
            "--episodes", "6", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    data = json.loads((out / "eval.json").read_text())
    recs = data["records"]
    assert [r["mode"] for r in recs] == ["recompute", "full"]  # each checkpoint in the mode it was trained in
    assert all(r["trained_objectives"] == [1, 2] and r["greedy"] for r in recs)
    for r in recs:
        assert sorted(r["results"]) == ["1", "3"]
        for n, m in r["results"].items():
            assert set(FIELDS) <= set(m) and m["episodes"] == 6
            assert len(m["em_by_position"]) == int(n)
            assert m["em_per_objective"] == pytest.approx(sum(m["em_by_position"]) / int(n))  # N fixed per group
            assert 0 <= m["answered"] <= 1 and 0 <= m["valid"] <= 1 and m["peak_kv_tokens"] <= m["peak_kv_tokens_max"]
            assert r["label"] in printed
    # the full-context flag on the same checkpoint and episodes: the history stays, so the peak grows
    ev.cli(["--checkpoint", str(checkpoints["recompute"]), "--mode", "full", "--objectives", "1,3", "--episodes", "6",
            "--output-dir", str(tmp_path / "eval_full")])
    full = json.loads((tmp_path / "eval_full" / "eval.json").read_text())["records"][0]
    assert full["mode"] == "full"
    rec, full = recs[0]["results"]["3"], full["results"]["3"]
    assert rec["turns"] > 1.5 and full["turns"] > 1.5, "the model must search for the comparison to mean anything"
    assert full["peak_kv_tokens"] > rec["peak_kv_tokens"]  # exact: test_peak_kv_tokens_match_the_trajectories
    for name in ("em_vs_objectives.png", "peak_kv_vs_objectives.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def oracle_peak(traj, mode: str) -> int:
    """Peak KV tokens from the trajectory alone: full keeps everything (last token fed); recompute holds q, the
    re-encoded last turn and the current generation, whose last token is never fed."""
    segs = traj.segments
    q = len(segs[0])
    if mode == "full":
        return sum(len(s) for s in segs)
    peak, prev = 0, 0
    for j in range(traj.num_turns):
        gen = sum(len(s) for s in segs[1:] if s.turn == j and s.kind in GENERATED)
        peak = max(peak, q + prev + gen - 1)
        prev = gen + sum(len(s) for s in segs[1:] if s.turn == j and s.kind == Kind.OBS)
    return peak


@pytest.mark.parametrize("mode", ["recompute", "full"])
def test_peak_kv_tokens_match_the_trajectories(checkpoints, mode):
    model, tok = train.load_model_and_tokenizer(train.Args(model=str(checkpoints[mode])))
    engine = rollout.create("hf", model, tok, mode, max_new_tokens=24)
    episodes = ev.generated_episodes("synthetic", 3, 6, seed=123)
    m, trajs = ev.evaluate(engine, tok, episodes, greedy=False, seed=1)
    assert max(t.num_turns for t in trajs) >= 2
    peaks = [oracle_peak(t, mode) for t in trajs]
    assert [t.info.peak_kv_tokens for t in trajs] == peaks
    assert m["peak_kv_tokens"] == pytest.approx(sum(peaks) / len(peaks)) and m["peak_kv_tokens_max"] == max(peaks)
    assert m["em_per_objective"] == pytest.approx(sum(t.info.metrics["em"] for t in trajs) / (3 * len(trajs)))


def test_the_same_episodes_for_every_checkpoint_and_seed_dependent():
    a = [e.prompt for e in ev.generated_episodes("synthetic", 4, 5, seed=7)]
    assert a == [e.prompt for e in ev.generated_episodes("synthetic", 4, 5, seed=7)]
    assert a != [e.prompt for e in ev.generated_episodes("synthetic", 4, 5, seed=8)]
    from mem1_fast.tasks.synthetic import expert_generations
    eps = ev.generated_episodes("synthetic", 4, 5, seed=7)
    assert all(e.max_turns == len(expert_generations(e)) + 2 for e in eps)  # the teacher's turns + 2 at test time


def test_parquet_test_set_is_reported_per_data_source(checkpoints, tmp_path):
    from test_train import write_parquet
    rows = {"prompt": [[{"role": "user", "content": f"<q> where is {x} ?"}] for x in ("kalo", "mira", "suno")],
            "data_source": ["nq", "hotpotqa", "nq"],
            "reward_model": [{"style": "rule", "ground_truth": {"target": t}}
                             for t in ([["a"]], [["b"], ["c"]], [["d"]])],
            "extra_info": [{"i": i} for i in range(3)]}
    task = write_parquet(tmp_path / "test.parquet", rows)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": f'"{w}"\n{w} is a word .'}) + "\n"
                              for i, w in enumerate(["kalo", "mira", "suno"])))
    recs = ev.main(ev.Args(checkpoint=[str(checkpoints["recompute"])], task=task, corpus=str(corpus), episodes=0,
                           output_dir=str(tmp_path / "out")))
    res = recs[0]["results"]
    assert sorted(res) == ["1", "2"]  # grouped by the rows' number of objectives
    assert res["1"]["episodes"] == 2 and res["2"]["episodes"] == 1
    assert res["1"]["by_data_source"].keys() == {"nq"} and res["2"]["by_data_source"].keys() == {"hotpotqa"}
    assert res["1"]["by_data_source"]["nq"]["objectives"] == 2
    assert not (tmp_path / "out" / "em_vs_objectives.png").exists()  # a test set has no N axis to plot


@pytest.mark.parametrize("argv,option", [
    (["--objectives", "1,x"], "--objectives"), (["--objectives", "0"], "--objectives"),
    (["--label", "a", "b"], "--label"), (["--temperature", "-1"], "--temperature"), (["--mode", "paper"], "--mode"),
])
def test_bad_options_are_one_line_errors(checkpoints, capsys, argv, option):
    with pytest.raises(SystemExit) as e:
        ev.cli(["--checkpoint", str(checkpoints["recompute"]), *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"mem1_fast.eval: error: {option}") and "\n" not in err


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    for argv in ([], ["--checkpoint", str(tmp_path / "nope")]):
        with pytest.raises(SystemExit) as e:
            ev.cli(argv + ["--output-dir", str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("mem1_fast.eval: error: --checkpoint") and "\n" not in err


def test_trainer_evaluation_uses_the_same_summary(checkpoints):
    """The trainer's eval records are eval.summarize's metrics under eval/ (one code path)."""
    model, tok = train.load_model_and_tokenizer(train.Args(model=str(checkpoints["recompute"])))
    engine = rollout.create("hf", model, tok, "recompute", max_new_tokens=24)
    episodes = ev.generated_episodes("synthetic", 2, 4, seed=random.Random(0).randrange(1000))
    m, trajs = ev.evaluate(engine, tok, episodes)
    rec = train.episode_metrics(trajs, "eval")
    assert {k.removeprefix("eval/") for k in rec} <= set(m)
    assert all(rec[f"eval/{k}"] == m[k] for k in ("em_per_objective", "peak_kv_tokens", "turns"))


@pytest.fixture(scope="module")
def shop_checkpoints(tmp_path_factory):
    """Short webshop runs (the MEM1 agent and the full-context one): enough SFT for searches and clicks (at 80
    steps the full-context one still wrote malformed turns by the third)."""
    out = {}
    for mode in ("recompute", "full"):
        d = tmp_path_factory.mktemp(f"shop_{mode}")
        train.main(train.task_args("webshop", output_dir=str(d), mode=mode, sft_steps=120, sft_batch=8, sft_lr=5e-3,
                                   steps=0, eval_every=0, tensorboard=False))
        out[mode] = d / "checkpoint"
    return out


def test_webshop_eval_reports_score_and_success_per_number_of_purchases(shop_checkpoints, tmp_path, capsys):
    out = tmp_path / "eval"
    ev.cli(["--task", "webshop", "--checkpoint", str(shop_checkpoints["recompute"]), str(shop_checkpoints["full"]),
            "--objectives", "1,3", "--episodes", "5", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    recs = json.loads((out / "eval.json").read_text())["records"]
    assert [r["mode"] for r in recs] == ["recompute", "full"] and all(r["metric"] == "score" for r in recs)
    for r in recs:
        for n, m in r["results"].items():
            assert {"score_per_objective", "success_per_objective", "score_by_position", "peak_kv_tokens"} <= set(m)
            assert "em_per_objective" not in m and len(m["score_by_position"]) == int(n)
            assert 0 <= m["success_per_objective"] <= m["score_per_objective"] <= 1
    head = printed.splitlines()[-len(recs) * 2 - 2]
    assert "score" in head and "success" in head and "EM" not in head
    rec, full = recs[0]["results"]["3"], recs[1]["results"]["3"]
    assert rec["turns"] > 3 and full["turns"] > 3, "the agents must browse for the comparison to mean anything"
    assert full["peak_kv_tokens"] > 1.5 * rec["peak_kv_tokens"]  # the full-context agent keeps every page
    for name in ("score_vs_objectives.png", "peak_kv_vs_objectives.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "em_vs_objectives.png").exists()


@pytest.mark.parametrize("mode", ["recompute", "full"])
def test_webshop_peak_kv_tokens_match_the_trajectories(shop_checkpoints, mode):
    model, tok = train.load_model_and_tokenizer(train.Args(model=str(shop_checkpoints[mode])))
    engine = rollout.create("hf", model, tok, mode, max_new_tokens=24)
    m, trajs = ev.evaluate(engine, tok, ev.generated_episodes("webshop", 2, 5, seed=3), greedy=False, seed=1)
    assert max(t.num_turns for t in trajs) >= 3
    assert [t.info.peak_kv_tokens for t in trajs] == [oracle_peak(t, mode) for t in trajs]
