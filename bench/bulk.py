"""Measurement 3: bulk streaming, download and upload, through each target.

A download is ``GET /bytes?size=N`` (the upstream streams N bytes with Content-Length);
an upload is ``POST /upload`` with a Content-Length body of N bytes (the upstream
counts and discards it and answers the count, which is checked). The client is a
blocking socket in a worker thread (1 MiB reads and writes, so it is far faster than
what it measures); time runs from the first byte sent to the last byte received.

Each proxy's CPU per GiB moved is its threads' run time over the transfer (schedstat,
so short transfers are measured to the nanosecond): the steadier number where a
floating throughput moves with the machine, as CPU per request is for small responses.

While a transfer runs through the gateway, the gateway's VmRSS is sampled every 10 ms;
the result keeps the RSS before and the peak during (and VmHWM after resetting it with
``clear_refs``, where the kernel allows), so "memory flat" can be checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field

from bench import procs, stats
from bench.load import rotated
from bench.plan import MIB, Plan
from bench.report import Table, num, times
from bench.stack import Stack, Target

_BLOCK = 1024 * 1024
_ZEROS = memoryview(bytes(_BLOCK))


def _read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and the body bytes read past the head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before the response head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def download(target: Target, size: int) -> float:
    """Seconds to receive ``size`` bytes from ``/bytes``.

    Raises:
        ConnectionError: a short or wrong response.
    """
    with socket.create_connection((target.host, target.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        sock.sendall(
            f"GET /bytes?size={size} HTTP/1.1\r\nHost: {target.host_header}\r\n\r\n".encode()
        )
        status, headers, rest = _read_head(sock)
        if status != 200 or int(headers.get("content-length", "-1")) != size:
            raise ConnectionError(f"download from {target.name}: {status} {headers}")
        received = len(rest)
        buffer = bytearray(_BLOCK)
        while received < size:
            count = sock.recv_into(buffer)
            if not count:
                raise ConnectionError(f"download from {target.name}: short by {size - received}")
            received += count
        return time.perf_counter() - start


def upload(target: Target, size: int) -> float:
    """Seconds to send ``size`` bytes to ``/upload`` and get its (checked) answer."""
    with socket.create_connection((target.host, target.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        sock.sendall(
            f"POST /upload HTTP/1.1\r\nHost: {target.host_header}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n".encode()
        )
        left = size
        while left:
            block = min(left, _BLOCK)
            sock.sendall(_ZEROS if block == _BLOCK else _ZEROS[:block])
            left -= block
        status, headers, rest = _read_head(sock)
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        elapsed = time.perf_counter() - start
        if status != 200 or rest.strip() != str(size).encode():
            raise ConnectionError(f"upload to {target.name}: {status} {rest[:200]!r}")
        return elapsed


@dataclass(slots=True)
class Transfer:
    target: str
    direction: str
    round: int
    seconds: float
    mib_per_s: float
    proxy_cpu_seconds: float | None = None  # None: direct
    gateway_rss_before_kib: int | None = None
    gateway_rss_peak_kib: int | None = None
    gateway_hwm_kib: int | None = None


@dataclass(slots=True)
class BulkResult:
    bytes: int
    transfers: list[Transfer] = field(default_factory=list)
    mib_per_s: dict[str, dict[str, float]] = field(default_factory=dict)  # direction->target
    vs_direct: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu_s_per_gib: dict[str, dict[str, float | None]] = field(default_factory=dict)
    gateway_rss_growth_kib: int = 0  # worst peak - before, over all gateway transfers


async def _sample_peak(pid: int, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        with contextlib.suppress(OSError):
            peak = max(peak, procs.rss_kib(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.01)
    return peak


async def measure(stack: Stack, target: Target, direction: str, size: int, rnd: int) -> Transfer:
    gateway = stack.gateway.pid if target.name == "gateway" else None  # RSS sampled
    if gateway is None:
        seconds, cpu = await _timed(target, direction, size)
        return Transfer(target.name, direction, rnd, seconds, size / MIB / seconds, cpu)
    before = procs.rss_kib(gateway)
    hwm_reset = procs.reset_peak_rss(gateway)
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(_sample_peak(gateway, stop))
    try:
        seconds, cpu = await _timed(target, direction, size)
    finally:
        stop.set()
        peak = await sampler
    hwm = procs.status_kib(gateway, "VmHWM") if hwm_reset else None
    return Transfer(
        target.name, direction, rnd, seconds, size / MIB / seconds, cpu, before, peak, hwm
    )


async def _timed(target: Target, direction: str, size: int) -> tuple[float, float | None]:
    """The transfer's seconds, and the CPU seconds its proxy spent (None: direct)."""
    transfer = download if direction == "download" else upload
    cpu_before = procs.run_seconds_of(target.proxy_pids)
    seconds = await asyncio.to_thread(transfer, target, size)
    cpu = procs.run_seconds_of(target.proxy_pids) - cpu_before
    return seconds, cpu if target.proxy_pids else None


async def run_bulk(stack: Stack, plan: Plan) -> BulkResult:
    """Floating first (the headline), then pinned (see ``bench.stack``); rows per variant."""
    targets = stack.bulk_targets()
    result = BulkResult(plan.bulk_bytes)
    for target in targets:  # warm-up: a small transfer each way
        for direction in ("download", "upload"):
            await measure(stack, target, direction, 4 * MIB, -1)
    rows: list[tuple[str, str]] = []  # (row name, its direct row)
    for suffix, pinned in stack.variants():
        stack.set_pinned(pinned)
        rows += [(t.name + suffix, "direct" + suffix) for t in targets]
        for rnd in range(plan.bulk_rounds):
            for target in rotated(targets, rnd):
                for direction in ("download", "upload"):
                    transfer = await measure(stack, target, direction, plan.bulk_bytes, rnd)
                    transfer.target += suffix
                    result.transfers.append(transfer)
    stack.set_pinned(False)
    for direction in ("download", "upload"):
        speeds = {
            row: stats.median([x.mib_per_s for x in _transfers_of(result, row, direction)])
            for row, _ in rows
        }
        result.mib_per_s[direction] = speeds
        result.vs_direct[direction] = {row: stats.ratio(speeds[row], speeds[d]) for row, d in rows}
        result.cpu_s_per_gib[direction] = {
            row: _median_cpu_per_gib(result, row, direction) for row, _ in rows
        }
    growth = [
        max(x.gateway_rss_peak_kib or 0, x.gateway_hwm_kib or 0) - (x.gateway_rss_before_kib or 0)
        for x in result.transfers
        if x.gateway_rss_before_kib is not None
    ]
    result.gateway_rss_growth_kib = max(growth, default=0)
    return result


def _transfers_of(result: BulkResult, row: str, direction: str) -> list[Transfer]:
    """The transfers of one table row (target and variant) in one direction."""
    return [x for x in result.transfers if (x.target, x.direction) == (row, direction)]


def _median_cpu_per_gib(result: BulkResult, row: str, direction: str) -> float | None:
    cpu = [
        x.proxy_cpu_seconds
        for x in _transfers_of(result, row, direction)
        if x.proxy_cpu_seconds is not None
    ]
    return stats.median(cpu) * (1024 * MIB) / result.bytes if cpu else None


def _direct_spread(result: BulkResult) -> str:
    """``download 1,402-4,185, pinned 1,999-3,438; upload ...``: how far the baseline
    itself moves between rounds, which every ratio in the table divides by."""
    parts = []
    for direction in ("download", "upload"):
        spans = []
        for row in [name for name in result.mib_per_s[direction] if name.startswith("direct")]:
            speeds = [x.mib_per_s for x in _transfers_of(result, row, direction)]
            label = "" if row == "direct" else "pinned "
            spans.append(f"{label}{num(min(speeds), 0)}-{num(max(speeds), 0)}")
        parts.append(f"{direction} {', '.join(spans)}")
    return "; ".join(parts)


def bulk_table(result: BulkResult, plan: Plan) -> Table:
    table = Table(
        f"3. Bulk streaming, {result.bytes // MIB} MiB per transfer",
        ["target", "download MiB/s", "vs direct", "CPU s/GiB",
         "upload MiB/s", "vs direct", "CPU s/GiB"],
    )  # fmt: skip
    for name in result.mib_per_s["download"]:
        row = [name]
        for direction in ("download", "upload"):
            row += [
                num(result.mib_per_s[direction][name], 0),
                times(result.vs_direct[direction][name]),
                num(result.cpu_s_per_gib[direction][name], 3),
            ]
        table.rows.append(row)
    rss = [x for x in result.transfers if x.gateway_rss_before_kib is not None]
    before = max((x.gateway_rss_before_kib or 0) for x in rss) if rss else 0
    table.notes += [
        f"{plan.bulk_rounds} round(s) alternating, median; one connection, blocking 1 MiB socket "
        "reads/writes (target: gateway >= 0.8x direct both ways). Rows without a suffix: "
        "every process floating on every CPU (the headline); (pinned): client + upstream on "
        "CPU 0, proxy on CPU 1, each ratio against direct pinned the same way.",
        "haproxy-splice: HAProxy in TCP mode with kernel splice (option splice-auto, one "
        "thread), no HTTP: the least CPU per byte a proxy in a third process spends here.",
        "CPU s/GiB: the proxy's CPU seconds per GiB moved (its threads' run time over each "
        "transfer, median), whatever the machine let the transfer reach.",
        f"direct's own spread, slowest-fastest transfer, MiB/s: {_direct_spread(result)}.",
        f"gateway RSS: {num(before / 1024, 1)} MiB before a transfer, at most "
        f"+{num(result.gateway_rss_growth_kib / 1024, 1)} MiB during one (sampled every "
        "10 ms, and VmHWM after clear_refs).",
    ]
    return table
