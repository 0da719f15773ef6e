"""Benchmarks: pytest-benchmark timings plus a ratio table against the baseline measured in the same run.

Each benchmark calls `record(group, variant, seconds, baseline=..., **extra)`; the summary prints, per group, every
variant's time as a ratio to the group's baseline, and any extra columns (memory, visible fraction, ...).
With MEM1_FAST_BENCH_JSON=path the same rows are also written there as JSON (benchmarks/gpu_check.sh reads them).
"""
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

_ROWS: dict = {}


def best_of(fn, n: int = 5, warmup: int = 0) -> float:
    """The fastest of n timed calls of fn (after `warmup` untimed ones), in seconds."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def record(group: str, variant: str, seconds: float, baseline: bool = False, **extra):
    _ROWS.setdefault(group, []).append(dict(variant=variant, seconds=seconds, baseline=baseline, **extra))


def _json_rows() -> dict:
    out = {}
    for group, rows in _ROWS.items():
        base = next((r for r in rows if r["baseline"]), rows[0])
        out[group] = [{**r, "seconds": None if math.isnan(r["seconds"]) else r["seconds"],
                       "ratio": None if math.isnan(r["seconds"] / base["seconds"]) else r["seconds"] / base["seconds"]}
                      for r in rows]
    return out


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("MEM1_FAST_BENCH_JSON"):
        Path(os.environ["MEM1_FAST_BENCH_JSON"]).write_text(json.dumps(_json_rows(), indent=1))
    if not _ROWS:
        return
    w = terminalreporter.write_line
    w("")
    w("ratios against the baseline of each group (time / baseline time; < 1 is faster)")
    for group, rows in _ROWS.items():
        base = next((r for r in rows if r["baseline"]), rows[0])
        w(f"  {group}")
        for r in rows:
            extra = "  ".join(f"{k}={v}" for k, v in r.items() if k not in ("variant", "seconds", "baseline"))
            w(f"    {r['variant']:<28} {r['seconds'] * 1e3:10.2f} ms  x{r['seconds'] / base['seconds']:7.3f}  {extra}")
