"""The gateway's own answers, through the real listener (issue 3, points 1, 6 and 7).

Every code of DESIGN.md section 5 that the proxy produces here is checked for its status,
``X-Gateway-Error``, ``X-Request-Id``, an HTML page for navigations and the JSON shape
otherwise. Hostile sandboxes (refusing, resetting mid-body, silent, sending garbage) get a
502/504 or an aborted stream, and the gateway goes on serving another tenant.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from gateway.routing.store import RouteWriter
from tests.support.gateway import GatewayHandle, route_writer, running_gateway
from tests.support.rawhttp import IncompleteBody, RawConnection, RawResponse, exchange
from tests.support.rawhttp import request_bytes as req
from tests.support.upstreams import Upstream, echo_app, start_upstream
from tests.support.waiting import wait_until

SANDBOX = "errsbx01"
LABEL = "errsbx"
OTHER = "othert01"  # another tenant, on 127.0.0.3
OTHER_LABEL = "othert"
NAVIGATE = [("Sec-Fetch-Mode", "navigate"), ("Accept", "text/html")]


@pytest_asyncio.fixture
async def gateway(redis: aioredis.Redis, redis_url: str) -> AsyncIterator[GatewayHandle]:
    overrides = {"upstream": {"response_timeout_seconds": 0.3}}
    async with running_gateway(redis_url, overrides) as handle:
        yield handle


@pytest_asyncio.fixture
async def other_tenant(
    writer: RouteWriter, gateway: GatewayHandle
) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """A healthy sandbox on 127.0.0.3; calling the fixture checks it is still served."""
    server = await start_upstream("127.0.0.3", echo_app("other"))
    await writer.create(OTHER, address="127.0.0.3")
    await writer.expose(OTHER, server.port)
    host = gateway.host(server.port, OTHER_LABEL)

    async def still_served() -> None:
        response = await exchange("127.0.0.1", gateway.port, req("GET", "/ok", [("Host", host)]))
        assert response.status == 200
        assert json.loads(response.body)["upstream"] == "other"

    try:
        yield still_served
    finally:
        await server.stop()


async def _get(
    gateway: GatewayHandle,
    host: str | None,
    path: str = "/",
    *,
    extra: list[tuple[str, str]] | None = None,
    method: str = "GET",
    version: str = "HTTP/1.1",
) -> RawResponse:
    headers = ([("Host", host)] if host is not None else []) + (extra or [])
    return await exchange(
        "127.0.0.1", gateway.port, req(method, path, headers, version=version),
        head_request=method == "HEAD",
    )  # fmt: skip


def _assert_json_error(
    response: RawResponse, status: int, code: str, *, label: str | None, port: int | None
) -> dict[str, Any]:
    assert response.status == status, response.body
    assert response.header("X-Gateway-Error") == code
    request_id = response.header("X-Request-Id")
    assert request_id
    assert response.header("Content-Type") == "application/json"
    body = json.loads(response.body)
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"code", "message", "sandboxId", "port", "requestId"}
    assert error["code"] == code
    assert error["requestId"] == request_id
    assert error["sandboxId"] == label
    assert error["port"] == port
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


def _assert_html_error(response: RawResponse, status: int, code: str) -> str:
    assert response.status == status
    assert response.header("X-Gateway-Error") == code
    assert response.header("X-Request-Id")
    assert (response.header("Content-Type") or "").startswith("text/html")
    page = response.body.decode()
    assert page.startswith("<!doctype html>")
    assert str(response.header("X-Request-Id")) in page
    return page


# ---------------------------------------------------------------------------------------
# Host judgement (no sandbox involved)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostCase:
    host: str
    status: int
    code: str
    label: str | None = None
    port: int | None = None


HOST_CASES = [
    HostCase("example.com", 404, "unknown_host"),
    HostCase("box.test", 404, "unknown_host"),
    HostCase("3000-abc.box.other", 404, "unknown_host"),
    HostCase("127.0.0.1", 404, "unknown_host"),
    HostCase("03000-abcdef.box.test", 400, "invalid_host", label="abcdef"),
    HostCase("3000-ab_cd.box.test", 400, "invalid_host", port=3000),
    HostCase("3000-abc.x.box.test", 400, "invalid_host"),
    HostCase("3000abc.box.test", 400, "invalid_host"),
    HostCase("3000-abc.box.test:99999", 400, "invalid_host"),
    HostCase("80-abcdef.box.test", 400, "invalid_port", label="abcdef", port=80),
    HostCase("70000-abcdef.box.test", 400, "invalid_port", label="abcdef", port=70000),
]


@pytest.mark.parametrize("case", HOST_CASES, ids=[c.host for c in HOST_CASES])
async def test_host_errors(gateway: GatewayHandle, case: HostCase) -> None:
    """Each malformed or foreign host gets its code, as JSON, with a request id; a
    browser navigation gets the page."""
    response = await _get(gateway, case.host)
    _assert_json_error(response, case.status, case.code, label=case.label, port=case.port)
    _assert_html_error(await _get(gateway, case.host, extra=NAVIGATE), case.status, case.code)


async def test_host_errors_come_before_the_sandbox(
    gateway: GatewayHandle, writer: RouteWriter, upstream: Upstream
) -> None:
    """A bad port on a label that exists is still invalid_port; an unknown label with a
    bad port is invalid_port, not sandbox_not_found."""
    await writer.create(SANDBOX, address="127.0.0.2")
    await writer.expose(SANDBOX, upstream.port)
    response = await _get(gateway, f"80-{LABEL}.box.test")
    _assert_json_error(response, 400, "invalid_port", label=LABEL, port=80)
    response = await _get(gateway, "80-zzzzzz.box.test")
    _assert_json_error(response, 400, "invalid_port", label="zzzzzz", port=80)


async def test_http10_request_without_host_is_invalid_host(gateway: GatewayHandle) -> None:
    """An HTTP/1.0 request with no Host is never routed: 400 invalid_host."""
    response = await _get(gateway, None, version="HTTP/1.0")
    _assert_json_error(response, 400, "invalid_host", label=None, port=None)


async def test_http11_request_without_host_is_refused(
    gateway: GatewayHandle, upstream: Upstream
) -> None:
    """HTTP/1.1 with no Host (aiohttp's parser refuses it) or an empty Host: 400, not routed."""
    response = await _get(gateway, None)
    assert response.status == 400
    response = await _get(gateway, "")
    _assert_json_error(response, 400, "invalid_host", label=None, port=None)


async def test_absolute_form_disagreeing_with_host_is_invalid_host(
    gateway: GatewayHandle, writer: RouteWriter, upstream: Upstream
) -> None:
    """GET http://A/ with Host: B is never routed, whichever of A and B exists."""
    await writer.create(SANDBOX, address="127.0.0.2")
    await writer.expose(SANDBOX, upstream.port)
    real = gateway.host(upstream.port, LABEL)
    response = await _get(gateway, "3000-zzzzzz.box.test", f"http://{real}/")
    assert response.status == 400 and response.header("X-Gateway-Error") == "invalid_host"
    response = await _get(gateway, real, "http://3000-zzzzzz.box.test/")
    assert response.status == 400 and response.header("X-Gateway-Error") == "invalid_host"
    response = await _get(gateway, real, "http://user@" + real + "/")
    assert response.status == 400 and response.header("X-Gateway-Error") == "invalid_host"


@pytest.mark.parametrize(
    ("method", "upgrade", "connection"),
    [("GET", "h2c", "Upgrade, HTTP2-Settings"), ("GET", "tcp", "upgrade"),
     ("POST", "websocket", "Upgrade")],
)  # fmt: skip
async def test_upgrades_other_than_websocket_are_refused(
    gateway: GatewayHandle, writer: RouteWriter, upstream: Upstream,
    *, method: str, upgrade: str, connection: str,
) -> None:  # fmt: skip
    """h2c, other protocols, and a WebSocket upgrade on POST: 400 unsupported_upgrade."""
    await writer.create(SANDBOX, address="127.0.0.2")
    await writer.expose(SANDBOX, upstream.port)
    extra = [("Connection", connection), ("Upgrade", upgrade), ("Content-Length", "0")]
    if upgrade == "h2c":
        extra.append(("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"))
    host = gateway.host(upstream.port, LABEL)
    response = await _get(gateway, host, extra=extra, method=method)
    _assert_json_error(response, 400, "unsupported_upgrade", label=LABEL, port=upstream.port)
    page = await _get(gateway, host, extra=extra + NAVIGATE, method=method)
    _assert_html_error(page, 400, "unsupported_upgrade")


# ---------------------------------------------------------------------------------------
# Route answers
# ---------------------------------------------------------------------------------------


async def test_sandbox_not_found(gateway: GatewayHandle) -> None:
    response = await _get(gateway, "3000-nosuch.box.test")
    _assert_json_error(response, 404, "sandbox_not_found", label="nosuch", port=3000)
    page = _assert_html_error(
        await _get(gateway, "3000-nosuch.box.test", extra=NAVIGATE), 404, "sandbox_not_found"
    )
    assert "nosuch" in page


async def test_port_not_exposed(gateway: GatewayHandle, writer: RouteWriter) -> None:
    await writer.create(SANDBOX, address="127.0.0.2")
    response = await _get(gateway, f"3000-{LABEL}.box.test")
    _assert_json_error(response, 404, "port_not_exposed", label=LABEL, port=3000)
    page = _assert_html_error(
        await _get(gateway, f"3000-{LABEL}.box.test", extra=NAVIGATE), 404, "port_not_exposed"
    )
    assert "3000" in page


async def test_port_not_allowed_comes_before_port_not_exposed(
    gateway: GatewayHandle, writer: RouteWriter
) -> None:
    """A port outside allowPorts is 403 port_not_allowed (exposed or not)."""
    await writer.create(SANDBOX, address="127.0.0.2", allow_ports=[3000])
    response = await _get(gateway, f"4000-{LABEL}.box.test")
    _assert_json_error(response, 403, "port_not_allowed", label=LABEL, port=4000)
    page = await _get(gateway, f"4000-{LABEL}.box.test", extra=NAVIGATE)
    _assert_html_error(page, 403, "port_not_allowed")
    response = await _get(gateway, f"3000-{LABEL}.box.test")
    _assert_json_error(response, 404, "port_not_exposed", label=LABEL, port=3000)


async def test_sandbox_paused_has_retry_after(
    gateway: GatewayHandle, writer: RouteWriter, upstream: Upstream
) -> None:
    await writer.create(SANDBOX, address="127.0.0.2")
    await writer.expose(SANDBOX, upstream.port)
    await writer.pause(SANDBOX)
    host = gateway.host(upstream.port, LABEL)
    response = await _get(gateway, host)
    _assert_json_error(response, 503, "sandbox_paused", label=LABEL, port=upstream.port)
    assert response.header("Retry-After") == "5"
    page_response = await _get(gateway, host, extra=NAVIGATE)
    _assert_html_error(page_response, 503, "sandbox_paused")
    assert page_response.header("Retry-After") == "5"


async def test_sandbox_terminated(
    gateway: GatewayHandle, writer: RouteWriter, upstream: Upstream
) -> None:
    await writer.create(SANDBOX, address="127.0.0.2")
    await writer.expose(SANDBOX, upstream.port)
    await writer.terminate(SANDBOX)
    response = await _get(gateway, gateway.host(upstream.port, LABEL))
    _assert_json_error(response, 410, "sandbox_terminated", label=LABEL, port=upstream.port)
    _assert_html_error(
        await _get(gateway, gateway.host(upstream.port, LABEL), extra=NAVIGATE),
        410, "sandbox_terminated",
    )  # fmt: skip


async def test_head_error_answers_have_no_body(gateway: GatewayHandle) -> None:
    """A HEAD for an unknown sandbox gets the status and headers, no body, and the
    connection stays usable."""
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(req("HEAD", "/", [("Host", "3000-nosuch.box.test")]))
        head = await conn.read_response(head_request=True)
        await conn.send(req("GET", "/", [("Host", "3000-nosuch.box.test")]))
        after = await conn.read_response()
    assert head.status == 404 and head.header("X-Gateway-Error") == "sandbox_not_found"
    assert after.status == 404 and json.loads(after.body)["error"]["code"] == "sandbox_not_found"


# ---------------------------------------------------------------------------------------
# Upstream answers and hostile sandboxes
# ---------------------------------------------------------------------------------------


def _free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        port: int = probe.getsockname()[1]
    return port


async def test_upstream_refused_says_bind_0000(
    gateway: GatewayHandle,
    writer: RouteWriter,
    other_tenant: Callable[[], Awaitable[None]],
) -> None:
    """Nothing listening: 502 upstream_refused; the page says to bind 0.0.0.0."""
    port = _free_port("127.0.0.2")
    await writer.create(SANDBOX, address="127.0.0.2")
    await writer.expose(SANDBOX, port)
    host = gateway.host(port, LABEL)
    _assert_json_error(await _get(gateway, host), 502, "upstream_refused", label=LABEL, port=port)
    page = _assert_html_error(await _get(gateway, host, extra=NAVIGATE), 502, "upstream_refused")
    assert "0.0.0.0" in page
    assert f"port {port}" in page and LABEL in page
    await other_tenant()


async def test_upstream_timeout(
    gateway: GatewayHandle,
    writer: RouteWriter,
    upstream: Upstream,
    other_tenant: Callable[[], Awaitable[None]],
) -> None:
    """No response head within response_timeout_seconds (0.3 here): 504 upstream_timeout."""
    await writer.create(SANDBOX, address="127.0.0.2")
    await writer.expose(SANDBOX, upstream.port)
    host = gateway.host(upstream.port, LABEL)
    response = await _get(gateway, host, "/slow-headers?delay_ms=3000")
    _assert_json_error(response, 504, "upstream_timeout", label=LABEL, port=upstream.port)
    _assert_html_error(
        await _get(gateway, host, "/slow-headers?delay_ms=3000", extra=NAVIGATE),
        504, "upstream_timeout",
    )  # fmt: skip
    # The same sandbox still answers quick requests.
    assert (await _get(gateway, host, "/slow-headers?delay_ms=1")).status == 200
    await other_tenant()


@dataclass
class Hostile:
    """A raw TCP sandbox whose per-connection behaviour the test picks."""

    server: asyncio.Server
    port: int
    connections: int = 0


async def _hostile(
    behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> Hostile:
    holder: list[Hostile] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        holder[0].connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            await behaviour(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # Stopping the server cancels us; ending normally spares Python 3.11's
            # start_server callback from logging the cancellation as an error.
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.2", 0)
    hostile = Hostile(server, server.sockets[0].getsockname()[1])
    holder.append(hostile)
    return hostile


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"SSH-2.0-OpenSSH_9.0\r\nthis is not http\r\n\r\n")
    await writer.drain()


async def _bad_status_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 abc Broken\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()


async def _reset_before_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _reset(writer)


async def _close_before_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def _short_body_then_close(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
    await writer.drain()


async def _short_body_then_reset(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
    await writer.drain()
    _reset(writer)


async def _chunked_dies_mid_chunk(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n100\r\nonly")
    await writer.drain()


async def _chunked_bad_framing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
    await writer.drain()
    await asyncio.sleep(5)  # keeps the socket open: the gateway must not wait for it


async def _endless_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for index in range(100_000):  # bounded, but far past any sane head size
        writer.write(b"X-Filler-%d: %s\r\n" % (index, b"a" * 1000))
        await writer.drain()


async def _never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)  # cancelled when the test stops the server


BEFORE_HEAD = {
    "garbage": (_garbage, 502, "upstream_error"),
    "bad_status_line": (_bad_status_line, 502, "upstream_error"),
    "reset_before_head": (_reset_before_head, 502, "upstream_error"),
    "close_before_head": (_close_before_head, 502, "upstream_error"),
    "never_answers": (_never_answers, 504, "upstream_timeout"),
    "endless_head": (_endless_head, 502, "upstream_error"),
}


@pytest.mark.parametrize("name", list(BEFORE_HEAD))
async def test_hostile_sandbox_before_the_head(
    gateway: GatewayHandle,
    writer: RouteWriter,
    other_tenant: Callable[[], Awaitable[None]],
    name: str,
) -> None:
    """A sandbox that breaks HTTP before its head gets a precise 502/504, and the gateway
    goes on serving another tenant."""
    behaviour, status, code = BEFORE_HEAD[name]
    hostile = await _hostile(behaviour)
    try:
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, hostile.port)
        host = gateway.host(hostile.port, LABEL)
        async with asyncio.timeout(5):
            response = await _get(gateway, host)
        _assert_json_error(response, status, code, label=LABEL, port=hostile.port)
        await other_tenant()
    finally:
        hostile.server.close()
        await hostile.server.wait_closed()


# Behaviour, and the body bytes it sends before breaking.
AFTER_HEAD = {
    "short_body_then_close": (_short_body_then_close, b"0123456789"),
    "short_body_then_reset": (_short_body_then_reset, b"0123456789"),
    "chunked_dies_mid_chunk": (_chunked_dies_mid_chunk, b"helloonly"),
    "chunked_bad_framing": (_chunked_bad_framing, b"hello"),
}


@pytest.mark.parametrize("name", list(AFTER_HEAD))
async def test_failure_after_the_head_aborts_the_downstream_connection(
    gateway: GatewayHandle,
    writer: RouteWriter,
    other_tenant: Callable[[], Awaitable[None]],
    name: str,
) -> None:
    """Once the 200 head went out, a broken upstream body aborts the client's connection:
    the client sees an incomplete body, never a complete 200."""
    behaviour, sent = AFTER_HEAD[name]
    hostile = await _hostile(behaviour)
    try:
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, hostile.port)
        host = gateway.host(hostile.port, LABEL)
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            await conn.send(req("GET", "/", [("Host", host)]))
            with pytest.raises(IncompleteBody) as broken:
                await conn.read_response()
            # Whatever arrived is a prefix of what the sandbox sent; never all of it framed
            # as complete.
            assert sent.startswith(broken.value.partial)
            assert await conn.closed_by_peer()
        await other_tenant()
    finally:
        hostile.server.close()
        await hostile.server.wait_closed()


async def test_many_hostile_requests_leave_the_gateway_serving(
    gateway: GatewayHandle,
    writer: RouteWriter,
    other_tenant: Callable[[], Awaitable[None]],
) -> None:
    """Twenty concurrent requests to a sandbox that resets mid-body all fail cleanly."""
    hostile = await _hostile(_short_body_then_reset)
    try:
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, hostile.port)
        host = gateway.host(hostile.port, LABEL)

        async def one() -> None:
            async with RawConnection.open("127.0.0.1", gateway.port) as conn:
                await conn.send(req("GET", "/", [("Host", host)]))
                with pytest.raises(IncompleteBody):
                    await conn.read_response()

        async with asyncio.timeout(10):
            await asyncio.gather(*(one() for _ in range(20)))
        assert hostile.connections == 20
        await other_tenant()
    finally:
        hostile.server.close()
        await hostile.server.wait_closed()


async def test_upstream_error_page(gateway: GatewayHandle, writer: RouteWriter) -> None:
    """The upstream_error answer as an HTML page for a navigation."""
    hostile = await _hostile(_garbage)
    try:
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, hostile.port)
        response = await _get(gateway, gateway.host(hostile.port, LABEL), extra=NAVIGATE)
        _assert_html_error(response, 502, "upstream_error")
    finally:
        hostile.server.close()
        await hostile.server.wait_closed()


async def test_route_outside_sandbox_networks_is_refused(
    redis: aioredis.Redis, redis_url: str, upstream: Upstream
) -> None:
    """A record pointing outside the configured networks (written by another control plane
    straight into Redis) is never dialled."""
    async with (
        running_gateway(redis_url, {"routing": {"sandbox_networks": ["127.0.0.0/8"]}}) as gateway,
        route_writer(redis_url) as writer,
    ):
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, upstream.port)
        host = gateway.host(upstream.port, LABEL)
        assert (await _get(gateway, host)).status == 200
        # Tamper with the record behind the writer's back (same incarnation, so a check
        # remembered per incarnation would miss it): point it outside the networks.
        key = f"gw:{{{LABEL}}}:sandbox"
        await redis.hset(key, "address", "10.0.0.1")
        await redis.publish("gw:invalidate", f"{LABEL} 999")

        async def refused() -> bool:
            response = await _get(gateway, host)
            return response.header("X-Gateway-Error") == "upstream_refused"

        await wait_until(refused, what="the tampered route refused")
