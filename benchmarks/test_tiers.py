"""What a test tier ran and how long it took, from a pytest JUnit XML report (runs nothing itself).

    pytest -q --junitxml=default.xml                  # the default tier (CI)
    pytest -q --runslow -m slow --junitxml=slow.xml   # the official-size tier
    python benchmarks/test_tiers.py default.xml [--top 15]

Prints the tier's wall time and outcome counts, the time per test file (slowest first), the slowest tests, and
the coverage table: format (ONNX, ExecuTorch, Core ML) x {export pipeline, export components, INT8, runtime run,
parity verdict, tadsr all}, each cell the passed / failed / skipped tests found for it. A test counts for a column
by its name (tests/test_every_format.py names them so: ``test_export_pipeline[onnx]``, ``test_int8[coreml]``,
``test_runtime_run[executorch-components-fp32]`` ...) or by its file (test_export_onnx.py: export, format onnx;
test_quantize.py: INT8; test_runtime.py: runtime run; test_parity.py: parity verdict; test_main_job.py: tadsr
all), and for a format by the format named in its id or file; a test that names no format counts for none, except
the ``tadsr all`` smoke itself, which covers every format.
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("onnx", "executorch", "coreml")
COLUMNS = ("export pipeline", "export components", "INT8", "runtime run", "parity verdict", "tadsr all")
COMPONENT_WORDS = ("component", "encoder", "denoiser", "decoder")


@dataclass(frozen=True)
class Case:
    """One test case of the report: file, name (with parameter id), seconds and outcome."""

    file: str
    name: str
    seconds: float
    outcome: str  # passed | failed | skipped | xfailed


def _outcome(tc: ET.Element) -> str:
    if tc.find("failure") is not None or tc.find("error") is not None:
        return "failed"
    skipped = tc.find("skipped")
    if skipped is None:
        return "passed"
    return "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"


def read_report(path: Path) -> tuple[list[Case], float]:
    """The cases of a JUnit XML report and the suite's wall time (seconds)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    cases, wall = [], 0.0
    for suite in suites:
        wall += float(suite.get("time", 0.0))
        for tc in suite.iter("testcase"):
            module = tc.get("classname", "").split(".")
            # classname "tests.test_x" or "tests.test_x.TestClass": the file is the first test_* part
            stem = next((m for m in module if m.startswith("test_")), module[-1] if module else "?")
            cases.append(Case(f"{stem}.py", tc.get("name", ""), float(tc.get("time", 0.0)), _outcome(tc)))
    return cases, wall


def columns_of(case: Case) -> set[str]:
    """The coverage columns a test counts for (see the module docstring)."""
    name, file = case.name.lower(), case.file
    cols = set()
    if "export_pipeline" in name or (file.startswith("test_export_") and "pipeline" in name):
        cols.add("export pipeline")
    if "export_components" in name or (file.startswith("test_export_") and any(w in name for w in COMPONENT_WORDS)):
        cols.add("export components")
    if "int8" in name or file == "test_quantize.py":
        cols.add("INT8")
    if "runtime_run" in name or file == "test_runtime.py":
        cols.add("runtime run")
    if "parity_verdict" in name or file == "test_parity.py":
        cols.add("parity verdict")
    if "tadsr_all" in name or file == "test_main_job.py":
        cols.add("tadsr all")
    return cols


def formats_of(case: Case) -> set[str]:
    """The formats a test exercises: named in its id or file; the ``tadsr all`` smoke covers every one."""
    found = {f for f in FORMATS if re.search(rf"(^|[^a-z]){f}([^a-z]|$)", case.name.lower())}
    found |= {f for f in FORMATS if f in case.file}
    if not found and "tadsr_all_smoke" in case.name:
        return set(FORMATS)
    return found


def coverage(cases: list[Case]) -> dict[tuple[str, str], Counter]:
    table: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for case in cases:
        for fmt in formats_of(case):
            for col in columns_of(case):
                table[fmt, col][case.outcome] += 1
    return table


def _cell(counts: Counter) -> str:
    if not counts:
        return "-"
    parts = [f"{counts[k]} {label}" for k, label in (("passed", "pass"), ("failed", "FAIL"), ("xfailed", "xfail"),
                                                             ("skipped", "skip"))
             if counts[k]]  # fmt: skip
    return ", ".join(parts)


def render(cases: list[Case], wall: float, top: int = 15) -> str:
    outcomes = Counter(c.outcome for c in cases)
    lines = [f"tier wall time: {wall:.0f} s ({wall / 60:.1f} min); {len(cases)} tests: "
             + ", ".join(f"{outcomes[k]} {k}" for k in ("passed", "failed", "xfailed", "skipped")), "",
             "| file | tests | seconds |", "|---|---|---|"]  # fmt: skip
    per_file: dict[str, list[Case]] = defaultdict(list)
    for c in cases:
        per_file[c.file].append(c)
    for file, group in sorted(per_file.items(), key=lambda kv: -sum(c.seconds for c in kv[1])):
        lines.append(f"| {file} | {len(group)} | {sum(c.seconds for c in group):.1f} |")
    lines += ["", f"slowest {top} tests:", *(f"  {c.seconds:7.1f} s  {c.file}::{c.name} ({c.outcome})"
                                                for c in sorted(cases, key=lambda c: -c.seconds)[:top])]  # fmt: skip
    table = coverage(cases)
    lines += ["", "| format | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for fmt in FORMATS:
        lines.append(f"| {fmt} | " + " | ".join(_cell(table.get((fmt, col), Counter())) for col in COLUMNS) + " |")
    gaps = [f"{fmt}/{col}" for fmt in FORMATS for col in COLUMNS if not table.get((fmt, col), Counter())["passed"]]
    lines += ["", "uncovered (no passing test): " + (", ".join(gaps) if gaps else "none")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report", type=Path, help="pytest --junitxml file")
    ap.add_argument("--top", type=int, default=15, help="slowest tests to list (default: %(default)s)")
    args = ap.parse_args(argv)
    if not args.report.is_file():
        print(f"no such report: {args.report}", file=sys.stderr)
        return 2
    cases, wall = read_report(args.report)
    print(render(cases, wall, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
