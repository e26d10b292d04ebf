"""Host and header confusion (catalogue HOST-*, HDR-*, XFF-*): routing keys and headers.

Source: https://www.rfc-editor.org/rfc/rfc9110#section-7.6.1 (hop-by-hop), RFC 9112 section 3.2.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.adversarial.conftest import ADVERSARIAL_CONFIG, ATTACKER, FIGURES, VICTIM, Tenants
from tests.support.gateway import GatewayHandle, route_writer, running_gateway
from tests.support.rawhttp import exchange
from tests.support.recording import RecordingUpstream


async def _get(t: Tenants, host_lines: str, target: str = "/attack") -> int:
    data = f"GET {target} HTTP/1.1\r\n{host_lines}Connection: close\r\n\r\n".encode()
    FIGURES["inputs"] += 1
    return (await exchange("127.0.0.1", t.gateway.port, data)).status


@pytest.mark.catalogue("HOST-01", "HOST-02", "HOST-03", "HOST-05", "HOST-06", "HOST-10")
async def test_hostile_hosts_never_reach_a_sandbox(tenants: Tenants) -> None:
    """Suffix tricks, userinfo, double ports, bad labels, duplicates: 4xx, no sandbox dialled."""
    t = tenants
    a = t.host(ATTACKER)
    port = t.attacker.port
    hosts = [
        "", f"Host: {a}.evil.test\r\n", f"Host: {port}-{ATTACKER}.evil.test\r\n",
        f"Host: x.{a}\r\n", f"Host: {a}x\r\n", f"Host: user@{a}\r\n", f"Host: {a}:443:80\r\n",
        f"Host: {a}/x\r\n", f"Host: ..{a}\r\n", f"Host: {a}\x01\r\n", "Host: \r\n",
        f"Host: {a}, {t.host(VICTIM)}\r\n", f"Host: {a}\r\nHost: {t.host(VICTIM)}\r\n",
        f"Host: {a}\r\nhost: {a}\r\n", f"Host: 0{a}\r\n", f"Host: +{a}\r\n",
        f"Host: 0-{ATTACKER}.box.test\r\n", f"Host: 65536-{ATTACKER}.box.test\r\n",
        f"Host: {port}--{ATTACKER}.box.test\r\n", f"Host: {ATTACKER}-{port}.box.test\r\n",
        f"Host: %33{a}\r\n", f"Host: {port}-{'a' * 300}.box.test\r\n", "Host: attacker.test\r\n",
        "Host: 127.0.0.1\r\n", f"Host: {port}-xn--ttt-xla.box.test\r\n",
        f"Host: {port}-\u00e4tt123.box.test\r\n",
    ]  # fmt: skip
    for host in hosts:
        data = f"GET /attack HTTP/1.1\r\n{host}Connection: close\r\n\r\n".encode()
        FIGURES["inputs"] += 1
        status = (await exchange("127.0.0.1", t.gateway.port, data)).status
        assert 400 <= status < 500, (host, status)
    assert t.attacker.requests == []
    assert t.victim.requests == []


@pytest.mark.catalogue("HOST-04", "HOST-11")
async def test_case_trailing_dot_and_port_reach_the_same_sandbox_only(tenants: Tenants) -> None:
    """Uppercase, a trailing dot or a port on the Host route to that sandbox or are refused."""
    t = tenants
    a = t.host(ATTACKER)
    for host in (a.upper(), a + ".", a + ":80", a + ":8080"):
        status = await _get(t, f"Host: {host}\r\n")
        assert status in (200, 400, 404), (host, status)
    assert t.victim.requests == []
    for request in t.attacker.requests:
        assert len(request.headers_named("Host")) == 1


@pytest.mark.catalogue("HDR-01", "HDR-02", "HDR-04", "HDR-05", "HOST-09", "XFF-02", "XFF-05",
                       "XFF-06", "HOST-12")  # fmt: skip
async def test_hop_by_hop_connection_listed_spoofed_and_underscore_headers(
    tenants: Tenants,
) -> None:
    """The sandbox sees no hop-by-hop, listed, spoofed or underscore forwarding header."""
    t = tenants
    lines = (
        f"Host: {t.host(ATTACKER)}\r\nConnection: keep-alive, X-Foo, X-Forwarded-For, "
        "X-Request-Id, Forwarded\r\nX-Foo: 1\r\nKeep-Alive: timeout=5\r\n"
        "Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X\r\n"
        "Proxy-Authorization: Basic eDp5\r\nX-Forwarded-For: 6.6.6.6\r\n"
        f"X-Forwarded-Host: {t.host(VICTIM)}\r\nForwarded: for=6.6.6.6;host={t.host(VICTIM)}\r\n"
        "X-Real-IP: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\nX_Forwarded_For: 6.6.6.6\r\n"
        "X-Forwarded_Host: evil\r\nX-Original-Host: evil\r\n"
    )
    assert await _get(t, lines, "/attack/%0d%0aX-Injected:%20yes/..%2F") == 200
    [request] = t.attacker.requests
    names = {k.lower() for k, _ in request.headers}
    for gone in ("x-foo", "keep-alive", "proxy-connection", "te", "trailer",
                 "proxy-authorization", "x-real-ip", "true-client-ip", "x_forwarded_for",
                 "x-forwarded_host", "x-original-host", "x-injected"):  # fmt: skip
        assert gone not in names, gone
    assert request.headers_named("X-Forwarded-For") == ["127.0.0.1"]
    assert request.headers_named("X-Forwarded-Host") == [t.host(ATTACKER)]
    assert "6.6.6.6" not in str(request.headers)
    assert len(request.headers_named("X-Request-Id")) == 1
    assert request.target == "/attack/%0d%0aX-Injected:%20yes/..%2F"
    assert t.victim.requests == []


@pytest.mark.catalogue("SMUG-24")
async def test_h2c_and_other_upgrades_are_refused(tenants: Tenants) -> None:
    """Upgrade: h2c / other protocols get 400 unsupported_upgrade; the sandbox sees nothing."""
    t = tenants
    for proto in ("h2c", "tls/1.2", "websocket/2", "foo, websocket"):
        lines = f"Host: {t.host(ATTACKER)}\r\nUpgrade: {proto}\r\nConnection: Upgrade\r\n"
        assert await _get(t, lines) == 400, proto
    assert t.attacker.requests == []


@contextlib.asynccontextmanager
async def _one_sandbox(
    redis_url: str, overrides: dict[str, Any]
) -> AsyncIterator[tuple[GatewayHandle, RecordingUpstream]]:
    """A gateway with ``overrides`` and the victim routed to a recording upstream."""
    async with (
        running_gateway(redis_url, overrides) as gw,
        RecordingUpstream.start("127.0.0.2") as up,
        route_writer(redis_url) as writer,
    ):
        await writer.create(VICTIM, address="127.0.0.2")
        await writer.expose(VICTIM, up.port)
        yield gw, up


@pytest.mark.catalogue("TEN-03")
async def test_the_admin_token_never_reaches_a_sandbox(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """With an admin token configured, no byte of it is ever sent to a sandbox."""
    token = "adm1n-t0ken-never-upstream"
    overrides: dict[str, Any] = {**ADVERSARIAL_CONFIG, "admin_token": token}
    async with _one_sandbox(redis_url, overrides) as (gw, up):
        data = f"GET / HTTP/1.1\r\nHost: {gw.host(up.port, VICTIM)}\r\nConnection: close\r\n\r\n"
        assert (await exchange("127.0.0.1", gw.port, data.encode())).status == 200
        FIGURES["inputs"] += 1
        assert up.requests
        assert all(token.encode() not in c.received for c in up.connections)


@pytest.mark.catalogue("XFF-01", "XFF-03", "XFF-04")
async def test_forwarding_headers_from_a_trusted_balancer(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """Behind a trusted peer, the client is the rightmost untrusted X-Forwarded-For entry."""
    overrides: dict[str, Any] = {**ADVERSARIAL_CONFIG, "trusted_proxies": ["127.0.0.1/32"]}
    async with _one_sandbox(redis_url, overrides) as (gw, up):
        cases = [
            ("X-Forwarded-For: 6.6.6.6, 1.2.3.4\r\n", "1.2.3.4"),
            ("X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 1.2.3.4\r\n", "1.2.3.4"),
            ("X-Forwarded-For: unknown\r\n", "127.0.0.1"),
            ("X-Forwarded-For: 1.2.3.4:5678\r\n", "127.0.0.1"),
            ("X-Forwarded-For: ,,,\r\n", "127.0.0.1"),
            ("X-Forwarded-For: " + ", ".join(["9.9.9.9"] * 500) + "\r\n", "9.9.9.9"),
            ("X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\n", "1.2.3.4"),
        ]
        for lines, client in cases:
            host = gw.host(up.port, VICTIM)
            data = f"GET / HTTP/1.1\r\nHost: {host}\r\n{lines}Connection: close\r\n\r\n"
            assert (await exchange("127.0.0.1", gw.port, data.encode())).status == 200
            FIGURES["inputs"] += 1
            chain = up.requests[-1].headers_named("X-Forwarded-For")
            assert len(chain) == 1
            assert chain[0].split(", ")[0] == client, (lines[:60], chain[0][:60])
        assert up.requests[-1].headers_named("X-Forwarded-Proto") == ["https"]


@pytest.mark.catalogue("TEN-08")
async def test_error_pages_never_reflect_markup_from_the_host(tenants: Tenants) -> None:
    """A Host with markup, or an X-Forwarded-Host, is never echoed raw into a page."""
    t = tenants
    for host in (f"{t.attacker.port}-<script>x.box.test", "<img src=x>.evil.test"):
        data = (
            f"GET / HTTP/1.1\r\nHost: {host}\r\nAccept: text/html\r\n"
            "X-Forwarded-Host: <b>evil</b>\r\nConnection: close\r\n\r\n"
        )
        FIGURES["inputs"] += 1
        response = await exchange("127.0.0.1", t.gateway.port, data.encode())
        assert 400 <= response.status < 500
        for raw in (b"<script>", b"<img", b"<b>evil"):
            assert raw not in response.body and raw not in response.head


@pytest.mark.catalogue("HDR-07")
async def test_many_client_headers_still_fit_the_sandbox(tenants: Tenants) -> None:
    """120 client headers plus the gateway's own reach the sandbox complete (or 431/400)."""
    t = tenants
    lines = "".join(f"X-H{i}: {i}\r\n" for i in range(120))
    status = await _get(t, f"Host: {t.host(ATTACKER)}\r\n{lines}")
    if status == 200:
        [request] = t.attacker.requests
        assert sum(k.startswith("X-H") for k, _ in request.headers) == 120
        assert len(request.headers_named("X-Request-Id")) == 1
    else:
        assert status in (400, 431)
