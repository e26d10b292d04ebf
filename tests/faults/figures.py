"""Measured figures of the fault, limit and soak tests, for docs/resilience.md.

A test calls ``record(case, **figures)``; when ``GATEWAY_TEST_RESULTS_FILE`` names a file
(``python -m tests.faults.report`` sets it), one JSON line per case is appended to it.
Without it the figures are dropped: an ordinary test run writes nothing.
"""

from __future__ import annotations

import json
import os
import time

RESULTS_ENV = "GATEWAY_TEST_RESULTS_FILE"


def record(case: str, **figures: float | int | str | bool) -> None:
    """Append ``{"case": case, **figures}`` to the results file, if one is set."""
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    line = json.dumps({"case": case, "at": time.time(), **figures}, sort_keys=True)
    with open(path, "a", encoding="utf-8") as out:
        out.write(line + "\n")
