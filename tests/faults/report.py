"""Regenerate the figures of docs/resilience.md: ``python -m tests.faults.report``.

Runs the fault, limit, fuzz and soak tests with ``GATEWAY_TEST_RESULTS_FILE`` set (each
test appends its measured figures, tests/faults/figures.py), then rewrites the part of
docs/resilience.md between the ``figures`` markers with a table per case. Nothing is
typed in: a case that did not run does not appear. Extra arguments go to pytest (e.g.
``-k soak``); ``GATEWAY_TEST_SOAK_SECONDS`` and ``GATEWAY_TEST_FUZZ_EXAMPLES`` lengthen
the runs.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.faults.figures import RESULTS_ENV

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "resilience.md"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
TESTS = ["tests/faults", "tests/soak"]


def render(results: list[dict[str, object]], outcome: str) -> str:
    """The figures section: one line per case, its figures as ``name=value``."""
    lines = [
        BEGIN,
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
        f"`python -m tests.faults.report` on {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}; pytest: {outcome}.",
        "",
        "| case | figures |",
        "|---|---|",
    ]
    for result in results:
        figures = ", ".join(
            f"{k}={v}" for k, v in sorted(result.items()) if k not in ("case", "at")
        )
        lines.append(f"| {result['case']} | {figures} |")
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        results_file = Path(tmp) / "results.jsonl"
        env = {**os.environ, RESULTS_ENV: str(results_file)}
        ran = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, *argv],
            cwd=ROOT, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        tail = ran.stdout.strip().splitlines()[-1] if ran.stdout.strip() else "no output"
        print(ran.stdout[-3000:], file=sys.stderr)
        text = results_file.read_text() if results_file.exists() else ""
    results = [json.loads(line) for line in text.splitlines() if line.strip()]
    doc = DOC.read_text()
    start, end = doc.index(BEGIN), doc.index(END) + len(END)
    DOC.write_text(doc[:start] + render(results, tail) + doc[end:])
    print(f"{len(results)} cases written to {DOC.relative_to(ROOT)}; pytest: {tail}")
    return ran.returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
