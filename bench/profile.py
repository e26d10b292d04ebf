"""Where the gateway's time goes: py-spy on the gateway during a wrk run (``--profile``).

Two passes of ``profile_seconds`` each, both under the same wrk load as measurement 1:
one writes collapsed stacks (``gateway.collapsed.txt``), which ``summarize`` turns into
the top frames by own ("self") and inclusive samples and a per-package split; one writes
a flame graph (``gateway.svg``). py-spy runs with ``--nonblocking`` so sampling does not
stop the process; it sees Python frames only, so time in C code (socket writes, the
llhttp parser) shows as the self time of the Python frame that called it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import parse_wrk, wrk_argv
from bench.plan import Plan
from bench.report import Table, num, side_by_side
from bench.stack import Stack

_RATE = 250  # samples per second
_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")
# The entry chain every sampled stack of the main loop starts with; left out of the
# inclusive ranking, where it would only say "the process was running".
_ENTRY_FILES = ("<frozen runpy>", "asyncio/runners.py", "uvloop/__init__.py",
                "gateway/__main__.py", "gateway/cli.py")  # fmt: skip
_PACKAGES = ("aiohttp", "gateway", "asyncio", "uvloop", "httptools", "redis", "multidict", "yarl")


@dataclass(slots=True)
class ProfileResult:
    samples: int = 0
    seconds: int = 0
    rate: int = _RATE
    files: list[str] = field(default_factory=list)
    wrk_req_per_s: float = 0.0
    top_self: list[tuple[str, float]] = field(default_factory=list)  # (frame, % of samples)
    top_inclusive: list[tuple[str, float]] = field(default_factory=list)
    by_package: list[tuple[str, float]] = field(default_factory=list)  # self time per package


def _short_file(path: str) -> str:
    """py-spy already prints module-relative paths; shorten any absolute one the same way."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    match = re.search(r"/lib/python3\.\d+/(.*)$", path)
    return match.group(1) if match else path


def frame_name(frame: str) -> str:
    """``func (file:line)`` -> ``func (short/file.py)``: one name per function."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    return f"{match['func']} ({_short_file(match['file'])})"


def _package(frame: str) -> str:
    match = _FRAME.match(frame)
    path = match["file"] if match else frame
    short = _short_file(path)
    for package in _PACKAGES:
        if short.startswith(package + "/") or f"/{package}/" in path:
            return package
    return "other"


Shares = list[tuple[str, float]]


def _is_entry(frame: str) -> bool:
    match = _FRAME.match(frame)
    return match is not None and _short_file(match["file"]) in _ENTRY_FILES


def summarize(collapsed: str, *, top: int = 15) -> tuple[int, Shares, Shares, Shares]:
    """(samples, top self frames, top inclusive frames, self share per package), in %."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        match = _LINE.match(line.strip())
        if match is None:
            continue
        frames = match.group(1).split(";")
        count = int(match.group(2))
        total += count
        names = [frame_name(f) for f in frames]
        self_counts[names[-1]] += count
        packages[_package(frames[-1])] += count
        for frame, name in set(zip(frames, names, strict=True)):
            if not _is_entry(frame):
                inclusive[name] += count
    if not total:
        return 0, [], [], []

    def share(counter: Counter[str], limit: int) -> Shares:
        return [(name, 100.0 * n / total) for name, n in counter.most_common(limit)]

    return total, share(self_counts, top), share(inclusive, top), share(packages, len(packages))


async def profile_gateway(stack: Stack, plan: Plan, outdir: Path) -> ProfileResult:
    if shutil.which("py-spy") is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    await asyncio.to_thread(outdir.mkdir, parents=True, exist_ok=True)
    seconds = plan.profile_seconds
    result = ProfileResult(seconds=seconds)
    for fmt, name in (("raw", "gateway.collapsed.txt"), ("flamegraph", "gateway.svg")):
        path = outdir / name
        req_per_s = await under_wrk(
            stack, plan, seconds,
            ["py-spy", "record", "--pid", str(stack.gateway.pid), "--duration", str(seconds),
             "--rate", str(_RATE), "--format", fmt, "--output", str(path), "--nonblocking"],
        )  # fmt: skip
        result.files.append(str(path))
        if fmt == "raw":
            result.wrk_req_per_s = req_per_s
            summary = summarize(await asyncio.to_thread(path.read_text))
            result.samples, result.top_self, result.top_inclusive, result.by_package = summary
    return result


async def under_wrk(stack: Stack, plan: Plan, seconds: int, profiler: list[str]) -> float:
    """Run ``profiler`` (for ``seconds``) while wrk loads the gateway as in measurement 1;
    wrk's req/s.

    Raises:
        RuntimeError: the profiler failed.
    """
    run = stack.group.run(
        profiler[0], profiler, cpus=stack.cpus(stack.layout.load), time_limit=seconds + 60
    )
    load = stack.group.run(
        "wrk", wrk_argv(stack.targets()[2], seconds=seconds + 2,
                        connections=plan.wrk_connections),
        cpus=stack.cpus(stack.layout.load), time_limit=seconds + 60,
    )  # fmt: skip
    profiled, loaded = await asyncio.gather(run, load)
    if profiled.returncode != 0:
        raise RuntimeError(f"{profiler[0]} failed: {profiled.stderr.strip()[-500:]}")
    requests, run_seconds, *_ = parse_wrk(loaded.stdout)
    return requests / run_seconds if run_seconds else 0.0


def profile_table(result: ProfileResult) -> Table:
    table = side_by_side(
        "Profile: the gateway under wrk (py-spy), % of samples",
        ["frame (self)", "self %", "frame (inclusive)", "incl. %"],
        result.top_self, result.top_inclusive,
    )  # fmt: skip
    packages = ", ".join(f"{name} {num(pct, 1)}%" for name, pct in result.by_package)
    table.notes += [
        f"{result.samples} samples at {result.rate}/s over {result.seconds} s while wrk ran "
        f"{num(result.wrk_req_per_s, 0)} req/s through the gateway (py-spy --nonblocking).",
        f"self time by package: {packages}.",
        "py-spy sees Python frames only: the self time of Runner.run (asyncio/runners.py) is "
        "uvloop's own C loop (epoll, socket reads, C callbacks); stacks entered from C "
        "(protocol callbacks such as data_received) have no Python parent, so inclusive "
        "shares are a floor. The entry chain (runpy, cli, Runner.run) is left out of the "
        "inclusive column.",
        "files: " + ", ".join(result.files),
    ]
    return table
