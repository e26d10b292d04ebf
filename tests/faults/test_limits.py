"""Limits (issue 9, point 4): a per-sandbox connection limit, big heads refused, health."""

from __future__ import annotations

import contextlib
import time

import aiohttp

from gateway.routing.store import RouteWriter
from tests.faults.figures import record
from tests.support.gateway import GatewayHandle
from tests.support.rawhttp import IncompleteBody, RawConnection, exchange, request_bytes
from tests.support.upstreams import Upstream
from tests.support.waiting import wait_until


async def _healthy(gateway: GatewayHandle) -> bool:
    async with (
        aiohttp.ClientSession() as http,
        http.get(gateway.admin_url + "/healthz", timeout=aiohttp.ClientTimeout(total=2)) as r,
    ):
        return r.status == 200


async def test_connection_limit_answers_429_and_spares_other_sandboxes(
    gateway: GatewayHandle, writer: RouteWriter, upstream: Upstream
) -> None:
    """A sandbox at its record's limit (2) gets 429 rate_limited; another sandbox is served;
    once its streams end, it is served again."""
    await writer.create("greedy01", address="127.0.0.2", limits={"connections": 2})
    await writer.expose("greedy01", upstream.port)
    await writer.create("polite01", address="127.0.0.2")
    await writer.expose("polite01", upstream.port)
    greedy = gateway.host(upstream.port, "greedy")
    polite = gateway.host(upstream.port, "polite")
    stream = request_bytes("GET", "/sse?n=0&interval_ms=50", [("Host", greedy)])
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(2):
            conn = await stack.enter_async_context(RawConnection.open("127.0.0.1", gateway.port))
            await conn.send(stream)
            status, *_ = await conn.read_head()
            assert status == 200
        refused = await exchange(
            "127.0.0.1", gateway.port, request_bytes("GET", "/", [("Host", greedy)])
        )
        assert refused.status == 429
        assert refused.header("X-Gateway-Error") == "rate_limited"
        started = time.monotonic()
        other = await exchange(
            "127.0.0.1", gateway.port, request_bytes("GET", "/", [("Host", polite)])
        )
        other_ms = (time.monotonic() - started) * 1000
        assert other.status == 200
        assert await _healthy(gateway)
        # A WebSocket counts too.
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{gateway.url}/ws", headers={"Host": greedy}) as ws_refused,
        ):
            assert ws_refused.status == 429
    await wait_until(
        lambda: _status_is(gateway, greedy, 200), timeout=5, interval=0.05,
        what="the sandbox served again after its streams ended",
    )  # fmt: skip
    record("connection_limit", refused_status=429, other_tenant_ms=round(other_ms, 1))


async def _status_is(gateway: GatewayHandle, host: str, status: int) -> bool:
    response = await exchange(
        "127.0.0.1", gateway.port, request_bytes("GET", "/", [("Host", host)])
    )
    return response.status == status


async def test_many_headers_are_refused_cleanly(
    gateway: GatewayHandle, writer: RouteWriter, upstream: Upstream
) -> None:
    """A head with 1,000 headers or one 64 KiB header is answered 4xx or closed, never 5xx
    or a hang; the gateway stays healthy and serves the next request."""
    await writer.create("heads001", address="127.0.0.2")
    await writer.expose("heads001", upstream.port)
    host = gateway.host(upstream.port, "heads0")
    heads = {
        "many": [("Host", host), *((f"X-H{i}", "v") for i in range(1000))],
        "huge": [("Host", host), ("X-Big", "a" * 65536)],
    }
    outcomes: dict[str, str] = {}
    for name, pairs in heads.items():
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            with contextlib.suppress(ConnectionError):
                await conn.send(request_bytes("GET", "/", pairs))
            try:
                status, *_ = await conn.read_head(wait=5)
                outcomes[name] = str(status)
            except (ConnectionError, IncompleteBody):
                outcomes[name] = "closed"
        assert outcomes[name] == "closed" or 400 <= int(outcomes[name]) < 500, outcomes
    assert await _status_is(gateway, host, 200)
    assert await _healthy(gateway)
    record("large_heads", many_headers=outcomes["many"], huge_header=outcomes["huge"])
