"""Another trainer can import the ops without the project's heavy dependencies: `mem1_fast.ops` (every op front,
paged_attention included) and `mem1_fast.visibility` load neither transformers, bm25s nor tyro."""
import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("transformers", "bm25s", "tyro")


def loaded_after(stmt: str) -> list[str]:
    code = f"import sys, json; {stmt}; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ops_and_visibility_import_light():
    assert loaded_after("import mem1_fast.ops, mem1_fast.ops.paged_attention, mem1_fast.visibility") == []


def test_the_check_sees_a_heavy_import():  # negative control: the HF integration does load transformers
    assert "transformers" in loaded_after("import mem1_fast.hf")


def test_triton_kernels_import_under_one_name_only():
    """From the repository root (on sys.path), `import triton_kernels` would be a second copy of every kernel module:
    it is refused with a message naming the one package; `mem1_fast.triton_kernels` imports."""
    root = str(Path(__file__).resolve().parent.parent)
    bad = subprocess.run([sys.executable, "-c", "import triton_kernels"], capture_output=True, text=True, cwd=root,
                         timeout=120)
    assert bad.returncode != 0 and "import mem1_fast.triton_kernels instead" in bad.stderr
    good = subprocess.run([sys.executable, "-c", "import mem1_fast.triton_kernels.paged_attention"],
                          capture_output=True, text=True, cwd=root, timeout=300)
    assert good.returncode == 0, good.stderr[-2000:]
