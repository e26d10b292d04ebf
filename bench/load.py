"""Measurements 1 and 2: small-response throughput (wrk) and added latency (open loop).

1. ``run_throughput``: ``wrk -t1 -cN -dS --latency`` against direct, nginx and the
   gateway, alternating, ``plan.rounds`` times. For each run, the CPU time the proxy
   processes used (/proc/PID/stat utime+stime: the nginx worker, the gateway process)
   divided by the requests wrk completed: CPU microseconds per request, which a slow
   load generator cannot flatter. Headline: gateway/nginx req/s, and nginx/gateway CPU
   per request (the same ratio measured by cost instead of by rate).
2. ``run_latency``: an open-loop client sends ``GET /`` at a constant rate over a pool
   of keep-alive connections. Each request's latency runs from the moment the scheduler
   dispatched it (a request that finds no free connection waits, and the wait counts) to
   the end of its response; how late the scheduler itself woke (event-loop timers have
   1 ms granularity) is reported separately, not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from dataclasses import dataclass, field

from bench import procs, stats
from bench.httpclient import HttpConnection, Response, request_bytes
from bench.plan import Plan
from bench.report import Table, num, times
from bench.stack import Stack, Target

SEQUENTIAL = " (one at a time)"
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def rotated(targets: list[Target], round_index: int) -> list[Target]:
    """The targets in a different order each round, so none always goes first."""
    shift = round_index % len(targets)
    return targets[shift:] + targets[:shift]


# ---------------------------------------------------------------------------------------
# 1. wrk
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class WrkRun:
    target: str
    round: int
    requests: int
    seconds: float
    req_per_s: float
    latency_ms: dict[str, float]  # wrk's own (closed loop) p50/p75/p90/p99
    non_2xx: int
    socket_errors: int
    proxy_cpu_us_per_req: float | None  # None for direct
    proxy_cpu_share: float | None  # proxy CPU seconds per wall second (1.0 = one core)
    upstream_cpu_us_per_req: float


@dataclass(slots=True)
class ThroughputSummary:
    target: str
    req_per_s: float
    p50_ms: float
    p99_ms: float
    proxy_cpu_us_per_req: float
    proxy_cpu_share: float
    upstream_cpu_us_per_req: float


@dataclass(slots=True)
class ThroughputResult:
    command: str
    runs: list[WrkRun] = field(default_factory=list)
    summary: dict[str, ThroughputSummary] = field(default_factory=dict)
    gateway_vs_nginx: float = float("nan")  # req/s ratio (target >= 0.6)
    gateway_vs_nginx_by_cpu: float = float("nan")  # nginx CPU/req over gateway CPU/req
    gateway_vs_direct: float = float("nan")


def wrk_argv(target: Target, *, seconds: int, connections: int) -> list[str]:
    return [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
        "-H", f"Host: {target.host_header}", f"http://{target.host}:{target.port}/",
    ]  # fmt: skip


def parse_wrk(text: str) -> tuple[int, float, dict[str, float], int, int]:
    """(requests, seconds, latency percentiles in ms, non-2xx count, socket errors).

    Raises:
        ValueError: not a wrk report.
    """
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if done is None:
        raise ValueError(f"not a wrk report: {text[-500:]!r}")
    seconds = float(done.group(2)) * _UNITS_MS[done.group(3)] / 1000
    latency = {
        f"p{m.group(1)}": float(m.group(2)) * _UNITS_MS[m.group(3)]
        for m in re.finditer(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.MULTILINE)
    }
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    socket_errors = sum(int(g) for g in errors.groups()) if errors else 0
    return (
        int(done.group(1)),
        seconds,
        latency,
        int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors,
    )


async def wrk_once(
    stack: Stack, target: Target, *, seconds: int, connections: int, round_index: int
) -> WrkRun:
    """One wrk run with the proxy's and the upstream's CPU measured around it."""
    group = stack.group
    upstream = stack.upstream.pid
    cpu_before = procs.cpu_seconds_of(target.proxy_pids)
    upstream_before = procs.cpu_seconds(upstream)
    wall = time.monotonic()
    result = await group.run(
        "wrk", wrk_argv(target, seconds=seconds, connections=connections),
        cpus=stack.cpus(stack.layout.load), time_limit=seconds + 30,
    )  # fmt: skip
    wall = time.monotonic() - wall
    proxy_cpu = procs.cpu_seconds_of(target.proxy_pids) - cpu_before
    upstream_cpu = procs.cpu_seconds(upstream) - upstream_before
    requests, run_seconds, latency, non_2xx, socket_errors = parse_wrk(result.stdout)
    per_request = 1e6 / requests if requests else float("nan")
    return WrkRun(
        target=target.name,
        round=round_index,
        requests=requests,
        seconds=run_seconds,
        req_per_s=requests / run_seconds if run_seconds else 0.0,
        latency_ms=latency,
        non_2xx=non_2xx,
        socket_errors=socket_errors,
        proxy_cpu_us_per_req=proxy_cpu * per_request if target.proxy_pids else None,
        proxy_cpu_share=proxy_cpu / wall if target.proxy_pids else None,
        upstream_cpu_us_per_req=upstream_cpu * per_request,
    )


async def run_throughput(stack: Stack, plan: Plan) -> ThroughputResult:
    targets = stack.targets()
    result = ThroughputResult(
        command=" ".join(
            wrk_argv(targets[0], seconds=plan.wrk_seconds, connections=plan.wrk_connections)[:5]
        )
        + " -H 'Host: ...' URL"
    )
    for target in targets:  # warm-up: pools filled, caches hot, code paths taken
        await wrk_once(stack, target, seconds=plan.wrk_warmup_seconds,
                       connections=plan.wrk_connections, round_index=-1)  # fmt: skip
    for round_index in range(plan.rounds):
        for target in rotated(targets, round_index):
            result.runs.append(
                await wrk_once(stack, target, seconds=plan.wrk_seconds,
                               connections=plan.wrk_connections, round_index=round_index)
            )  # fmt: skip
    for target in targets:
        runs = [r for r in result.runs if r.target == target.name]
        result.summary[target.name] = ThroughputSummary(
            target=target.name,
            req_per_s=stats.median([r.req_per_s for r in runs]),
            p50_ms=stats.median([r.latency_ms.get("p50", float("nan")) for r in runs]),
            p99_ms=stats.median([r.latency_ms.get("p99", float("nan")) for r in runs]),
            proxy_cpu_us_per_req=stats.median(
                [r.proxy_cpu_us_per_req for r in runs if r.proxy_cpu_us_per_req is not None]
            ),
            proxy_cpu_share=stats.median(
                [r.proxy_cpu_share for r in runs if r.proxy_cpu_share is not None]
            ),
            upstream_cpu_us_per_req=stats.median([r.upstream_cpu_us_per_req for r in runs]),
        )
    s = result.summary
    result.gateway_vs_nginx = stats.ratio(s["gateway"].req_per_s, s["nginx"].req_per_s)
    result.gateway_vs_nginx_by_cpu = stats.ratio(
        s["nginx"].proxy_cpu_us_per_req, s["gateway"].proxy_cpu_us_per_req
    )
    result.gateway_vs_direct = stats.ratio(s["gateway"].req_per_s, s["direct"].req_per_s)
    return result


def throughput_table(result: ThroughputResult, plan: Plan) -> Table:
    table = Table(
        "1. Small responses (13 B), closed loop",
        ["target", "req/s", "p50 ms", "p99 ms", "proxy CPU µs/req", "proxy CPU share",
         "upstream CPU µs/req"],
    )  # fmt: skip
    for summary in result.summary.values():
        table.rows.append([
            summary.target, num(summary.req_per_s, 0), num(summary.p50_ms, 2),
            num(summary.p99_ms, 2), num(summary.proxy_cpu_us_per_req, 1),
            num(summary.proxy_cpu_share, 2), num(summary.upstream_cpu_us_per_req, 1),
        ])  # fmt: skip
    bad = [r for r in result.runs if r.non_2xx or r.socket_errors]
    table.notes += [
        f"`{result.command}`, {plan.rounds} round(s) of {plan.wrk_seconds} s per target, "
        f"alternating, after a {plan.wrk_warmup_seconds} s warm-up; medians. Latencies are "
        "wrk's (closed loop).",
        f"gateway/nginx: {times(result.gateway_vs_nginx)} by req/s, "
        f"{times(result.gateway_vs_nginx_by_cpu)} by proxy CPU per request "
        f"(target >= 0.6x); gateway/direct {times(result.gateway_vs_direct)}.",
        "proxy CPU share: proxy CPU seconds per wall second (1.00 = one core saturated).",
    ]
    if bad:
        table.notes.append(
            "errors: " + ", ".join(f"{r.target} r{r.round}: {r.non_2xx} non-2xx, "
                                   f"{r.socket_errors} socket" for r in bad)
        )  # fmt: skip
    return table


# ---------------------------------------------------------------------------------------
# 2. open loop
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class OpenLoopRun:
    latencies_s: list[float]
    lateness_s: list[float]
    errors: int
    not_ok: int
    connections_opened: int


class _OpenLoop:
    """The connection pool and completion bookkeeping of one ``open_loop`` run."""

    def __init__(self, target: Target, raw: bytes, total: int, connections: int) -> None:
        self.target = target
        self.raw = raw
        self.total = total
        self.run = OpenLoopRun([], [], 0, 0, connections)
        self.idle: deque[HttpConnection] = deque()
        self.waiting: deque[float] = deque()  # dispatch times of requests with no connection
        self.finished = asyncio.Event()
        self.done = 0
        self.reopening: set[asyncio.Task[None]] = set()

    def offer(self, dispatched: float) -> None:
        """A request is due: send it on an idle connection, or queue it for the next one."""
        if self.idle:
            self._send(self.idle.popleft(), dispatched)
        else:
            self.waiting.append(dispatched)

    def _send(self, conn: HttpConnection, dispatched: float) -> None:
        conn.send(self.raw).add_done_callback(lambda f: self._complete(conn, dispatched, f))

    def _complete(
        self, conn: HttpConnection, dispatched: float, future: asyncio.Future[Response]
    ) -> None:
        now = time.perf_counter()
        self.done += 1
        if future.exception() is not None:
            self.run.errors += 1
        else:
            self.run.latencies_s.append(now - dispatched)
            self.run.not_ok += future.result().status != 200
        if conn.broken:
            task = asyncio.ensure_future(self._reopen())
            self.reopening.add(task)
            task.add_done_callback(self.reopening.discard)
        else:
            self._release(conn)
        if self.done == self.total:
            self.finished.set()

    def _release(self, conn: HttpConnection) -> None:
        if self.waiting:
            self._send(conn, self.waiting.popleft())
        else:
            self.idle.append(conn)

    async def _reopen(self) -> None:
        self.run.connections_opened += 1
        self._release(await HttpConnection.open(self.target.host, self.target.port))

    async def close(self) -> None:
        for conn in self.idle:
            conn.close()
        for task in list(self.reopening):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def open_loop(
    target: Target, *, rate: float, seconds: float, connections: int, path: str = "/"
) -> OpenLoopRun:
    """Send ``rate`` requests per second for ``seconds``; see the module docstring."""
    state = _OpenLoop(target, request_bytes(path, target.host_header), int(rate * seconds),
                      connections)  # fmt: skip
    for _ in range(connections):
        state.idle.append(await HttpConnection.open(target.host, target.port))
    start = time.perf_counter() + 0.01
    try:
        for i in range(state.total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.perf_counter()
            state.run.lateness_s.append(now - due)
            state.offer(now)
        if state.total:
            await asyncio.wait_for(state.finished.wait(), timeout=30)
    finally:
        await state.close()
    return state.run


@dataclass(slots=True)
class LatencyResult:
    rate: int
    seconds_per_run: float
    rounds: int
    connections: int
    percentiles_ms: dict[str, stats.Percentiles] = field(default_factory=dict)
    added_ms: dict[str, stats.Percentiles] = field(default_factory=dict)  # minus direct
    scheduler_late_p99_ms: float = float("nan")
    errors: dict[str, int] = field(default_factory=dict)
    rounds_ms: dict[str, list[stats.Percentiles]] = field(default_factory=dict)  # per round
    pooled_ms: dict[str, stats.Percentiles] = field(default_factory=dict)  # all samples


async def one_at_a_time(target: Target, *, count: int) -> list[float]:
    """Seconds per ``GET /`` sent back to back on one connection (closed loop, 1 deep)."""
    conn = await HttpConnection.open(target.host, target.port)
    raw = request_bytes("/", target.host_header)
    samples = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            await conn.request(raw)
            samples.append(time.perf_counter() - start)
    finally:
        conn.close()
    return samples


async def run_latency(stack: Stack, plan: Plan) -> LatencyResult:
    """Open-loop rounds, then one-at-a-time rounds (rows with the ``SEQUENTIAL`` suffix).

    Each row's percentiles are the medians over rounds of that round's percentiles, so
    one round hit by outside load does not decide the row; ``pooled_ms`` keeps the
    percentiles over all samples.
    """
    targets = stack.targets()
    result = LatencyResult(plan.latency_rate, plan.latency_seconds, plan.rounds,
                           plan.latency_connections)  # fmt: skip
    samples: dict[str, list[float]] = {}
    lateness: list[float] = []

    def record(row: str, values: list[float]) -> None:
        samples.setdefault(row, []).extend(values)
        result.rounds_ms.setdefault(row, []).append(stats.summarize(values, scale=1000))

    for target in targets:  # warm-up
        await open_loop(
            target, rate=plan.latency_rate, seconds=0.5, connections=plan.latency_connections
        )
    for round_index in range(plan.rounds):
        for target in rotated(targets, round_index):
            run = await open_loop(
                target, rate=plan.latency_rate, seconds=plan.latency_seconds,
                connections=plan.latency_connections,
            )  # fmt: skip
            record(target.name, run.latencies_s)
            lateness += run.lateness_s
            result.errors[target.name] = result.errors.get(target.name, 0) + run.errors + run.not_ok
    for round_index in range(plan.rounds):
        for target in rotated(targets, round_index):
            count = plan.latency_rate * 2 // plan.rounds
            record(target.name + SEQUENTIAL, await one_at_a_time(target, count=count))
    for row, values in samples.items():
        result.pooled_ms[row] = stats.summarize(values, scale=1000)
        result.percentiles_ms[row] = stats.median_of(result.rounds_ms[row])
    for suffix in ("", SEQUENTIAL):
        direct = result.percentiles_ms["direct" + suffix]
        for name in (t.name for t in targets if t.name != "direct"):
            result.added_ms[name + suffix] = result.percentiles_ms[name + suffix].minus(direct)
    result.scheduler_late_p99_ms = stats.summarize(lateness, scale=1000).p99
    return result


def latency_table(result: LatencyResult) -> Table:
    table = Table(
        f"2. Latency at a constant {result.rate} req/s (open loop), ms",
        ["target", "p50", "p90", "p99", "max", "added p50", "added p90", "added p99"],
    )
    for name, p in result.percentiles_ms.items():
        added = result.added_ms.get(name)
        table.rows.append([
            name, num(p.p50, 3), num(p.p90, 3), num(p.p99, 3), num(p.max, 2),
            num(added.p50, 3) if added else "-", num(added.p90, 3) if added else "-",
            num(added.p99, 3) if added else "-",
        ])  # fmt: skip
    table.notes += [
        f"{result.rate} req/s of GET / for {result.seconds_per_run:g} s per target per round, "
        f"{result.rounds} round(s) alternating, over {result.connections} keep-alive "
        "connections (Python asyncio client, uvloop); added = target - direct, "
        "percentile by percentile (target: gateway added p99 <= 1 ms). Rows '(one at a "
        "time)': back-to-back requests on one connection, so no CPU sits idle between them; "
        "on these VMs waking an idle vCPU costs up to milliseconds (haltpoll polling is off), "
        "which the open-loop rows include and these do not.",
        f"latency counts from dispatch, including any wait for a free connection; the "
        f"scheduler's own wake-up lateness (p99 {num(result.scheduler_late_p99_ms, 3)} ms) "
        "is not counted.",
        "each cell is the median over rounds; p99 of each open-loop round: "
        + "; ".join(
            f"{name} " + ", ".join(num(p.p99, 3) for p in rounds)
            for name, rounds in result.rounds_ms.items()
            if SEQUENTIAL not in name
        ),
        "errors (failed or non-200): " + ", ".join(f"{k} {v}" for k, v in result.errors.items()),
    ]
    return table
