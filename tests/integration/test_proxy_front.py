"""The public listener's own HTTP/1.1 front (gateway/proxy/front.py): what it serves
itself, what it hands to aiohttp, and that a connection survives the hand-over."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import websockets
from aiohttp import web

from gateway.proxy.exchange import TASK_NAME
from gateway.routing.store import RouteWriter
from tests.integration.test_ops_drain import sample, scrape
from tests.support.gateway import GatewayHandle, running_gateway
from tests.support.rawhttp import RawConnection, RawResponse, request_bytes
from tests.support.upstreams import Upstream, expected_sha256, start_upstream
from tests.support.waiting import wait_until

SANDBOX = "frontaa01"


def _echoed(response: RawResponse) -> dict[str, Any]:
    assert response.status == 200, response.head
    info: dict[str, Any] = json.loads(response.body)
    return info


async def test_pipelined_requests_are_answered_in_order_one_each(
    gateway: GatewayHandle, host: str
) -> None:
    """Three pipelined GETs in one write: three answers in order, each request sent once."""
    wire = b"".join(request_bytes("GET", f"/p{i}", [("Host", host)]) for i in range(3))
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(wire)
        paths = [_echoed(await conn.read_response())["path_qs"] for _ in range(3)]
    assert paths == ["/p0", "/p1", "/p2"]
    assert gateway.running.front.handed_over == 0


async def test_pipelined_requests_with_a_known_block_are_answered_one_each(
    gateway: GatewayHandle, host: str
) -> None:
    """After a request, three more with its header block in one write (one read that
    ends like a single known head): three answers in order."""
    wire = b"".join(request_bytes("GET", f"/p{i}", [("Host", host)]) for i in range(4))
    first = len(request_bytes("GET", "/p0", [("Host", host)]))
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(wire[:first])
        assert _echoed(await conn.read_response())["path_qs"] == "/p0"
        await conn.send(wire[first:])
        paths = [_echoed(await conn.read_response())["path_qs"] for _ in range(3)]
    assert paths == ["/p1", "/p2", "/p3"]
    assert gateway.running.front.handed_over == 0


async def test_a_request_with_a_cached_route_and_a_pooled_connection_makes_no_task(
    gateway: GatewayHandle, host: str
) -> None:
    """After the first request (lookup, connect), the next ones run in callbacks only."""
    loop = asyncio.get_running_loop()
    started: list[asyncio.Task[Any]] = []

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        started.append(task)  # named after the factory returns: read the names later
        return task

    def exchange_tasks() -> list[asyncio.Task[Any]]:
        return [task for task in started if task.get_name() == TASK_NAME]

    previous = loop.get_task_factory()
    loop.set_task_factory(counting)
    try:
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            await conn.send(request_bytes("GET", "/first", [("Host", host)]))
            assert _echoed(await conn.read_response())["path_qs"] == "/first"
            first = exchange_tasks()
            started.clear()
            for i in range(5):
                await conn.send(request_bytes("GET", f"/next{i}", [("Host", host)]))
                assert _echoed(await conn.read_response())["path_qs"] == f"/next{i}"
    finally:
        loop.set_task_factory(previous)
    assert first, "the first request waited for nothing: the test proves nothing"
    assert exchange_tasks() == []


async def test_a_length_body_in_many_reads_leaves_the_sandbox_connection_reusable(
    gateway: GatewayHandle, host: str
) -> None:
    """A Content-Length body arriving in many reads (relayed past the parser) is intact,
    and the next request on the same pooled sandbox connection is parsed afresh."""
    size = 300_000
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(request_bytes("GET", f"/bytes?size={size}&interval_ms=5", [("Host", host)]))
        streamed = await conn.read_response()
        await conn.send(request_bytes("GET", "/after", [("Host", host)]))
        after = _echoed(await conn.read_response())
    assert streamed.status == 200 and len(streamed.body) == size
    assert hashlib.sha256(streamed.body).hexdigest() == expected_sha256(size)
    assert after["path_qs"] == "/after"
    assert gateway.running.handler.pool.idle_count() == 1  # one connection, used twice


async def test_a_chunked_body_hands_the_connection_to_aiohttp_mid_stream(
    gateway: GatewayHandle, host: str
) -> None:
    """GET, chunked POST, GET on one connection: all answered, the body intact."""
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(request_bytes("GET", "/first", [("Host", host)]))
        assert _echoed(await conn.read_response())["path_qs"] == "/first"
        post = request_bytes(
            "POST", "/chunked", [("Host", host), ("Transfer-Encoding", "chunked")],
            b"5\r\nhello\r\n0\r\n\r\n",
        )  # fmt: skip
        await conn.send(post + request_bytes("GET", "/third", [("Host", host)]))
        posted = _echoed(await conn.read_response())
        third = _echoed(await conn.read_response())
    assert posted["method"] == "POST" and posted["body_len"] == 5
    assert third["path_qs"] == "/third"
    assert gateway.running.front.handed_over == 1


async def test_a_content_length_body_is_streamed_by_the_front(
    gateway: GatewayHandle, host: str
) -> None:
    """A 3 MiB Content-Length POST and a pipelined GET: both answered, nothing handed over."""
    body = bytes(range(256)) * (3 * 4096)
    post = request_bytes("POST", "/big", [("Host", host), ("Content-Length", str(len(body)))], body)
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(post + request_bytes("GET", "/after", [("Host", host)]))
        posted = _echoed(await conn.read_response())
        after = _echoed(await conn.read_response())
    assert posted["body_len"] == len(body)
    assert posted["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert after["path_qs"] == "/after"
    assert gateway.running.front.handed_over == 0


async def test_an_answer_before_the_whole_body_closes_the_connection(
    gateway: GatewayHandle, host: str
) -> None:
    """The sandbox answers mid-upload: the client gets that answer, then the connection
    ends (the rest of the body can't be mistaken for a request)."""
    head = request_bytes("POST", "/status/413", [("Host", host), ("Content-Length", "100000")])
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(head + b"GET /smuggled HTTP/1.1\r\n")
        response = await conn.read_response()
        assert response.status == 413
        assert await conn.closed_by_peer()


async def test_a_bare_lf_head_is_never_served_by_the_front(
    gateway: GatewayHandle, host: str, upstream: Upstream
) -> None:
    """Lines ending in LF alone go to aiohttp's strict parser: 400, nothing upstream."""
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(f"GET /lf HTTP/1.1\nHost: {host}\n\n".encode())
        response = await conn.read_response()
    assert response.status == 400
    assert gateway.running.front.handed_over == 1


async def test_a_head_aiohttp_refuses_is_logged_at_info_in_one_line(
    gateway: GatewayHandle, host: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's head the parser refuses (bare LF, too many fields, a NUL in a value) is
    answered 400 (431) and logged once at INFO with the reason, never at ERROR with a
    traceback (any client could flood the log with those)."""
    many = "".join(f"X-H{i}: {i}\r\n" for i in range(200))
    heads = [f"GET / HTTP/1.1\nHost: {host}\n\n", f"GET / HTTP/1.1\r\nHost: {host}\r\n{many}\r\n",
             f"GET / HTTP/1.1\r\nHost: {host}\r\nX: a\x00b\r\n\r\n"]  # fmt: skip
    caplog.set_level(logging.INFO)
    for head, status in zip(heads, (400, 431, 400), strict=True):
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            await conn.send(head.encode())
            assert (await conn.read_response()).status == status, head[:40]
    refused = [r for r in caplog.records if r.name == "gateway.edge"]
    assert len(refused) == len(heads)
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in refused)
    assert all("refused" in r.getMessage() and "\n" not in r.getMessage() for r in refused)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_cr_or_lf_in_the_request_line_of_a_known_block_is_never_served(
    gateway: GatewayHandle, host: str
) -> None:
    """After a good request, the same header block under a request line holding a CR or
    LF (leading, inside or at its end) goes to aiohttp's strict parser, never the front."""
    block = f"Host: {host}\r\n\r\n"
    bad_lines = ["\rGET /a HTTP/1.1", "\nGET /a HTTP/1.1", "GET /a\rb HTTP/1.1",
                 "GET /a\nb HTTP/1.1", "GET /a HTTP/1.1\r", "GET /a HTTP/1.1\n"]  # fmt: skip
    front = gateway.running.front

    def handed_over_since(count: int) -> Callable[[], bool]:
        return lambda: front.handed_over > count

    for line in bad_lines:
        before = front.handed_over
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            await conn.send(f"GET /good HTTP/1.1\r\n{block}".encode())
            assert _echoed(await conn.read_response())["path_qs"] == "/good"
            await conn.send(f"{line}\r\n{block}".encode())
            await wait_until(handed_over_since(before), what=repr(line))
        assert front.handed_over == before + 1, repr(line)


async def test_a_known_block_under_any_request_line_is_served_as_llhttp_reads_it(
    gateway: GatewayHandle, host: str
) -> None:
    """After a good request, the same header block under other request lines: lines
    llhttp takes are served by the front with the target it read (plain ones and not),
    lines it refuses go to aiohttp's strict parser (400)."""
    block = f"Host: {host}\r\n\r\n".encode()
    served = [(b"GET /b?c=d#e HTTP/1.1", "/b?c=d#e"), (b"DELETE /del HTTP/1.1", "/del"),
              (b"GET  /two-spaces HTTP/1.1", "/two-spaces"), (b"GET /ten HTTP/1.0", "/ten"),
              (b"GET http://" + host.encode() + b"/abs HTTP/1.1", "/abs")]  # fmt: skip
    refused = [b"GET /a\x7fb HTTP/1.1", b"GET /a\tb HTTP/1.1", b"GET /\xc3\xa9 HTTP/1.1",
               b"get /a HTTP/1.1", b"FETCH /a HTTP/1.1"]  # fmt: skip
    front = gateway.running.front
    for line, path in served:
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            await conn.send(b"GET /good HTTP/1.1\r\n" + block)
            assert _echoed(await conn.read_response())["path_qs"] == "/good"
            await conn.send(line + b"\r\n" + block)
            assert _echoed(await conn.read_response())["path_qs"] == path, line
    assert front.handed_over == 0
    for line in refused:
        before = front.handed_over
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            await conn.send(b"GET /good HTTP/1.1\r\n" + block)
            assert _echoed(await conn.read_response())["path_qs"] == "/good"
            await conn.send(line + b"\r\n" + block)
            assert (await conn.read_response()).status == 400, line
        assert front.handed_over == before + 1, line


async def test_request_lines_of_other_versions_get_505_and_the_connection_closes(
    gateway: GatewayHandle, host: str
) -> None:
    """A version-less (HTTP/0.9) line, HTTP/0.9, HTTP/2.0 (and its preface), HTTP/1.2 and
    RTSP/1.0: the front answers HTTP/1.1 505 unsupported_http_version and closes."""
    heads = [f"{line}\r\nHost: {host}\r\n\r\n".encode() for line in (
        "GET /a", "GET /x HTTP/0.9", "GET /x HTTP/2.0", "GET /x HTTP/1.2", "GET /x RTSP/1.0",
    )] + [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]  # fmt: skip
    front = gateway.running.front
    for head in heads:
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            await conn.send(head)
            answer = await conn.read_response()
            assert answer.head.startswith(b"HTTP/1.1 505 "), (head, answer.head)
            assert answer.header("X-Gateway-Error") == "unsupported_http_version", head
            assert answer.header("Connection") == "close", head
            assert json.loads(answer.body)["error"]["code"] == "unsupported_http_version"
            assert await conn.closed_by_peer(wait=2), head
    assert front.handed_over == 0


async def test_another_version_after_a_hand_over_gets_505_as_http11(
    gateway: GatewayHandle, host: str
) -> None:
    """On a connection aiohttp serves (a chunked body came first), an HTTP/2.0 request
    gets 505 with an HTTP/1.1 status line, not its own version echoed, and a close."""
    chunked = request_bytes(
        "POST", "/first", [("Host", host), ("Transfer-Encoding", "chunked")], b"0\r\n\r\n"
    )
    before = gateway.running.front.handed_over
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(chunked)
        assert _echoed(await conn.read_response())["path_qs"] == "/first"
        await conn.send(request_bytes("GET", "/second", [("Host", host)], version="HTTP/2.0"))
        answer = await conn.read_response()
        assert answer.head.startswith(b"HTTP/1.1 505 "), answer.head
        assert answer.header("X-Gateway-Error") == "unsupported_http_version"
        assert answer.header("Connection") == "close"
        assert await conn.closed_by_peer(wait=2)
    assert gateway.running.front.handed_over == before + 1


async def test_a_head_the_parser_refuses_gets_the_gateways_page_and_is_counted(
    gateway: GatewayHandle, host: str
) -> None:
    """Heads aiohttp's parser refuses: 431 header_fields_too_large for too many fields or
    a line over 16 KiB (the request line too), 400 malformed_request otherwise; each
    with a request id and a JSON body, the connection closed, the code in /metrics."""
    fields = "".join(f"X-{i}: {i}\r\n" for i in range(200))
    heads = {
        f"GET /many HTTP/1.1\r\nHost: {host}\r\n{fields}\r\n": 431,
        f"GET /long HTTP/1.1\r\nHost: {host}\r\nX-Long: {'a' * 20_000}\r\n\r\n": 431,
        f"GET /{'a' * 20_000} HTTP/1.1\r\nHost: {host}\r\n\r\n": 431,
        f"GET /name HTTP/1.1\r\nHost: {host}\r\nBad Name: x\r\n\r\n": 400,
        f"POST /cl HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1, 2\r\n\r\n": 400,
    }
    codes = {431: "header_fields_too_large", 400: "malformed_request"}
    for head, status in heads.items():
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            await conn.send(head.encode())
            answer = await conn.read_response()
            assert answer.status == status, (head[:40], answer.head)
            assert answer.header("X-Gateway-Error") == codes[status]
            error = json.loads(answer.body)["error"]
            assert error["code"] == codes[status]
            assert error["requestId"] == answer.header("X-Request-Id") and error["requestId"]
            assert await conn.closed_by_peer(wait=2), head[:40]
    samples = await scrape(gateway.admin_url)
    assert sample(samples, "gateway_errors_total", code="header_fields_too_large") == 3
    assert sample(samples, "gateway_errors_total", code="malformed_request") == 2


async def test_http10_without_keep_alive_is_closed_after_its_answer(
    gateway: GatewayHandle, host: str
) -> None:
    """An HTTP/1.0 request gets Connection: close and the connection ends."""
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(request_bytes("GET", "/", [("Host", host)], version="HTTP/1.0"))
        response = await conn.read_response()
        assert _echoed(response)["http_version"] == "1.1"
        assert response.header("Connection") == "close"
        assert await conn.closed_by_peer()


async def test_http10_keep_alive_is_kept_and_said_so(gateway: GatewayHandle, host: str) -> None:
    """HTTP/1.0 with Connection: keep-alive gets it back and a second answer."""
    request = request_bytes(
        "GET", "/", [("Host", host), ("Connection", "keep-alive")], version="HTTP/1.0"
    )
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        for _ in range(2):
            await conn.send(request)
            response = await conn.read_response()
            assert response.header("Connection") == "keep-alive"
            _echoed(response)


async def test_a_stream_without_length_is_chunked_for_11_and_close_delimited_for_10(
    gateway: GatewayHandle, host: str
) -> None:
    """A sandbox's chunked answer is re-chunked to HTTP/1.1 and sent until close to 1.0."""
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(request_bytes("GET", "/stream?n=3&interval_ms=1", [("Host", host)]))
        response = await conn.read_response()
    assert response.header("Transfer-Encoding") == "chunked"
    assert response.body == b"line 0\nline 1\nline 2\n"
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(
            request_bytes("GET", "/stream?n=3&interval_ms=1", [("Host", host)], version="HTTP/1.0")
        )
        raw = await conn.read_until_close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()
    assert rest == b"line 0\nline 1\nline 2\n"


async def test_head_gets_the_length_and_no_body(gateway: GatewayHandle, host: str) -> None:
    """HEAD: the sandbox's Content-Length goes through, no body bytes follow."""
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(request_bytes("HEAD", "/", [("Host", host)]))
        response = await conn.read_response(head_request=True)
        assert response.status == 200 and int(response.header("Content-Length") or 0) > 0
        await conn.send(request_bytes("GET", "/after-head", [("Host", host)]))
        assert _echoed(await conn.read_response())["path_qs"] == "/after-head"


async def test_a_half_closed_client_still_gets_its_answer(
    gateway: GatewayHandle, host: str
) -> None:
    """A client that shuts its sending side after the request reads the full answer."""
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(request_bytes("GET", "/half", [("Host", host)]))
        conn.writer.write_eof()
        raw = await conn.read_until_close()
    assert raw.startswith(b"HTTP/1.1 200 ") and b'"/half"' in raw


@pytest_asyncio.fixture
async def short_idle_gateway(redis: aioredis.Redis, redis_url: str) -> AsyncIterator[GatewayHandle]:
    async with running_gateway(redis_url, {"server": {"keepalive_idle_seconds": 0.3}}) as gw:
        yield gw


async def test_an_idle_keep_alive_connection_is_closed(
    short_idle_gateway: GatewayHandle, writer: RouteWriter, upstream: Upstream
) -> None:
    """After an answer, a connection idle past keepalive_idle_seconds is closed."""
    gateway = short_idle_gateway
    host = await gateway.expose(writer, SANDBOX, upstream.port)
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(request_bytes("GET", "/", [("Host", host)]))
        _echoed(await conn.read_response())
        assert await conn.closed_by_peer(wait=5.0)


async def test_a_connection_in_use_past_the_idle_limit_stays_open(
    short_idle_gateway: GatewayHandle, writer: RouteWriter, upstream: Upstream
) -> None:
    """Requests 0.1 s apart for three idle limits (0.3 s): one connection answers all."""
    gateway = short_idle_gateway
    host = await gateway.expose(writer, SANDBOX, upstream.port)
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        for i in range(9):
            await conn.send(request_bytes("GET", f"/r{i}", [("Host", host)]))
            assert _echoed(await conn.read_response())["path_qs"] == f"/r{i}"
            await asyncio.sleep(0.1)  # the gap between requests, below the idle limit
        assert await conn.closed_by_peer(wait=5.0)


async def test_a_pipelined_partial_head_after_a_half_close_ends_the_connection(
    gateway: GatewayHandle, host: str
) -> None:
    """A whole request, the start of another, then EOF: one answer, then the close (the
    second head can never complete)."""
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(request_bytes("GET", "/one", [("Host", host)]) + b"GET /tw")
        conn.writer.write_eof()
        raw = await conn.read_until_close()
    assert raw.startswith(b"HTTP/1.1 200 ") and b'"/one"' in raw


@pytest_asyncio.fixture
async def short_header_gateway(
    redis: aioredis.Redis, redis_url: str
) -> AsyncIterator[GatewayHandle]:
    async with running_gateway(redis_url, {"server": {"header_timeout_seconds": 0.5}}) as gw:
        yield gw


async def test_a_pipelined_partial_head_is_held_only_for_the_header_timeout(
    short_header_gateway: GatewayHandle, writer: RouteWriter, upstream: Upstream
) -> None:
    """A whole request and the start of another that never completes: the answer, then a
    close once the header timeout (0.5 s) has run from the end of the first request."""
    gateway = short_header_gateway
    host = await gateway.expose(writer, SANDBOX, upstream.port)
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(request_bytes("GET", "/one", [("Host", host)]) + b"GET /tw")
        assert _echoed(await conn.read_response())["path_qs"] == "/one"
        assert await conn.closed_by_peer(wait=5.0)


async def test_a_head_split_inside_a_crlf_is_served_by_the_front(
    gateway: GatewayHandle, host: str
) -> None:
    """A head whose segment ends between CR and LF is not mistaken for a bare CR."""
    wire = request_bytes("GET", "/split", [("Host", host)])
    cut = wire.index(b"\r\n") + 1
    front = gateway.running.front
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(wire[:cut])
        await wait_until(
            lambda: any(c.buffered().endswith(b"\r") for c in front.connections),
            what="the front holding the first segment",
        )
        await conn.send(wire[cut:])
        assert _echoed(await conn.read_response())["path_qs"] == "/split"
    assert front.handed_over == 0


async def test_a_body_cut_short_by_a_half_close_ends_the_exchange(
    gateway: GatewayHandle, host: str, upstream: Upstream
) -> None:
    """A client that half-closes mid-body is cut off at once; the sandbox gets no request
    that looks complete."""
    head = request_bytes("POST", "/cut", [("Host", host), ("Content-Length", "1000")])
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(head + b"x" * 10)
        conn.writer.write_eof()
        assert await conn.closed_by_peer(wait=5.0)


async def test_a_half_closed_client_handed_to_aiohttp_still_gets_its_answer(
    gateway: GatewayHandle, host: str
) -> None:
    """A chunked POST (aiohttp's) followed by a half-close is answered, then closed."""
    post = request_bytes(
        "POST", "/half-chunked", [("Host", host), ("Transfer-Encoding", "chunked")],
        b"5\r\nhello\r\n0\r\n\r\n",
    )  # fmt: skip
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(post)
        conn.writer.write_eof()
        raw = await conn.read_until_close()
    assert raw.startswith(b"HTTP/1.1 200 ") and b'"/half-chunked"' in raw
    assert gateway.running.front.handed_over == 1


async def test_a_websocket_client_that_half_closes_is_let_go(
    gateway: GatewayHandle, host: str
) -> None:
    """After a 101, the client's EOF ends the connection (no half-open socket left)."""
    upgrade = request_bytes(
        "GET", "/ws",
        [("Host", host), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
         ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")],
    )  # fmt: skip
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(upgrade)
        status, _, _, _ = await conn.read_head()
        assert status == 101
        conn.writer.write_eof()
        assert await conn.closed_by_peer(wait=5.0)
    assert gateway.running.front.handed_over == 0  # the front's splice, not aiohttp


async def test_an_upgrade_the_splice_does_not_take_is_answered_by_aiohttp(
    gateway: GatewayHandle, host: str
) -> None:
    """A WebSocket handshake without a key, and an h2c upgrade: aiohttp's 400s."""
    odd = [
        [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13")],
        [("Upgrade", "h2c"), ("Connection", "Upgrade, HTTP2-Settings"), ("HTTP2-Settings", "")],
    ]
    for extra in odd:
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            await conn.send(request_bytes("GET", "/ws", [("Host", host), *extra]))
            response = await conn.read_response(keep_interim=True)
        assert response.status == 400, extra
    assert gateway.running.front.handed_over == 2


async def test_a_websocket_message_the_sandbox_refuses_brings_its_1009_back(
    gateway: GatewayHandle, host: str
) -> None:
    """8 MiB to an echo that takes 4 MiB: the sandbox closes with 1009 and resets the
    connection over the unread rest; its close still reaches the client, every time."""
    codes = []
    for _ in range(3):
        async with websockets.connect(
            f"ws://{host}/ws", host="127.0.0.1", port=gateway.port, proxy=None,
            max_size=None, open_timeout=5, close_timeout=5,
        ) as ws:  # fmt: skip
            await ws.send(bytes(8 * 1024 * 1024))
            try:
                async with asyncio.timeout(10):
                    while True:
                        await ws.recv()
            except websockets.ConnectionClosed as closed:
                codes.append(closed.rcvd.code if closed.rcvd else None)
    assert codes == [1009, 1009, 1009]


async def test_a_sandbox_header_with_8_bit_bytes_is_relayed_byte_for_byte(
    gateway: GatewayHandle, writer: RouteWriter
) -> None:
    """A response header value in UTF-8 (bytes over 0x7F) reaches the client unchanged."""

    async def named(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"X-Name": "caf\u00e9 \u2603"})

    app = web.Application()
    app.router.add_get("/", named)
    server = await start_upstream("127.0.0.2", app)
    try:
        host = await gateway.expose(writer, SANDBOX, server.port)
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            await conn.send(request_bytes("GET", "/", [("Host", host)]))
            response = await conn.read_response()
    finally:
        await server.stop()
    assert b"\r\nX-Name: caf\xc3\xa9 \xe2\x98\x83\r\n" in response.head
