"""benchmarks/gpu_check.sh off a GPU, and the report it writes on one (from a made-up run folder)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine runs the real check")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "report")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "no NVIDIA GPU" in r.stdout
    assert not (tmp_path / "report").exists()  # nothing built, nothing written


def test_report_from_a_run_folder(tmp_path):
    (tmp_path / "gpu.txt").write_text("NVIDIA H200, 143771 MiB, 580.159.04")
    (tmp_path / "versions.txt").write_text("torch 2.13.0 cuda 13.0")
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_a" name="test_skip"><skipped/></testcase>'
        '</testsuite></testsuites>')
    rows = {"state_attention fwd+bwd cuda": [
        {"variant": "sdpa_dense", "seconds": 0.004, "baseline": True, "ratio": 1.0, "peak_mb": 900.0},
        {"variant": "triton", "seconds": 0.001, "baseline": False, "ratio": 0.25, "peak_mb": 90.0},
        {"variant": "flex", "seconds": None, "baseline": False, "ratio": None, "note": "RuntimeError"}]}
    (tmp_path / "bench_rows.json").write_text(json.dumps(rows))
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), str(tmp_path)], check=True,
                   timeout=60)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tests"]["passed"] == 1 and report["tests"]["skipped"] == 1
    assert report["tests"]["failed"] == ["tests.test_a::test_bad"]
    md = (tmp_path / "report.md").read_text()
    assert "| triton | 1 | 0.25 | — | 90 |" in md
    assert "| sdpa_dense (baseline) | 4 | 1 | — | 900 |" in md
    assert "| flex | — | — | RuntimeError | — |" in md
