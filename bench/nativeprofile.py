"""Where the compiled gateway's time goes: Linux perf on the gateway under wrk (``--profile``).

py-spy sees Python frames only, and the request path is compiled (gateway/compiled.py):
its functions are C, invisible to it. ``perf record -e cpu-clock --call-graph dwarf``
samples the gateway process for ``native_profile_seconds`` under the same wrk load as
measurement 1 (cpu-clock is a software event: it works where hardware counters are
"not supported", as on these VMs; mypyc builds with ``-g1``, so compiled functions have
symbols and dwarf unwinding finds their callers). ``perf report`` then gives each
symbol's share of the samples with its callees (inclusive) and without (self), and the
share of each binary: the kernel, libpython, the compiled gateway, httptools, uvloop.
Needs Debian's ``linux-perf``.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from bench.plan import Plan
from bench.profile import under_wrk
from bench.report import Table, num, side_by_side
from bench.stack import Stack

_SYMBOL_LINE = re.compile(r"^\s+([\d.]+)%\s+([\d.]+)%\s+\[(.)\]\s+(\S+)")
_DSO_LINE = re.compile(r"^\s+([\d.]+)%\s+(\S.*?)\s*$")
_SAMPLES = re.compile(r"^# Samples: (\S+) of event")
_COMPILED = "CPyDef_"  # mypyc's native functions (CPyPy_ are their Python-call wrappers)

Shares = list[tuple[str, float]]


@dataclass(slots=True)
class NativeProfileResult:
    seconds: int = 0
    samples: str = ""
    wrk_req_per_s: float = 0.0
    files: list[str] = field(default_factory=list)
    top_compiled: Shares = field(default_factory=list)  # gateway functions, inclusive %
    top_self: Shares = field(default_factory=list)  # any symbol, self %
    by_binary: Shares = field(default_factory=list)  # self % per DSO


def compiled_name(symbol: str) -> str:
    """``CPyDef_front___FrontProtocol____request_of`` -> ``front.FrontProtocol._request_of``
    (mypyc joins module, class and function with three underscores)."""
    return ".".join(part for part in symbol.removeprefix(_COMPILED).split("___") if part)


def parse_symbols(report: str, *, top: int = 15) -> tuple[Shares, Shares]:
    """(compiled functions by inclusive %, any symbols by self %) from
    ``perf report --children --sort symbol --stdio -g none``."""
    inclusive: dict[str, float] = {}
    own: dict[str, float] = {}
    for line in report.splitlines():
        match = _SYMBOL_LINE.match(line)
        if match is None:
            continue
        children, self_share, kind, symbol = match.groups()
        compiled = symbol.startswith(_COMPILED)
        name = compiled_name(symbol) if compiled else symbol
        if compiled:
            inclusive[name] = max(inclusive.get(name, 0.0), float(children))
        name = "[kernel] " + name if kind == "k" else name
        own[name] = max(own.get(name, 0.0), float(self_share))

    def ranked(shares: dict[str, float]) -> Shares:
        return sorted(shares.items(), key=lambda item: -item[1])[:top]

    return ranked(inclusive), ranked(own)


def parse_binaries(report: str) -> Shares:
    """Self % per binary from ``perf report --no-children --sort dso --stdio``."""
    shares = []
    for line in report.splitlines():
        match = _DSO_LINE.match(line)
        if match is not None:  # perf's comment lines start with "#", not a share
            shares.append((match.group(2), float(match.group(1))))
    return shares


def parse_samples(report: str) -> str:
    """The sample count perf prints in the report's header ("15K"), or ""."""
    for line in report.splitlines():
        if match := _SAMPLES.match(line):
            return match.group(1)
    return ""


async def profile_native(stack: Stack, plan: Plan, outdir: Path) -> NativeProfileResult:
    if shutil.which("perf") is None:
        raise RuntimeError("perf is not installed (Debian: apt-get install linux-perf)")
    await asyncio.to_thread(outdir.mkdir, parents=True, exist_ok=True)
    seconds = plan.native_profile_seconds
    data = outdir / "gateway.perf.data"
    result = NativeProfileResult(seconds=seconds, files=[str(data)])
    result.wrk_req_per_s = await under_wrk(
        stack, plan, seconds,
        ["perf", "record", "-e", "cpu-clock", "--call-graph", "dwarf,16384", "-o", str(data),
         "-p", str(stack.gateway.pid), "--", "sleep", str(seconds)],
    )  # fmt: skip
    symbols = await _report(stack, data, "--children", "--sort", "symbol", "-g", "none")
    binaries = await _report(stack, data, "--no-children", "--sort", "dso", "-g", "none")
    result.top_compiled, result.top_self = parse_symbols(symbols)
    result.by_binary = parse_binaries(binaries)[:8]
    result.samples = parse_samples(symbols)
    return result


async def _report(stack: Stack, data: Path, *how: str) -> str:
    run = await stack.group.run(
        "perf-report", ["perf", "report", "-i", str(data), "--stdio", *how], time_limit=600
    )
    if run.returncode != 0:
        raise RuntimeError(f"perf report failed: {run.stderr.strip()[-500:]}")
    return run.stdout


def native_profile_table(result: NativeProfileResult) -> Table:
    table = side_by_side(
        "Profile: the gateway under wrk (perf), % of samples",
        ["compiled function (inclusive)", "incl. %", "symbol (self)", "self %"],
        result.top_compiled, result.top_self,
    )  # fmt: skip
    binaries = ", ".join(f"{name} {num(pct, 1)}%" for name, pct in result.by_binary)
    table.notes += [
        f"{result.samples} samples (perf record -e cpu-clock --call-graph dwarf) over "
        f"{result.seconds} s while wrk ran {num(result.wrk_req_per_s, 0)} req/s through the "
        "gateway; perf's unwinding costs the gateway some speed meanwhile.",
        f"self time by binary: {binaries}.",
        "left: the gateway's compiled functions (mypyc, gateway/compiled.py) with what they "
        "call; right: where the CPU was when sampled, kernel included ([kernel]).",
        "files: " + ", ".join(result.files),
    ]
    return table
