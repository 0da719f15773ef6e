"""Build checks of csrc/ that need no GPU.

* Every ``.cu`` under csrc/cuda compiles with nvcc for sm_80 and sm_90a, with zero register spills; ptxas'
  per-kernel figures (registers, spills, stack, shared memory) are printed (``pytest -s`` to see them).
  Skipped with a reason when nvcc is absent.
* The CMake build (CMakeLists.txt: the CPU extension against the installed torch + an object library compiling
  every .cu for "80;90a") takes ~1-2 min on 2 cores, so it only runs when MEM1_FAST_TEST_CMAKE=1:
      MEM1_FAST_TEST_CMAKE=1 python -m pytest tests/test_csrc_build.py -q -s
  By hand:  cmake -S . -B build/cmake && cmake --build build/cmake -j2
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mem1_fast import _ext

NVCC = _ext.find_nvcc()
ROOT = Path(__file__).resolve().parent.parent
ARCHS = _ext.cuda_archs() if (ROOT / "csrc" / "sources.txt").is_file() else []

try:
    CU_SOURCES = _ext.cuda_sources()
except RuntimeError:  # no source checkout
    CU_SOURCES = []


def test_cuda_sources_found():
    if not (ROOT / "csrc" / "cuda").is_dir():
        pytest.skip("no csrc/cuda in this checkout")
    assert CU_SOURCES, "csrc/cuda holds no .cu file"
    for src in CU_SOURCES:
        text = src.read_text()
        assert "#include <torch" not in text and "#include <ATen" not in text and "#include <c10" not in text, (
            f"{src}: .cu files must not include torch headers (a CUDAExtension cannot link the CPU torch)"
        )


def test_source_list_names_every_native_source_once():
    """csrc/sources.txt is the one list (setup.py, CMake, the JIT loader and these tests read it): every .cpp / .cu
    of csrc/ is on it, once, and every entry exists -- a source compiled by one build path and not another (the
    drift of a per-tool list) cannot happen. Negative control: a stray file is caught."""
    if not (ROOT / "csrc" / "sources.txt").is_file():
        pytest.skip("no csrc/ in this checkout")
    csrc = ROOT / "csrc"
    lst = _ext.source_list(csrc)
    listed = lst["cpu"] + lst["cuda"]
    assert len(listed) == len(set(listed)) and all((csrc / p).is_file() for p in listed)
    on_disk = sorted(str(p.relative_to(csrc)) for ext in ("*.cpp", "*.cu") for p in csrc.rglob(ext))
    assert sorted(listed) == on_disk
    assert "cuda/block_map.cu" not in on_disk and ARCHS == ["sm_80", "sm_90a"]
    assert sorted(listed + ["cuda/stray.cu"]) != on_disk
    setup_text = (ROOT / "setup.py").read_text()
    assert "source_list(ROOT / \"csrc\")" in setup_text and "glob(" not in setup_text
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "csrc/sources.txt" in cmake and "GLOB" not in cmake


def test_parse_ptxas_sample():
    sample = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPi' for 'sm_80'
ptxas info    : Function properties for _Z3fooPi
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 360 bytes cmem[0]
ptxas info    : Function properties for _Z6helperv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""
    k = _ext.parse_ptxas(sample)
    assert list(k) == ["_Z3fooPi"]
    v = k["_Z3fooPi"]
    assert (v["arch"], v["registers"], v["spill_stores"], v["spill_loads"], v["stack"], v["smem"], v["barriers"]) == (
        "sm_80", 255, 4, 4, 8, 1024, 1)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set $NVCC/$CUDA_HOME or put nvcc on PATH)")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", CU_SOURCES, ids=[s.name for s in CU_SOURCES])
def test_cu_compiles_without_spills(src, arch):
    res = _ext.nvcc_compile(src, arch)
    assert res["ok"], f"nvcc failed for {src.name} ({arch}):\n{' '.join(res['cmd'])}\n{res['output']}"
    kernels = res["kernels"]
    assert kernels, f"no kernel reported by ptxas for {src.name} ({arch}):\n{res['output']}"
    print(f"\n{src.name} [{arch}]")
    for v in kernels.values():
        name = v["name"].split("(")[0].replace("(anonymous namespace)::", "")
        print(
            f"  {name:<40} regs={v['registers']:>3} spill_st={v['spill_stores']} spill_ld={v['spill_loads']}"
            f" stack={v['stack']} smem={v['smem']}B barriers={v['barriers']}"
        )
        assert v["arch"] == arch
    spills = {v["name"]: (v["spill_stores"], v["spill_loads"]) for v in kernels.values()
              if v["spill_stores"] or v["spill_loads"]}
    assert not spills, f"register spills in {src.name} ({arch}): {spills}"


@pytest.mark.skipif(os.environ.get("MEM1_FAST_TEST_CMAKE", "") in ("", "0"), reason="set MEM1_FAST_TEST_CMAKE=1 (slow)")
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_cmake_build(tmp_path):
    build = tmp_path / "cmake"
    env = dict(os.environ)
    subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}"],
        check=True, env=env,
    )
    subprocess.run(["cmake", "--build", str(build), "-j", os.environ.get("MAX_JOBS", "2")], check=True, env=env)
    so = list(build.glob("_C*.so"))
    assert so, f"no _C*.so in {build}"
    # the standalone module loads and registers the op
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import _C; "
        "o = torch.ops.mem1_fast.block_map(torch.zeros(4, 1, dtype=torch.int32), "
        "torch.arange(1, 5, dtype=torch.int32)[:, None], 2, 2); print([t.tolist() for t in o])"
    )
    out = subprocess.run([sys.executable, "-c", code, str(build)], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[[0, 1, 2], [0, 1], [0, 0, 1], [0]]"
