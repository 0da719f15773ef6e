"""Evaluate checkpoints the way MEM1's figures do: accuracy and memory against the number of objectives.

    python -m mem1_fast.eval --checkpoint runs/mem1_default/checkpoint --objectives 1,2,4,8,16 --episodes 64
    python -m mem1_fast.eval --checkpoint runs/mem1_default/checkpoint runs/full/checkpoint   # side by side
    python -m mem1_fast.eval --checkpoint DIR --task test.parquet --corpus wiki.jsonl     # per data_source
    python -m mem1_fast.eval --task webshop --checkpoint runs/webshop/checkpoint runs/webshop_full/checkpoint

For a generated task (synthetic, webshop), each number of objectives N gets `--episodes` fresh episodes (every
episode is a new random world or catalog, so nothing was seen in training); a MEM1 parquet test set is evaluated
row by row instead, grouped by the number of objectives of each row and reported per `data_source` too. The
metrics are the task's own (QA: EM and F1 per objective; shopping: score and success per purchase). Decoding is
greedy unless `--temperature` is set. Each checkpoint is rolled out in the consolidation mode it was trained in
(`--mode` overrides), so a full-context checkpoint keeps its whole history.

Writes `<output_dir>/eval.json` (one record per checkpoint: per N the metrics of `summarize`), prints a table, and
draws `{metric}_vs_objectives.png` (em, or score) and `peak_kv_vs_objectives.png` (MEM1's figure: accuracy and
peak tokens in memory against N, one line per checkpoint). The trainer's periodic evaluation calls `evaluate` too.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

from . import rollout, train
from .train import TaskOptions, UsageError


def headline(trajs) -> str:
    """The task's headline metric (the first of its Score.metrics: em for QA, score for shopping)."""
    return next(iter(trajs[0].info.metrics))


def summarize(trajs, wall_s: float | None = None) -> dict:
    """Per-episode statistics (EpisodeStats in `Trajectory.info`) averaged: each of the task's metrics per objective
    (`em_per_objective`, `f1_per_objective`; `score_per_objective`, `success_per_objective`), the reward, answered
    and valid rates, turns, searches, peak KV tokens (mean and max over episodes) and bytes, tokens prefilled (all,
    re-encoded, new), tokens generated; with the wall time of the batch, the seconds per turn (one engine step serves
    one turn of every live episode)."""
    n = len(trajs)
    if n == 0:
        raise ValueError("summarize: no trajectories")
    keys = list(trajs[0].info.metrics)
    if any(list(t.info.metrics) != keys for t in trajs):
        raise ValueError(f"summarize: trajectories of different tasks (metrics {keys} and others)")
    objectives = sum(t.info.n_objectives for t in trajs)
    m = {
        "episodes": n,
        **{f"{k}_per_objective": sum(t.info.metrics[k] for t in trajs) / objectives for k in keys},
        "reward": sum(t.reward for t in trajs) / n,
        "answered": sum(t.info.answered for t in trajs) / n,
        "valid": sum(t.info.valid for t in trajs) / n,
        "turns": sum(t.info.turns for t in trajs) / n,
        "searches": sum(t.info.searches for t in trajs) / n,
        "peak_kv_tokens": sum(t.info.peak_kv_tokens for t in trajs) / n,
        "peak_kv_tokens_max": max(t.info.peak_kv_tokens for t in trajs),
        "prefilled_tokens": sum(t.info.prefilled_tokens for t in trajs) / n,
        "reencoded_tokens": sum(t.info.reencoded_tokens for t in trajs) / n,
        # the tokens only the new observations (and turn 0's question) needed: prefilled minus re-encoded
        "prefilled_new_tokens": sum(t.info.prefilled_tokens - t.info.reencoded_tokens for t in trajs) / n,
        "peak_kv_bytes": sum(t.info.peak_kv_bytes for t in trajs) / n,
        "generated_tokens": sum(t.num_generated() for t in trajs) / n,
    }
    if wall_s is not None:
        m["wall_s"] = wall_s
        m["latency_per_turn_s"] = wall_s / max(max(t.info.turns for t in trajs), 1)
    return m


TIMINGS = ("wall_s", "latency_per_turn_s")  # the clock readings among summarize's metrics


def evaluate(engine, tok, episodes, max_turns: int = 6, greedy: bool = True, seed: int | None = None):
    """Roll `episodes` out with `engine` (no gradients) and summarize them; returns (metrics, trajectories)."""
    t0 = time.time()
    with torch.no_grad():
        trajs = rollout.run_episodes(engine, tok, episodes, rollout.AgentConfig(max_turns=max_turns), greedy=greedy,
                                     seed=seed)
    return summarize(trajs, time.time() - t0), trajs


def by_position(trajs) -> list[float]:
    """The headline metric of objective i (answer i against target i, purchase i against instruction i) over the
    episodes that have an objective i."""
    hit, seen = defaultdict(float), defaultdict(int)
    for t in trajs:
        for i, e in enumerate(t.info.per_objective):
            hit[i] += e
            seen[i] += 1
    return [hit[i] / seen[i] for i in range(len(seen))]


# --- the CLI ----------------------------------------------------------------------------------------------------
@dataclass
class Args(TaskOptions):
    checkpoint: list[str] = field(default_factory=list)
    """checkpoint folders (a training run's `<output_dir>/checkpoint`, or any local HF model with the task's
    tokenizer); several are evaluated on the same episodes and plotted side by side"""
    objectives: str = "1,2,4,8"
    """numbers of objectives to evaluate (generated tasks), comma-separated"""
    episodes: int = 64
    """fresh episodes per number of objectives (generated tasks); rows at most (parquet: 0 = every row)"""
    label: list[str] = field(default_factory=list)
    """names in the table and plots, one per checkpoint (default: the training mode, or the folder)"""
    output_dir: str = "runs/eval"
    """where eval.json and the PNG plots go"""
    seed: int = 10_000
    """seed of the evaluation episodes (training samples with its --seed; 10000 is held out of every default)"""
    mode: str = ""
    """consolidation mode of the rollouts (empty: the one each checkpoint was trained in, else recompute)"""
    engine: str = "hf"
    """rollout engine"""
    temperature: float = 0.0
    """0 = greedy decoding; > 0 samples (with --seed)"""
    max_new_tokens: int = 0
    """tokens generated per turn at most (0: the checkpoint's training value, else 24)"""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""
    device: str = "cpu"
    """torch device of the HF engine"""
    plots: bool = True
    """draw the PNG plots (matplotlib)"""


def parse_objectives(text: str, option: str = "--objectives", task: str = "synthetic") -> list[int]:
    from . import tasks
    try:
        ns = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not a comma-separated list of integers") from None
    if not ns or min(ns) < 1:
        raise UsageError(f"{option}: {text!r} needs numbers >= 1")
    try:
        tasks.get(task)(n_range=(1, max(ns)))
    except ValueError as e:
        raise UsageError(f"{option}: {max(ns)} objectives: {e}") from None
    return sorted(set(ns))


def trained_args(directory: Path) -> dict:
    """The training options a checkpoint was written with ({} for a plain HF model folder)."""
    from . import checkpoint as ckpt_io
    if not ckpt_io.has_state(directory):
        return {}
    return ckpt_io.load_state(directory).get("args", {})


def generated_episodes(task: str, n: int, count: int, seed: int):
    """`count` episodes of generated task `task` with n objectives each, the same for every checkpoint and call."""
    from . import tasks
    task = tasks.get(task)(seed=seed, n_range=(n, n))
    rng = random.Random(seed * 1000 + n)
    return [task.sample(rng) for _ in range(count)]


def run(args: Args) -> list[dict]:
    """Evaluate every checkpoint; returns the eval.json records."""
    from . import tasks
    from .consolidation import EXACT_MODES
    generated = args.task in tasks.names()
    if not args.checkpoint:
        raise UsageError("--checkpoint: give at least one checkpoint folder")
    if args.label and len(args.label) != len(args.checkpoint):
        raise UsageError(f"--label: {len(args.label)} labels for {len(args.checkpoint)} checkpoints")
    if args.episodes < (1 if generated else 0):
        raise UsageError(f"--episodes: {args.episodes} is too few")
    if args.temperature < 0 or args.temperature != args.temperature:
        raise UsageError(f"--temperature: {args.temperature} must be >= 0 (0 = greedy)")
    if args.mode and args.mode not in EXACT_MODES:
        raise UsageError(f"--mode: {args.mode!r} is not an exact mode {EXACT_MODES}")
    if args.engine not in rollout.names():
        raise UsageError(f"--engine: {args.engine!r} is not one of {rollout.names()}")
    ns = parse_objectives(args.objectives, "--objectives", args.task) if generated else None
    for path in args.checkpoint:
        if not (Path(path) / "config.json").is_file():
            raise UsageError(f"--checkpoint: {path!r} is not a checkpoint or local HF model directory (no config.json)")
    if args.threads:
        torch.set_num_threads(args.threads)
    # the episodes, shared by every checkpoint: per N (generated tasks) or per row of the test set
    if generated:
        groups = {n: generated_episodes(args.task, n, args.episodes, args.seed) for n in ns}
    records = []
    for k, path in enumerate(args.checkpoint):
        d = Path(path)
        targs = trained_args(d)
        mode = args.mode or targs.get("mode", "recompute")
        if not rollout.serves(args.engine, mode):
            raise UsageError(f"--engine: {args.engine!r} cannot serve mode {mode!r} ({path})")
        targs_cli = train.Args(model=path, **{f.name: getattr(args, f.name) for f in dataclasses.fields(TaskOptions)})
        model, tok = train.load_model_and_tokenizer(targs_cli)
        model.to(args.device).eval()
        engine = rollout.create(args.engine, model, tok, mode, temperature=args.temperature or 1.0,
                                max_new_tokens=args.max_new_tokens or targs.get("max_new_tokens", 24))
        if not generated:
            groups = parquet_groups(targs_cli, tok, args.episodes)
        label = args.label[k] if args.label else (f"{mode} ({d.parent.name or d.name})")
        rec = {"checkpoint": str(path), "label": label, "mode": mode, "engine": args.engine,
               "greedy": args.temperature == 0, "trained_objectives": [targs["n_min"], targs["n_max"]]
               if "n_max" in targs else None, "results": {}}
        for n, episodes in groups.items():
            m, trajs = evaluate(engine, tok, episodes, max_turns=args.max_turns, greedy=args.temperature == 0,
                                seed=args.seed)
            h = headline(trajs)
            m[f"{h}_by_position"] = by_position(trajs)
            if not generated:
                m["by_data_source"] = by_data_source(episodes, trajs)
            rec["results"][str(n)] = m
            rec["metric"] = h
            print(f"{label}: N={n} {h}/objective {m[f'{h}_per_objective']:.3f}  peak KV {m['peak_kv_tokens']:.1f} "
                  f"tokens  ({m['wall_s']:.1f} s)", flush=True)
        records.append(rec)
    return records


def parquet_groups(targs, tok, limit: int) -> dict:
    """The test set's rows as episodes, grouped by their number of objectives."""
    examples, retriever = train.load_task(targs)
    make = train.qa_episode_maker(targs, retriever, tok)
    groups = defaultdict(list)
    for ex in examples[:limit or None]:
        groups[len(ex.targets)].append(make(ex))
    return dict(sorted(groups.items()))


def by_data_source(episodes, trajs) -> dict:
    sums, objectives = defaultdict(lambda: defaultdict(float)), defaultdict(int)
    for ep, t in zip(episodes, trajs):
        source = getattr(ep, "data_source", "") or "?"
        for k, v in t.info.metrics.items():
            sums[source][k] += v
        objectives[source] += t.info.n_objectives
    return {s: {**{f"{k}_per_objective": v / objectives[s] for k, v in sums[s].items()}, "objectives": objectives[s]}
            for s in sums}


NAMES = {"em": "EM", "f1": "F1"}  # column headings of the task metrics (others: their own names)
COLUMNS = [("answered", "answered", "{:.2f}"), ("valid", "valid", "{:.2f}"), ("turns", "turns", "{:.1f}"),
           ("searches", "searches", "{:.1f}"), ("peak KV", "peak_kv_tokens", "{:.1f}"),
           ("max KV", "peak_kv_tokens_max", "{:d}"), ("gen tok", "generated_tokens", "{:.1f}"),
           ("s/turn", "latency_per_turn_s", "{:.3f}")]


def table(records: list[dict]) -> str:
    first = next(iter(records[0]["results"].values()))
    metrics = [(NAMES.get(k[:-len("_per_objective")], k[:-len("_per_objective")]), k, "{:.3f}")
               for k in first if k.endswith("_per_objective")]
    columns = metrics + COLUMNS
    head = ["checkpoint", "N"] + [c[0] for c in columns]
    rows = [[r["label"], n] + [f.format(m[key]) for _, key, f in columns]
            for r in records for n, m in r["results"].items()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(str(x).rjust(w) for x, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(r) for r in rows])


def plot(records: list[dict], out: Path, metric: str = "em") -> list[Path]:
    """The headline metric per objective (em, score) and peak KV tokens against N, one line per checkpoint (the
    trained range shaded)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    for key, ylabel, name in ((f"{metric}_per_objective", f"{NAMES.get(metric, metric)} per objective",
                               f"{metric}_vs_objectives.png"),
                              ("peak_kv_tokens", "peak KV tokens (mean over episodes)", "peak_kv_vs_objectives.png")):
        fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
        for r in records:
            ns = [int(n) for n in r["results"]]
            ax.plot(ns, [r["results"][str(n)][key] for n in ns], marker="o", label=r["label"])
        trained = [r["trained_objectives"] for r in records if r.get("trained_objectives")]
        if trained:
            lo, hi = min(t[0] for t in trained), max(t[1] for t in trained)
            ax.axvspan(lo - 0.2, hi + 0.2, color="0.9", zorder=0, label=f"trained N={lo}..{hi}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({int(n) for r in records for n in r["results"]}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("objectives per episode (N)")
        ax.set_ylabel(ylabel)
        if key.endswith("_per_objective"):
            ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        files.append(out / name)
    return files


def main(args: Args) -> list[dict]:
    records = run(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"args": dataclasses.asdict(args), "records": records}, indent=1))
    print(table(records))
    from . import tasks
    plotted = []
    if args.plots and args.task in tasks.names():
        plotted = plot(records, out, records[0]["metric"])
    written = [out / "eval.json"] + plotted
    print("wrote " + ", ".join(str(p) for p in written))
    return records


def cli(argv: list[str] | None = None) -> None:
    args = tyro.cli(Args, args=argv)
    try:
        main(args)
    except UsageError as e:
        print(f"mem1_fast.eval: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
