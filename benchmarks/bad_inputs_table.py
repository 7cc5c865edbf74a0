"""Print the bad-input catalogue of ``tests/test_bad_inputs.py`` as a table: case, exit code (or the API call's
outcome), first line of the message, files left behind (must be none), and whether the case behaved as stated.

    OMP_NUM_THREADS=1 python benchmarks/bad_inputs_table.py > benchmarks/results/bad_inputs.txt

Runs every case in a fresh temporary folder (tiny preset; about a minute on two cores). Exit status 1 if a case
did not behave as the test states.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="select", help="only cases whose name contains this text")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    import test_bad_inputs as suite

    logging.basicConfig(level=logging.CRITICAL)  # the table carries the messages; keep stderr quiet
    cases = [c for c in suite.CASES if not args.select or args.select in c.name]
    rows = [("#", "case", "exit", "first line of the message", "files left", "as stated")]
    failed = 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tadsr-bad-inputs-") as tmp:
        res = suite.Resources(Path(tmp) / "resources")
        for i, case in enumerate(cases, 1):
            ws = Path(tmp) / f"case{i:02d}"
            out = suite.run_case(case, ws / "ws", res, ws / "logs")
            msg = out.message.replace(tmp, "$TMP").replace("|", "/")
            if len(msg) > 150:
                msg = msg[:147] + "..."
            code = str(out.code) if out.code is not None else f"API: {out.raised}"
            ok = not out.problems
            failed += not ok
            rows.append((str(i), case.name, code, msg or "-", ", ".join(out.left) or "none", "yes" if ok else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines))
    print(f"\n{len(cases)} cases, {len(cases) - failed} as stated, {failed} not; {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
