"""Hostile sandboxes (catalogue UPR-*, TEN-04, HDR-06): the recording upstream answers raw bytes."""

from __future__ import annotations

import resource
import zlib
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.adversarial.conftest import (
    ADVERSARIAL_CONFIG,
    FIGURES,
    METADATA_IP,
    VICTIM,
    VICTIM_IP,
    Tenants,
)
from tests.support.canaries import Canary
from tests.support.gateway import route_writer, running_gateway
from tests.support.rawhttp import IncompleteBody, RawConnection, RawResponse, exchange
from tests.support.recording import RecordingUpstream, Reply
from tests.support.waiting import wait_until


async def _fetch(t: Tenants, reply: Reply) -> RawResponse:
    t.victim.script = lambda _request: reply
    FIGURES["inputs"] += 1
    async with RawConnection.open("127.0.0.1", t.gateway.port) as conn:
        await conn.send(f"GET / HTTP/1.1\r\nHost: {t.host(VICTIM)}\r\n\r\n".encode())
        return await conn.read_response(wait=10.0)


@pytest.mark.catalogue("UPR-01", "UPR-02", "UPR-03", "UPR-04", "UPR-05", "UPR-06")
async def test_broken_or_injected_response_heads_become_502(tenants: Tenants) -> None:
    """CR/LF/CTL in headers, bad status lines, CL+TE, huge heads: 502 or a clean header."""
    t = tenants
    heads = [
        b"HTTP/1.1 200 OK\r\nX: a\x01b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX: a\rSet-Cookie: s=1\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok",
        b"FOO 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20000 + b"\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\nok",
    ]
    for head in heads:
        try:
            response = await _fetch(t, Reply(head, then="close"))
        except IncompleteBody:
            continue  # aborted mid-body: safe too (never a complete answer with bad framing)
        assert response.status in (200, 502), head[:40]
        for byte in (b"\x00", b"\x01", b"\x7f"):
            assert byte not in response.head
        assert response.head.count(b"\r") == response.head.count(b"\r\n")
        assert response.header("Set-Cookie") is None


@pytest.mark.catalogue("UPR-07", "UPR-16", "STR-06")
async def test_truncated_body_aborts_the_client_connection(tenants: Tenants) -> None:
    """CL 1000 with 10 bytes then close or RST: the client sees an aborted body, not a 200."""
    t = tenants
    for then in ("close", "reset"):
        reply = Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789", then=then)
        with pytest.raises(IncompleteBody):
            await _fetch(t, reply)
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    with pytest.raises(IncompleteBody):
        await _fetch(t, Reply(chunked, then="close"))


@pytest.mark.catalogue("UPR-12")
async def test_location_to_a_canary_is_relayed_never_fetched(tenants: Tenants) -> None:
    """A 302 to a loopback canary reaches the client as a 302; the canary sees 0 connections."""
    t = tenants
    async with Canary.start(METADATA_IP) as canary:
        location = f"http://{canary.address}/latest/meta-data/".encode()
        reply = Reply(
            b"HTTP/1.1 302 Found\r\nLocation: " + location + b"\r\nContent-Length: 0\r\n\r\n"
        )
        response = await _fetch(t, reply)
        assert response.status == 302
        assert response.header("Location") == location.decode()
        FIGURES["canary_hits"] += canary.connections
        assert canary.connections == 0


def _gzip_zeros(mib: int) -> bytes:
    """gzip of ``mib`` MiB of zeros, built 1 MiB at a time: the peak RSS of this process
    stays low, so a gateway inflating it (it runs in this process) would show."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1024 * 1024)
    parts = [packer.compress(block) for _ in range(mib)]
    return b"".join([*parts, packer.flush()])


@pytest.mark.catalogue("UPR-18", "STR-07")
async def test_gzip_bomb_passes_through_as_bytes(tenants: Tenants) -> None:
    """A gzip body inflating to 256 MiB reaches the client compressed, byte for byte."""
    t = tenants
    bomb = _gzip_zeros(256)
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    response = await _fetch(t, Reply(head + bomb))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert response.body == bomb
    assert response.header("Content-Encoding") == "gzip"
    # Inflating it would take 256 MiB; the gateway runs in this process.
    assert grown_kib < 64 * 1024


@pytest.mark.catalogue("TEN-04", "UPR-13", "HDR-06", "HDR-03")
async def test_sandbox_cookies_scoped_and_gateway_headers_stripped(tenants: Tenants) -> None:
    """Parent-domain cookies become host-only; X-Gateway-Error and hop-by-hop ones vanish."""
    t = tenants
    host = t.host(VICTIM).encode()
    head = (
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Domain=box.test; Path=/\r\n"
        b"Set-Cookie: b=2; Domain=.test\r\nSet-Cookie: c=3; Domain=" + host + b"\r\n"
        b"Set-Cookie: d=4; Domain=3000-att123.box.test\r\nX-Gateway-Error: sandbox_paused\r\n"
        b"Connection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=1\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    response = await _fetch(t, Reply(head))
    cookies = response.headers_named("Set-Cookie")
    assert cookies == ["a=1; Path=/", "b=2", f"c=3; Domain={host.decode()}", "d=4"]
    assert response.header("X-Gateway-Error") is None
    assert response.header("X-Secret") is None
    assert response.header("Keep-Alive") is None


@pytest.mark.catalogue("UPR-15", "STR-05")
async def test_never_ending_response_ends_upstream_when_the_client_leaves(tenants: Tenants) -> None:
    """An endless close-delimited body streams; once the client leaves, the sandbox conn closes."""
    t = tenants
    t.victim.script = lambda _r: Reply(b"HTTP/1.1 200 OK\r\n\r\n", then="endless")
    FIGURES["inputs"] += 1
    async with RawConnection.open("127.0.0.1", t.gateway.port) as conn:
        await conn.send(f"GET / HTTP/1.1\r\nHost: {t.host(VICTIM)}\r\n\r\n".encode())
        status, *_ = await conn.read_head()
        assert status == 200
        got = 0
        while got < 1024 * 1024:
            chunk = await conn.reader.read(65536)
            assert chunk
            got += len(chunk)
    await wait_until(lambda: all(c.closed for c in t.victim.connections), timeout=10.0)


@pytest.mark.catalogue("UPR-08", "UPR-09", "UPR-11", "UPR-10")
async def test_odd_bodies_and_interim_answers_are_framed_by_the_gateway(tenants: Tenants) -> None:
    """Extra bytes after CL are dropped, close-delimited bodies complete, 204 bodies vanish."""
    t = tenants
    longer = await _fetch(
        t, Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + b"X" * 45)
    )
    assert longer.body == b"hello"
    closing = await _fetch(t, Reply(b"HTTP/1.0 200 OK\r\n\r\n" + b"y" * 5000, then="close"))
    assert closing.body == b"y" * 5000
    t.victim.script = lambda _r: Reply(
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello", then="close"
    )
    FIGURES["inputs"] += 1
    async with RawConnection.open("127.0.0.1", t.gateway.port) as conn:
        request = f"GET / HTTP/1.1\r\nHost: {t.host(VICTIM)}\r\n\r\n".encode()
        await conn.send(request)
        first = await conn.read_response()
        assert (first.status, first.body) == (204, b"")
        t.victim.script = lambda _r: Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await conn.send(request)
        second = await conn.read_response()
        assert (second.status, second.body) == (200, b"ok")
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" * 3
    hinted = await _fetch(t, Reply(early + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    assert (hinted.status, hinted.body) == (200, b"ok")
    switched = await _fetch(t, Reply(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"))
    assert switched.status == 502


@pytest.mark.catalogue("UPR-14")
async def test_a_sandbox_that_never_answers_gets_504(redis: aioredis.Redis, redis_url: str) -> None:
    """A sandbox that reads the request and never answers: 504 after the response timeout."""
    overrides: dict[str, Any] = {
        **ADVERSARIAL_CONFIG,
        "upstream": {"response_timeout_seconds": 0.5},
    }
    async with (
        running_gateway(redis_url, overrides) as gw,
        RecordingUpstream.start(VICTIM_IP, script=lambda _r: Reply(b"", then="hang")) as up,
        route_writer(redis_url) as writer,
    ):
        await writer.create(VICTIM, address=VICTIM_IP)
        await writer.expose(VICTIM, up.port)
        FIGURES["inputs"] += 1
        data = f"GET / HTTP/1.1\r\nHost: {gw.host(up.port, VICTIM)}\r\n\r\n".encode()
        response = await exchange("127.0.0.1", gw.port, data, wait=10.0)
        assert (response.status, response.header("X-Gateway-Error")) == (504, "upstream_timeout")
        await wait_until(lambda: all(c.closed for c in up.connections), timeout=10.0)


@pytest.mark.catalogue("TEN-05")
async def test_a_recycled_address_never_reuses_the_old_tenants_connection(
    tenants: Tenants,
) -> None:
    """A new sandbox on the old one's address:port gets a new upstream TCP connection."""
    t = tenants
    await _fetch(t, Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    assert len(t.victim.connections) == 1
    await t.writer.terminate(VICTIM)
    await t.writer.create("new123", address=VICTIM_IP)
    await t.writer.expose("new123", t.victim.port)
    FIGURES["inputs"] += 1
    data = f"GET /new HTTP/1.1\r\nHost: {t.gateway.host(t.victim.port, 'new123')}\r\n\r\n"
    assert (await exchange("127.0.0.1", t.gateway.port, data.encode())).status == 200
    assert [len(c.requests) for c in t.victim.connections] == [1, 1]
    assert t.victim.connections[1].requests[0].target == "/new"


@pytest.mark.catalogue("TEN-12")
async def test_gateway_error_pages_leak_no_upstream_detail(tenants: Tenants) -> None:
    """A 502 for a broken sandbox names no upstream address, stack or server version, on
    the front and on aiohttp's path (a chunked body), nor does a refused head's 431."""
    t = tenants
    host = t.host(VICTIM)
    many = "".join(f"X-{i}: {i}\r\n" for i in range(200))
    cases = [
        (f"GET / HTTP/1.1\r\nHost: {host}\r\nAccept: {accept}\r\n\r\n", 502)
        for accept in ("text/html", "application/json")
    ] + [
        (f"POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 502),
        (f"GET / HTTP/1.1\r\nHost: {host}\r\n{many}\r\n", 431),
    ]
    for data, status in cases:
        t.victim.script = lambda _r: Reply(b"FOO 200 OK\r\n\r\n", then="close")
        FIGURES["inputs"] += 1
        response = await exchange("127.0.0.1", t.gateway.port, data.encode())
        assert response.status == status, data[:60]
        text = response.head + response.body
        # The port may appear: it is the public one too (DESIGN.md section 2).
        for secret in (VICTIM_IP.encode(), b"Traceback", b"aiohttp/", b"Python/"):
            assert secret not in text, secret
