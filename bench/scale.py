"""Measurement 6: cache-miss lookups with a large table (1,000,000 sandboxes) in Redis.

Loading: the records are written in the gateway's exact schema (``schema.sandbox_key``,
the fields of ``schema.encode_sandbox`` plus ``gen``, and the ``gen`` counter key), as
raw pipelined RESP ``HSET``/``SET`` commands on the unix socket, 5,000 sandboxes per
round trip. Each record is running at the upstream's address with its own incarnation
and the upstream port exposed. A few are requested end to end (expect 200) to prove the
records decode.

Timing, on a fresh gateway process: sequential requests alternate between a label never
requested before (a cache miss: one Redis read) and a warm label, both for a port that is
not exposed, so each answer is the gateway's own 404 ``port_not_exposed`` with no
upstream involved: the difference is the lookup. Then ``scale_fill`` more distinct labels
are looked up over 32 connections (past the cache's ``max_entries``) while the gateway's
RSS is sampled, to show the cache's bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field

from bench import procs, stats
from bench.httpclient import HttpConnection, request_bytes
from bench.plan import Plan
from bench.report import Table, num
from bench.stack import (
    DOMAIN,
    SANDBOX_LABEL,
    UPSTREAM_HOST,
    Gateway,
    Stack,
    start_replica,
)  # fmt: skip
from gateway.config import CacheConfig
from gateway.routing import schema, store
from gateway.routing.model import PortOptions, Sandbox, State

_BATCH = 5000
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_FILL_CONNECTIONS = 32


def label_of(index: int) -> str:
    """The ``index``-th bulk label: 6 base-36 characters starting with "1" (no clash with
    the bench's own sandboxes)."""
    value = 36**5 + index
    chars = []
    while value:
        value, digit = divmod(value, 36)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def _bulk(text: str) -> bytes:
    data = text.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def sandbox_commands(index: int, template: dict[str, str], now: float) -> bytes:
    """RESP for one sandbox: HSET of its record and SET of its generation counter."""
    label = label_of(index)
    fields = dict(template)
    fields.update(id=f"{label}bench", label=label, incarnation=f"{index:016x}")
    parts = [b"*%d\r\n" % (2 + 2 * len(fields)), _bulk("HSET"), _bulk(schema.sandbox_key(label))]
    for name, value in fields.items():
        parts += [_bulk(name), _bulk(value)]
    parts += [b"*3\r\n", _bulk("SET"), _bulk(schema.gen_key(label)), _bulk("1")]
    return b"".join(parts)


def record_template(port: int, now: float) -> dict[str, str]:
    """The hash fields every bulk record shares, from the gateway's own encoder."""
    record = Sandbox(
        id="x", label="x", state=State.RUNNING, address=UPSTREAM_HOST, incarnation="x",
        gen=1, ports={port: PortOptions()}, created_at=now, updated_at=now,
    )  # fmt: skip
    return {**schema.encode_sandbox(record), "gen": "1"}


def load_table(socket_path: str, count: int, port: int) -> float:
    """Write ``count`` sandboxes; seconds taken. Raises RuntimeError on a Redis error."""
    now = time.time()
    template = record_template(port, now)
    start = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(socket_path)
        for first in range(0, count, _BATCH):
            last = min(count, first + _BATCH)
            sock.sendall(b"".join(sandbox_commands(i, template, now) for i in range(first, last)))
            expected = 2 * (last - first)
            replies = bytearray()
            while replies.count(b"\r\n") < expected:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise RuntimeError("Redis closed the connection during the load")
                replies += chunk
            if replies.startswith(b"-") or b"\r\n-" in replies:
                raise RuntimeError(f"Redis refused a write: {bytes(replies[:200])!r}")
    return time.perf_counter() - start


@dataclass(slots=True)
class ScaleResult:
    sandboxes: int
    load_seconds: float = 0.0
    redis_used_mib: float = 0.0
    end_to_end_ok: int = 0
    end_to_end_tried: int = 0
    miss_ms: stats.Percentiles | None = None
    warm_ms: stats.Percentiles | None = None
    lookup_added_ms: stats.Percentiles | None = None
    wrong_answers: int = 0
    fill_lookups: int = 0
    fill_per_s: float = 0.0
    cache_max_entries: int = CacheConfig().max_entries
    cache_entries: int | None = None
    gateway_rss_idle_kib: int = 0
    gateway_rss_after_kib: int = 0
    rss_checkpoints_kib: list[tuple[int, int]] = field(default_factory=list)


async def run_scale(stack: Stack, plan: Plan) -> ScaleResult:
    result = ScaleResult(plan.scale_sandboxes)
    socket_path = stack.redis_url.removeprefix("unix://")
    result.load_seconds = await asyncio.to_thread(
        load_table, socket_path, plan.scale_sandboxes, stack.upstream_port
    )
    client = store.open_redis(stack.redis_url)
    try:
        info = await client.info("memory")
        result.redis_used_mib = int(info["used_memory"]) / 1024 / 1024
    finally:
        await client.aclose()
    gateway = await start_replica(stack, "gateway-scale")
    try:
        await _measure(stack, gateway, plan, result)
    finally:
        stack.group.stop(gateway.proc)
    return result


async def _measure(stack: Stack, gateway: Gateway, plan: Plan, result: ScaleResult) -> None:
    port = stack.upstream_port
    closed = 1025 if port != 1025 else 1026  # never exposed on any sandbox
    miss_conn = await HttpConnection.open("127.0.0.1", gateway.port)
    warm_conn = await HttpConnection.open("127.0.0.1", gateway.port)
    warm = request_bytes("/", f"{closed}-{SANDBOX_LABEL}.{DOMAIN}")
    for _ in range(20):
        await warm_conn.request(warm)
    await asyncio.sleep(0.5)
    result.gateway_rss_idle_kib = procs.rss_kib(gateway.pid)
    next_index = 0
    # End to end: a bulk record routes to the upstream.
    for _ in range(10):
        response = await miss_conn.request(
            request_bytes("/", f"{port}-{label_of(next_index)}.{DOMAIN}")
        )
        result.end_to_end_tried += 1
        result.end_to_end_ok += response.status == 200
        next_index += 1
    misses: list[float] = []
    warms: list[float] = []
    for _ in range(plan.scale_probes):
        raw = request_bytes("/", f"{closed}-{label_of(next_index)}.{DOMAIN}")
        next_index += 1
        start = time.perf_counter()
        response = await miss_conn.request(raw)
        misses.append(time.perf_counter() - start)
        if response.headers.get(b"x-gateway-error") != b"port_not_exposed":
            result.wrong_answers += 1
        start = time.perf_counter()
        response = await warm_conn.request(warm)
        warms.append(time.perf_counter() - start)
        if response.headers.get(b"x-gateway-error") != b"port_not_exposed":
            result.wrong_answers += 1
    miss_conn.close()
    warm_conn.close()
    result.miss_ms = stats.summarize(misses, scale=1000)
    result.warm_ms = stats.summarize(warms, scale=1000)
    result.lookup_added_ms = result.miss_ms.minus(result.warm_ms)
    await _fill(gateway, closed, next_index, plan, result)
    result.cache_entries = await _cache_entries(gateway)


async def _fill(gateway: Gateway, closed: int, first: int, plan: Plan, result: ScaleResult) -> None:
    total = min(plan.scale_fill, plan.scale_sandboxes - first)
    indices = iter(range(first, first + total))
    checkpoint = max(1, total // 4)
    done = 0
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal done
        conn = await HttpConnection.open("127.0.0.1", gateway.port)
        try:
            for index in indices:
                response = await conn.request(
                    request_bytes("/", f"{closed}-{label_of(index)}.{DOMAIN}")
                )
                if response.headers.get(b"x-gateway-error") != b"port_not_exposed":
                    result.wrong_answers += 1
                done += 1
                if done % checkpoint == 0:
                    result.rss_checkpoints_kib.append((done, procs.rss_kib(gateway.pid)))
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(_FILL_CONNECTIONS)))
    elapsed = time.perf_counter() - start
    result.fill_lookups = done
    result.fill_per_s = done / elapsed if elapsed else 0.0
    await asyncio.sleep(0.5)
    result.gateway_rss_after_kib = procs.rss_kib(gateway.pid)


async def _cache_entries(gateway: Gateway) -> int | None:
    conn = await HttpConnection.open("127.0.0.1", gateway.admin_port)
    try:
        response = await conn.request(request_bytes("/metrics", f"127.0.0.1:{gateway.admin_port}"))
    finally:
        conn.close()
    for line in response.body.decode(errors="replace").splitlines():
        if line.startswith("gateway_route_cache_entries "):
            with contextlib.suppress(ValueError):
                return int(float(line.split()[1]))
    return None


def scale_table(result: ScaleResult) -> Table:
    table = Table(
        f"6. Cache-miss lookups with {result.sandboxes:,} sandboxes in Redis, ms",
        ["request", "count", "p50", "p90", "p99", "max"],
    )
    series = [
        ("cache miss (Redis read)", result.miss_ms),
        ("warm (cache hit)", result.warm_ms),
        ("added by the miss", result.lookup_added_ms),
    ]
    for name, p in series:
        if p is not None:
            table.rows.append(
                [name, str(p.count), num(p.p50, 3), num(p.p90, 3), num(p.p99, 3), num(p.max, 2)]
            )
    checkpoints = ", ".join(f"{n:,}: {num(k / 1024, 1)}" for n, k in result.rss_checkpoints_kib)
    table.notes += [
        f"table loaded in {num(result.load_seconds, 1)} s (pipelined HSET+SET, exact schema); "
        f"Redis used_memory {num(result.redis_used_mib, 0)} MiB; end to end through bulk "
        f"records: {result.end_to_end_ok}/{result.end_to_end_tried} answered 200.",
        "sequential requests, alternating miss and warm, each a 404 port_not_exposed from "
        f"the gateway (no upstream); wrong answers: {result.wrong_answers}.",
        f"gateway RSS: {num(result.gateway_rss_idle_kib / 1024, 1)} MiB fresh with the table "
        f"loaded; {num(result.gateway_rss_after_kib / 1024, 1)} MiB after "
        f"{result.fill_lookups:,} more distinct lookups ({num(result.fill_per_s, 0)}/s over "
        f"{_FILL_CONNECTIONS} connections); cache entries {result.cache_entries} "
        f"(max_entries {result.cache_max_entries:,}); RSS MiB by lookups: {checkpoints}.",
    ]
    return table
