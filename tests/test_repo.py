"""The repository is self-contained: the code cites only documents it holds, and every `docs/design.md §n` it cites
is a section of that file."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = re.compile(r"\bDESIGN(\.md)? §|shared/|\bGT:\d|\bQM:\d|issue items? \d|learnability_probe|reference/\w+\.md")
CITE = re.compile(r"docs/design\.md §(\d+(?:\.\d+)?)")
SOURCES = ("*.py", "*.cpp", "*.cu", "*.cuh", "*.h", "*.sh", "CMakeLists.txt")


def sections() -> set[str]:
    heads = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (ROOT / "docs" / "design.md").read_text(), re.M)
    return set(heads)


def problems(text: str, known: set[str]) -> list[str]:
    out = [f"cites {m.group(0)!r}, outside the repository" for m in OUTSIDE.finditer(text)]
    out += [f"cites docs/design.md §{n}, which has no such section" for n in CITE.findall(text) if n not in known]
    return out


def test_the_checker_catches_bad_references():  # negative control
    known = {"3", "3.2"}
    assert problems("see DESIGN §4 and GT:300", known) and problems("(docs/design.md §9)", known)
    assert problems("(docs/design.md §3.2), docs/design.md §3", known) == []


def test_code_cites_only_the_repository():
    files = subprocess.run(["git", "ls-files", *SOURCES], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    assert len(files) > 50
    known = sections()
    assert {"2", "3", "3.2", "4", "5", "6", "7"} <= known
    files = [f for f in files if f != "tests/test_repo.py"]  # its negative control quotes bad references
    bad = {f: p for f in files if (p := problems((ROOT / f).read_text(errors="replace"), known))}
    assert not bad, bad
