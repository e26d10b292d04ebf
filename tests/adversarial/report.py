"""Regenerate the figures of docs/security.md from a real run of the adversarial suite.

    python -m tests.adversarial.report [--catalogue PATH] [--dry-run]

Runs ``pytest tests/adversarial`` with ``GATEWAY_ADVERSARIAL_RESULTS`` pointing at a
temporary JSON file (written by tests/adversarial/conftest.py), counts the catalogue IDs
the passing tests cover against the IDs in the catalogue, and rewrites the part of
docs/security.md between the ``figures:begin`` and ``figures:end`` markers. Nothing in
that section is typed in by hand. Exits non-zero if any adversarial test failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from gateway.config import LimitsConfig

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"
DEFAULT_CATALOGUE = ROOT.parent / "shared" / "research" / "reliability-catalogue.md"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
# The catalogue families issue 8 is about; the others (RES-, STR-, WS-, ...) belong to
# the fault and soak suites.
FAMILIES = ("SMUG", "HOST", "HDR", "XFF", "UPR", "TEN")
_ID_RE = re.compile(r"^\| ([A-Z]+-\d+)\b", re.MULTILINE)


def catalogue_ids(path: Path) -> list[str]:
    """Every ID in the catalogue's tables, in order, without duplicates."""
    seen: dict[str, None] = {}
    for match in _ID_RE.finditer(path.read_text(encoding="utf-8")):
        seen[match.group(1)] = None
    return list(seen)


def run_suite(results: Path) -> tuple[int, float]:
    """Run the adversarial tests; (pytest's exit code, seconds)."""
    env = {**os.environ, "GATEWAY_ADVERSARIAL_RESULTS": str(results)}
    started = time.monotonic()
    code = subprocess.call(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/adversarial"],
        cwd=ROOT,
        env=env,
    )
    return code, time.monotonic() - started


def figures_markdown(data: dict[str, Any], ids: list[str], seconds: float) -> str:
    """The figures section from one run's results."""
    tests = data["tests"]
    passed = [t for t in tests if t["outcome"] == "passed"]
    failed = [t for t in tests if t["outcome"] == "failed"]
    gaps = [t for t in tests if t["outcome"] == "skipped"]  # xfail(strict) reports skipped
    covered = {i for t in passed for i in t["catalogue"]}
    figures = defaultdict(int, data["figures"])
    rates = data["rates"]
    default = LimitsConfig()
    lines = [
        f"Measured by `python -m tests.adversarial.report` on {time.strftime('%Y-%m-%d')} "
        f"({platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} cores; the suite took {seconds:.0f} s).",
        "",
        "| Figure | Value |",
        "|---|---|",
        f"| Adversarial tests | {len(passed)} passed, {len(failed)} failed, "
        f"{len(gaps)} known gaps (strict xfail) |",
        f"| Hostile inputs tried (requests, responses, route records) | {figures['inputs']} |",
        f"| Scanner requests (enumeration runs) | {figures['scanner_requests']} |",
        f"| Desyncs (upstream saw a request the gateway did not frame and answer) | "
        f"{figures['desyncs']} |",
        f"| Wrong-tenant routes | {figures['wrong_tenant_routes']} |",
        f"| SSRF / redirect canary connections | {figures['canary_hits']} |",
    ]
    if rates:
        lines += [
            f"| Scanner labels/hour, no miss budget (measured over {rates['scan_seconds']} s: "
            f"{rates['scan_tested_without_budget']} labels) | "
            f"{rates['labels_per_hour_without_budget']:,.0f} |",
            f"| Scanner labels/hour, budget {rates['budget_misses_per_window']} per "
            f"{rates['budget_window_seconds']:.0f} s (run: {rates['scan_tested_with_budget']} "
            f"labels, then {rates['scan_429_with_budget']} answers 429) | "
            f"{rates['labels_per_hour_with_budget']:,.0f} |",
            f"| Scanner labels/hour, default budget ({default.misses_per_window} per "
            f"{default.miss_window_seconds:.0f} s; the bound, not a run) | "
            f"{default.misses_per_window * 3600 / default.miss_window_seconds:,.0f} |",
        ]
    lines += ["", "Catalogue coverage (IDs with a passing test / IDs in the catalogue):", ""]
    lines += ["| Family | Covered | Not covered |", "|---|---|---|"]
    for family in FAMILIES:
        in_family = [i for i in ids if i.split("-")[0] == family]
        done = [i for i in in_family if i in covered]
        missing = [i for i in in_family if i not in covered]
        lines.append(f"| {family} | {len(done)} / {len(in_family)} | {', '.join(missing) or '-'} |")
    other = sorted(covered - {i for i in ids if i.split("-")[0] in FAMILIES})
    lines += ["", f"Also covered from other families: {', '.join(other) or 'none'}.", ""]
    lines.append("Known gaps, one strict-xfail test each (a fix makes the suite say so):")
    lines.append("")
    lines += [f"- `{t['nodeid']}` ({', '.join(t['catalogue'])})" for t in gaps] or ["- none"]
    if failed:
        lines += ["", "FAILED: " + ", ".join(t["nodeid"] for t in failed)]
    return "\n".join(lines)


def rewrite(doc: Path, section: str) -> None:
    text = doc.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    doc.write_text(text[:start] + "\n" + section + "\n" + text[end:], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalogue", type=Path, default=DEFAULT_CATALOGUE)
    parser.add_argument("--dry-run", action="store_true", help="print, don't rewrite the doc")
    args = parser.parse_args(argv)
    ids = catalogue_ids(args.catalogue)
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.json"
        code, seconds = run_suite(results)
        data = json.loads(results.read_text(encoding="utf-8"))
    section = figures_markdown(data, ids, seconds)
    print(section)
    if not args.dry_run:
        rewrite(DOC, section)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
