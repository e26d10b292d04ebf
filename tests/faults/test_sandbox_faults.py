"""Sandbox faults (issue 9, point 3): resets, black holes, slow links, through the relay.

The faulty sandbox is the echo upstream behind a ``FaultRelay`` (its route points at the
relay on 127.0.0.1); a second sandbox, reached directly, is the other tenant whose
latency is measured during each fault (reported, only its success asserted). Every
case must end in a clear status (502/504 with X-Gateway-Error) or an aborted stream
within its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import pytest_asyncio
import redis.asyncio as aioredis

from gateway.routing.store import RouteWriter
from tests.faults.figures import record
from tests.support.faultrelay import FaultRelay
from tests.support.gateway import GatewayHandle, route_writer, running_gateway
from tests.support.rawhttp import IncompleteBody, RawConnection, exchange, request_bytes
from tests.support.upstreams import Upstream, echo_app, start_upstream

CONNECT_SECONDS, RESPONSE_SECONDS = 1.0, 1.5
_T = TypeVar("_T")
OVERRIDES = {
    "upstream": {"connect_timeout_seconds": CONNECT_SECONDS,
                 "response_timeout_seconds": RESPONSE_SECONDS},
}  # fmt: skip


@pytest_asyncio.fixture
async def gateway(redis: aioredis.Redis, redis_url: str) -> AsyncIterator[GatewayHandle]:
    async with running_gateway(redis_url, OVERRIDES) as handle:
        yield handle


@pytest_asyncio.fixture
async def writer(gateway: GatewayHandle, redis_url: str) -> AsyncIterator[RouteWriter]:
    async with route_writer(redis_url) as w:
        yield w


@pytest_asyncio.fixture
async def faulty() -> AsyncIterator[FaultRelay]:
    server = await start_upstream("127.0.0.1", echo_app("faulty"))
    try:
        async with FaultRelay("127.0.0.1", server.port) as relay:
            yield relay
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def hosts(
    writer: RouteWriter, gateway: GatewayHandle, faulty: FaultRelay, upstream: Upstream
) -> tuple[str, str]:
    """(faulty host, other tenant's host)."""
    await writer.create("faulty01", address="127.0.0.1")
    await writer.expose("faulty01", faulty.port)
    await writer.create("tenant01", address="127.0.0.2")
    await writer.expose("tenant01", upstream.port)
    return gateway.host(faulty.port, "faulty"), gateway.host(upstream.port, "tenant")


async def _tenant_latency(
    gateway: GatewayHandle, host: str, fault: Awaitable[_T]
) -> tuple[_T, list[float]]:
    """Run ``fault`` while the other tenant is asked every 20 ms; its answers must be 200.
    Returns the fault's result and the tenant's latencies in ms."""
    task = asyncio.ensure_future(fault)
    samples: list[float] = []
    while not task.done() and len(samples) < 500:  # bounded: 500 requests
        started = time.monotonic()
        response = await exchange(
            "127.0.0.1", gateway.port, request_bytes("GET", "/", [("Host", host)])
        )
        assert response.status == 200, "the other tenant was disturbed"
        samples.append((time.monotonic() - started) * 1000)
        await asyncio.sleep(0.02)
    return await task, samples


def _p50_max(samples: list[float]) -> tuple[float, float]:
    return (round(statistics.median(samples), 1), round(max(samples), 1)) if samples else (0, 0)


async def _timed_code(gateway: GatewayHandle, data: bytes, wait: float) -> tuple[str, float]:
    started = time.monotonic()
    try:
        response = await exchange("127.0.0.1", gateway.port, data, wait=wait)
        code = response.header("X-Gateway-Error") or str(response.status)
    except (IncompleteBody, ConnectionError):
        code = "aborted"
    return code, time.monotonic() - started


async def test_reset_mid_response_body_aborts_the_stream(
    gateway: GatewayHandle, faulty: FaultRelay, hosts: tuple[str, str]
) -> None:
    """The sandbox's connection reset inside a 4 MiB body: the client's stream is cut
    (never a complete-looking body), within seconds; the other tenant is served."""
    host, tenant = hosts
    faulty.faults.bytes_per_second = 1_000_000
    size = 4 * 1024 * 1024

    async def fault() -> tuple[str, float]:
        started = time.monotonic()
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            await conn.send(request_bytes("GET", f"/bytes?size={size}", [("Host", host)]))
            status, *_ = await conn.read_head()
            assert status == 200
            await asyncio.sleep(0.3)  # part of the body is on its way
            faulty.reset()
            try:
                body = await conn.read_until_close(wait=10)
                outcome = "aborted" if len(body) < size else "complete"
            except (IncompleteBody, ConnectionError):
                outcome = "aborted"
        return outcome, time.monotonic() - started

    (outcome, seconds), samples = await _tenant_latency(gateway, tenant, fault())
    assert outcome == "aborted"
    p50, worst = _p50_max(samples)
    record("sandbox_reset_mid_response", outcome=outcome, seconds=round(seconds, 2),
           tenant_p50_ms=p50, tenant_max_ms=worst)  # fmt: skip


async def test_reset_mid_request_body_is_502(
    gateway: GatewayHandle, faulty: FaultRelay, hosts: tuple[str, str]
) -> None:
    """The sandbox's connection reset while the client uploads: 502 upstream_error or an
    aborted connection, within seconds."""
    host, tenant = hosts
    faulty.faults.bytes_per_second = 200_000
    size = 2 * 1024 * 1024
    head = request_bytes("POST", "/upload", [("Host", host), ("Content-Length", str(size))])

    async def fault() -> tuple[str, float]:
        started = time.monotonic()
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            with contextlib.suppress(ConnectionError):
                await conn.send(head + b"x" * 65536)
                await asyncio.sleep(0.5)
                faulty.reset()
                for _ in range(10):  # bounded: the rest of the body, 10 pieces
                    await conn.send(b"x" * 65536)
            try:
                response = await conn.read_response(wait=10)
                code = response.header("X-Gateway-Error") or ""
                outcome = f"{response.status} {code}".strip()
            except (IncompleteBody, ConnectionError):
                outcome = "aborted"
        return outcome, time.monotonic() - started

    (outcome, seconds), samples = await _tenant_latency(gateway, tenant, fault())
    assert outcome in ("aborted", "502 upstream_error"), outcome
    assert seconds < 12
    p50, worst = _p50_max(samples)
    record("sandbox_reset_mid_request", outcome=outcome, seconds=round(seconds, 2),
           tenant_p50_ms=p50, tenant_max_ms=worst)  # fmt: skip


async def test_blackholed_response_is_504_within_the_response_timeout(
    gateway: GatewayHandle, faulty: FaultRelay, hosts: tuple[str, str]
) -> None:
    """A sandbox that accepts and never answers: 504 upstream_timeout after the 1.5 s
    response timeout (with slack), not a hang."""
    host, tenant = hosts
    faulty.faults.blackhole = True
    data = request_bytes("GET", "/", [("Host", host)])
    (code, seconds), samples = await _tenant_latency(
        gateway, tenant, _timed_code(gateway, data, 15)
    )
    assert code == "upstream_timeout"
    assert RESPONSE_SECONDS * 0.9 <= seconds <= RESPONSE_SECONDS + 3
    p50, worst = _p50_max(samples)
    record("sandbox_blackhole_response", code=code, seconds=round(seconds, 2),
           tenant_p50_ms=p50, tenant_max_ms=worst)  # fmt: skip


async def test_blackholed_connect_is_504_within_the_connect_timeout(
    gateway: GatewayHandle, writer: RouteWriter, hosts: tuple[str, str]
) -> None:
    """A listening socket with a full backlog drops SYNs: 504 upstream_timeout after the
    1 s connect timeout (with slack)."""
    _, tenant = hosts
    listener = socket.socket()
    listener.bind(("127.0.0.3", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):  # bounded: fill the accept queue until a connect would block
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.3", port))
            fillers.append(filler)
        await writer.create("hole0001", address="127.0.0.3")
        await writer.expose("hole0001", port)
        data = request_bytes("GET", "/", [("Host", gateway.host(port, "hole00"))])
        (code, seconds), samples = await _tenant_latency(
            gateway, tenant, _timed_code(gateway, data, 20)
        )
    finally:
        for s in [*fillers, listener]:
            s.close()
    assert code == "upstream_timeout", code
    assert CONNECT_SECONDS * 0.9 <= seconds <= CONNECT_SECONDS + 4
    p50, worst = _p50_max(samples)
    record("sandbox_blackhole_connect", code=code, seconds=round(seconds, 2),
           tenant_p50_ms=p50, tenant_max_ms=worst)  # fmt: skip


async def test_slow_and_sliced_sandbox_delivers_every_byte(
    gateway: GatewayHandle, faulty: FaultRelay, hosts: tuple[str, str]
) -> None:
    """A sandbox link capped at 500 KB/s in 1 KiB slices: a 1 MiB body and a 256 KiB
    upload arrive whole (slow is not broken)."""
    host, tenant = hosts
    faulty.faults.bytes_per_second = 500_000
    faulty.faults.slice_bytes = 1024
    size = 1024 * 1024

    async def fault() -> tuple[int, int]:
        get = request_bytes("GET", f"/bytes?size={size}", [("Host", host)])
        down = await exchange("127.0.0.1", gateway.port, get, wait=20)
        up = await exchange("127.0.0.1", gateway.port, request_bytes(
            "POST", "/upload", [("Host", host), ("Content-Length", str(256 * 1024))],
            b"y" * 256 * 1024), wait=20)  # fmt: skip
        assert up.status == 200 and b'"length": 262144' in up.body
        return down.status, len(down.body)

    started = time.monotonic()
    (status, length), samples = await _tenant_latency(gateway, tenant, fault())
    assert (status, length) == (200, size)
    p50, worst = _p50_max(samples)
    record("sandbox_slow_sliced", seconds=round(time.monotonic() - started, 2),
           tenant_p50_ms=p50, tenant_max_ms=worst)  # fmt: skip
