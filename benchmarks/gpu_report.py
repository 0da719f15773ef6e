"""report.json and report.md from a benchmarks/gpu_check.sh folder: versions, test counts, benchmark tables.

    python benchmarks/gpu_report.py REPORT_DIR
"""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read(path: Path) -> str:
    return path.read_text(errors="replace").strip() if path.is_file() else ""


def test_counts(xml_path: Path) -> dict:
    if not xml_path.is_file():
        return {"error": "no junit file (the test step did not finish)"}
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    keys = ("tests", "failures", "errors", "skipped")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts


def fmt(v) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(folder: str) -> None:
    d = Path(folder)
    rows = json.loads(read(d / "bench_rows.json") or "{}")
    report = {"gpu": read(d / "gpu.txt"), "versions": read(d / "versions.txt"), "tests": test_counts(d / "tests.xml"),
              "steps": read(d / "steps.log").splitlines(), "benchmarks": rows}
    (d / "report.json").write_text(json.dumps(report, indent=1))
    md = ["# mem1_fast GPU check", "", f"GPU: {report['gpu']}", "", "```", report["versions"], "```", "",
          "## cuda-marked tests (Triton compiled)", "", json.dumps({k: v for k, v in report["tests"].items()
                                                                  if k != "failed"}), ""]
    md += [f"- failed: `{f}`" for f in report["tests"].get("failed", [])]
    md += ["", "## Benchmarks (time / baseline time of each group; < 1 is faster)", ""]
    if not rows:
        md.append("no benchmark rows (the benchmark step did not finish; see bench.log)")
    for group, rs in rows.items():
        extra = sorted({k for r in rs for k in r} - {"variant", "seconds", "baseline", "ratio"})
        md += [f"### {group}", "", "| variant | ms | × baseline | " + " | ".join(extra) + " |",
               "|---|---|---|" + "---|" * len(extra)]
        for r in rs:
            ms = None if r["seconds"] is None else r["seconds"] * 1e3
            md.append(f"| {r['variant']}{' (baseline)' if r['baseline'] else ''} | {fmt(ms)} | {fmt(r['ratio'])} | "
                      + " | ".join(fmt(r.get(k)) for k in extra) + " |")
        md.append("")
    md += ["## Steps", ""] + [f"- {s}" for s in report["steps"]]
    (d / "report.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
