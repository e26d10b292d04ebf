"""Who the client is: PROXY protocol v1/v2 and X-Forwarded-For (issue 6, point 3).

PROXY protocol, when on, is required on every connection, believed only from trusted
peers, and waited for a bounded time; the address it carries is what the sandbox sees in
X-Forwarded-For and what the access log records. X-Forwarded-For is believed only from a
trusted peer and walked from the right (the first untrusted hop is the client).
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import struct
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest_asyncio
import redis.asyncio as aioredis

from gateway.accesslog import AccessLog
from tests.integration.test_ops_drain import route_sandbox
from tests.support.gateway import GatewayHandle, running_gateway
from tests.support.rawhttp import RawConnection, RawResponse, exchange, request_bytes
from tests.support.upstreams import Upstream

SANDBOX = "opscid01"
PROXY_ON: dict[str, Any] = {"trusted_proxies": ["127.0.0.1/32"], "server": {"proxy_protocol": True}}
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v1(source: str, port: int = 51234) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    destination = "::1" if family == "TCP6" else "10.0.0.1"
    return f"PROXY {family} {source} {destination} {port} 8080\r\n".encode()


def proxy_v2(source: str, port: int = 51234, *, local: bool = False) -> bytes:
    """A PROXY v2 header (PROXY or LOCAL command) for a TCP client at ``source``."""
    address = ipaddress.ip_address(source)
    packed_destination = ipaddress.ip_address("::1" if address.version == 6 else "10.0.0.1")
    family = 0x21 if address.version == 6 else 0x11
    body = address.packed + packed_destination.packed + struct.pack("!HH", port, 8080)
    command = 0x20 if local else 0x21
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


class Gateway:
    """An in-process gateway whose access-log lines the test can read."""

    def __init__(self, handle: GatewayHandle) -> None:
        self.handle = handle
        self._stream = io.BytesIO()
        self.log = AccessLog(self._stream)
        handle.running.handler.sinks.append(self.log.sink)

    def lines(self) -> list[dict[str, Any]]:
        self.log.flush()
        return [json.loads(line) for line in self._stream.getvalue().splitlines()]

    def line_for(self, request_id: str | None) -> dict[str, Any]:
        (line,) = [entry for entry in self.lines() if entry["requestId"] == request_id]
        return line


@contextlib.asynccontextmanager
async def gateway_with(redis_url: str, overrides: Mapping[str, Any]) -> AsyncIterator[Gateway]:
    async with running_gateway(redis_url, overrides) as handle:
        yield Gateway(handle)


@pytest_asyncio.fixture
async def proxied(redis: aioredis.Redis, redis_url: str) -> AsyncIterator[Gateway]:
    """A gateway requiring PROXY protocol from 127.0.0.1 (trusted); header timeout 0.5 s."""
    overrides = {**PROXY_ON, "server": {"proxy_protocol": True,
                                        "proxy_header_timeout_seconds": 0.5}}  # fmt: skip
    async with gateway_with(redis_url, overrides) as gateway:
        yield gateway


def seen_upstream(answer: RawResponse) -> dict[str, str]:
    """The forwarding headers the echo upstream received (last value of each)."""
    assert answer.status == 200, answer.body
    info = json.loads(answer.body)
    names = {"x-forwarded-for", "x-forwarded-proto", "forwarded", "x-real-ip"}
    return {k.lower(): v for k, v in info["headers"] if k.lower() in names}


async def _send(
    gateway: Gateway, data: bytes, *, pieces: int = 1, wait: float = 5.0
) -> RawResponse:
    async with RawConnection.open("127.0.0.1", gateway.handle.port) as conn:
        step = max(1, len(data) // pieces)
        for start in range(0, len(data), step):
            await conn.send(data[start : start + step])
        return await conn.read_response(wait=wait)


def get(host: str, *extra: tuple[str, str]) -> bytes:
    return request_bytes("GET", "/who", [("Host", host), *extra])


async def test_proxy_v1_and_v2_from_a_trusted_peer(
    proxied: Gateway, redis_url: str, upstream: Upstream
) -> None:
    """The address in a v1 or v2 header reaches X-Forwarded-For and the access log."""
    host = await route_sandbox(redis_url, SANDBOX, upstream)
    cases = [
        (proxy_v1("203.0.113.7"), "203.0.113.7"),
        (proxy_v1("2001:db8::7"), "2001:db8::7"),
        (proxy_v2("198.51.100.23"), "198.51.100.23"),
        (proxy_v2("2001:db8::23"), "2001:db8::23"),
        # LOCAL (the balancer's own health check): the TCP peer stays the client.
        (proxy_v2("198.51.100.99", local=True), "127.0.0.1"),
    ]
    for header, client in cases:
        # In one write with the request, and dribbled in pieces: the same outcome.
        for pieces in (1, 7):
            answer = await _send(proxied, header + get(host), pieces=pieces)
            forwarded = seen_upstream(answer)
            assert forwarded["x-forwarded-for"] == client, (header, pieces)
            node = f'"[{client}]"' if ":" in client else client
            assert forwarded["forwarded"].startswith(f"for={node};")
            line = proxied.line_for(answer.header("X-Request-Id"))
            assert line["clientIp"] == client and line["status"] == 200


async def test_proxy_header_hides_a_spoofed_forwarded_for(
    proxied: Gateway, redis_url: str, upstream: Upstream
) -> None:
    """Behind PROXY protocol the client is the header's address, whatever XFF it sends."""
    host = await route_sandbox(redis_url, SANDBOX, upstream)
    answer = await _send(
        proxied, proxy_v1("203.0.113.7") + get(host, ("X-Forwarded-For", "6.6.6.6"),
                                              ("X-Real-IP", "6.6.6.6")),
    )  # fmt: skip
    forwarded = seen_upstream(answer)
    assert forwarded["x-forwarded-for"] == "203.0.113.7"
    assert "x-real-ip" not in forwarded
    # Keep-alive: the second request on the connection is still that client.
    async with RawConnection.open("127.0.0.1", proxied.handle.port) as conn:
        await conn.send(proxy_v2("198.51.100.5") + get(host))
        first = await conn.read_response()
        await conn.send(get(host))
        second = await conn.read_response()
    assert seen_upstream(first)["x-forwarded-for"] == "198.51.100.5"
    assert seen_upstream(second)["x-forwarded-for"] == "198.51.100.5"


async def test_proxy_protocol_from_an_untrusted_peer_is_closed(
    redis: aioredis.Redis, redis_url: str, upstream: Upstream
) -> None:
    """With 127.0.0.1 untrusted, a PROXY connection is closed without an answer."""
    overrides = {"trusted_proxies": ["10.9.9.0/24"], "server": {"proxy_protocol": True}}
    async with gateway_with(redis_url, overrides) as gateway:
        host = await route_sandbox(redis_url, SANDBOX, upstream)
        for header in (proxy_v1("203.0.113.7"), proxy_v2("203.0.113.7"), b""):
            async with RawConnection.open("127.0.0.1", gateway.handle.port) as conn:
                await conn.send(header + get(host))
                assert await conn.read_until_close(wait=2) == b""
        assert gateway.lines() == []


async def test_missing_or_broken_proxy_header_is_closed(
    proxied: Gateway, redis_url: str, upstream: Upstream
) -> None:
    """A plain request, a garbled header or a header that never completes: closed."""
    host = await route_sandbox(redis_url, SANDBOX, upstream)
    for data in (
        get(host),  # no header although it is required
        b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n" + get(host),
        b"PROXY TCP4 " + b"1" * 120,  # longer than a v1 line may be
        V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a v2 header
    ):
        async with RawConnection.open("127.0.0.1", proxied.handle.port) as conn:
            await conn.send(data)
            assert await conn.read_until_close(wait=2) == b"", data
    timeouts = proxied.handle.running.handler.listener
    assert timeouts is not None
    before = timeouts.header_timeouts
    for partial in (b"PROXY TCP4 203.0.113.7", V2_SIGNATURE[:8], b""):
        async with RawConnection.open("127.0.0.1", proxied.handle.port) as conn:
            await conn.send(partial)
            started = time.monotonic()
            assert await conn.read_until_close(wait=3) == b""
            waited = time.monotonic() - started
        assert 0.4 <= waited < 2.0, (partial, waited)
    assert timeouts.header_timeouts == before + 3
    assert proxied.lines() == []


async def test_spoofed_forwarded_for_from_an_untrusted_client(
    redis: aioredis.Redis, redis_url: str, upstream: Upstream
) -> None:
    """With no trusted proxies (the default), X-Forwarded-* from the client are ignored."""
    async with gateway_with(redis_url, {}) as gateway:
        host = await route_sandbox(redis_url, SANDBOX, upstream)
        answer = await exchange(
            "127.0.0.1", gateway.handle.port,
            get(host, ("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-Proto", "https"),
                ("Forwarded", "for=1.2.3.4"), ("X-Real-IP", "1.2.3.4")),
        )  # fmt: skip
        forwarded = seen_upstream(answer)
        assert forwarded["x-forwarded-for"] == "127.0.0.1"
        assert forwarded["x-forwarded-proto"] == "http"
        assert forwarded["forwarded"] == f"for=127.0.0.1;host={host};proto=http"
        assert "x-real-ip" not in forwarded
        assert gateway.line_for(answer.header("X-Request-Id"))["clientIp"] == "127.0.0.1"


async def test_forwarded_for_from_a_trusted_proxy_counts_from_the_right(
    redis: aioredis.Redis, redis_url: str, upstream: Upstream
) -> None:
    """From a trusted peer, the rightmost untrusted X-Forwarded-For entry is the client."""
    overrides = {"trusted_proxies": ["127.0.0.1/32", "10.0.0.0/8"]}
    async with gateway_with(redis_url, overrides) as gateway:
        host = await route_sandbox(redis_url, SANDBOX, upstream)
        cases = [
            # (X-Forwarded-For values as sent, client, chain sent upstream)
            (["198.51.100.9"], "198.51.100.9", "198.51.100.9, 127.0.0.1"),
            # A spoofed left part is ignored: 198.51.100.9 is where trust ends.
            (["6.6.6.6, 198.51.100.9"], "198.51.100.9", "198.51.100.9, 127.0.0.1"),
            # Trusted hops (10.x) are skipped; several headers are one list.
            (["6.6.6.6, 198.51.100.9", "10.1.2.3"], "198.51.100.9",
             "198.51.100.9, 10.1.2.3, 127.0.0.1"),
            # Garbage stops the walk at the last good hop.
            (["198.51.100.9, not-an-ip, 10.1.2.3"], "10.1.2.3", "10.1.2.3, 127.0.0.1"),
        ]  # fmt: skip
        for values, client, chain in cases:
            extra = [("X-Forwarded-For", v) for v in values] + [("X-Forwarded-Proto", "https")]
            answer = await exchange("127.0.0.1", gateway.handle.port, get(host, *extra))
            forwarded = seen_upstream(answer)
            assert forwarded["x-forwarded-for"] == chain, values
            assert forwarded["x-forwarded-proto"] == "https"
            line = gateway.line_for(answer.header("X-Request-Id"))
            assert line["clientIp"] == client, values
