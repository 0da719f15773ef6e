"""Compile reports of the Triton kernel modules for sm_80 and sm_90a, without a GPU (shared by the Triton tests):
they run tools/triton_report.py, whose kernel lists and main configurations the tests read as `report`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import triton_report as report  # noqa: E402, F401 (the tests read its kernel lists)

SMEM_LIMIT = {"sm_80": 166912, "sm_90a": 232448}  # max dynamic shared memory per block (A100, H100)


def compile_rows(module: str, extra: list[str], timeout: int = 3000) -> list[dict]:
    """`python tools/triton_report.py <module> --json --arch A ...` in fresh interpreters without TRITON_INTERPRET
    (the decorators read it at import), one per arch, in parallel; their rows of registers / spills / shared memory."""
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError:
        pytest.skip("triton's NVIDIA backend (ptxas, cuobjdump) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tools" / "triton_report.py"), module, "--json", "--arch",
                               str(a), *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for a in (80, 90)]
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"compile report failed:\n{err[-6000:]}"
        rows += json.loads(out.strip().splitlines()[-1])
    return rows
