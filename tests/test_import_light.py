"""Another trainer can import the ops without the project's heavy dependencies: `mem1_fast.ops` (every op front,
paged_attention included) and `mem1_fast.visibility` load neither transformers, bm25s nor tyro."""
import json
import subprocess
import sys

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
