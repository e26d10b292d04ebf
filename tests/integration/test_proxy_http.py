"""HTTP forwarding through the real public listener to real upstreams (issue 3, point 3).

One gateway per test on the suite's Redis; sandboxes are upstream servers on 127.0.0.2 /
127.0.0.3 bound on port 0, whose port is the exposed one. Byte-exact checks use the raw
socket client (aiohttp's client normalises targets and adds headers).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import socket
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from gateway.routing.store import RouteWriter
from tests.support.gateway import GatewayHandle, route_writer, running_gateway
from tests.support.rawhttp import RawConnection, exchange, request_bytes
from tests.support.recording import RecordedRequest, RecordingUpstream, Reply
from tests.support.upstreams import GZIP_PAYLOAD, Upstream, echo_app, start_upstream
from tests.support.waiting import MS

SANDBOX = "httpaa01"
LABEL = "httpaa"


async def _echo(
    client: aiohttp.ClientSession, gateway: GatewayHandle, host: str, path: str = "/", **kw: Any
) -> dict[str, Any]:
    headers = {"Host": host, **kw.pop("headers", {})}
    async with client.get(gateway.url + path, headers=headers, **kw) as response:
        assert response.status == 200, await response.text()
        data: dict[str, Any] = await response.json()
        return data


def _upstream_headers(info: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in info["headers"] if k.lower() == name.lower()]


def _raw_echo(body: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(body)
    return data


# ---------------------------------------------------------------------------------------
# Host routing through the listener
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    ["{port}-{label}.box.test", "{port}-{label}.BOX.Test", "{port}-{label}.box.test.",
     "{port}-{label}.box.test:{listen}", "{port}-{label}.box.test.:80"],
)  # fmt: skip
async def test_host_variants_route_to_the_sandbox(
    gateway: GatewayHandle, host: str, upstream: Upstream, variant: str
) -> None:
    """Case, a trailing dot and a :port suffix don't change where a host routes."""
    value = variant.format(port=upstream.port, label=LABEL.upper(), listen=gateway.port)
    response = await exchange(
        "127.0.0.1", gateway.port, request_bytes("GET", "/x", [("Host", value)])
    )
    assert response.status == 200
    assert _raw_echo(response.body)["upstream"] == "a"


async def test_matching_absolute_form_is_routed_as_origin_form(
    gateway: GatewayHandle, host: str
) -> None:
    """GET http://{host}/p?q HTTP/1.1 with the same Host reaches the sandbox as /p?q."""
    data = request_bytes("GET", f"http://{host}/p/%2e?q=1", [("Host", host)])
    response = await exchange("127.0.0.1", gateway.port, data)
    assert response.status == 200
    assert _raw_echo(response.body)["path_qs"] == "/p/%2e?q=1"


# ---------------------------------------------------------------------------------------
# Request line and headers
# ---------------------------------------------------------------------------------------


async def test_raw_path_and_query_byte_for_byte(gateway: GatewayHandle, host: str) -> None:
    """Escapes, dot-segments and a bare query key reach the sandbox exactly as sent."""
    target = "/a%2fb/%7Euser/../c?q=%2a&x"
    response = await exchange(
        "127.0.0.1", gateway.port, request_bytes("GET", target, [("Host", host)])
    )
    assert response.status == 200
    assert _raw_echo(response.body)["path_qs"] == target


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_method_is_forwarded(gateway: GatewayHandle, host: str, method: str) -> None:
    """The client's method reaches the sandbox unchanged."""
    body = b"payload" if method in ("POST", "PUT", "PATCH") else b""
    headers = [("Host", host), ("Content-Length", str(len(body)))]
    response = await exchange("127.0.0.1", gateway.port, request_bytes(method, "/m", headers, body))
    assert response.status == 200
    info = _raw_echo(response.body)
    assert info["method"] == method
    assert info["body_len"] == len(body)


async def test_hop_by_hop_and_connection_listed_headers_are_dropped(
    gateway: GatewayHandle, host: str
) -> None:
    """Connection-listed and hop-by-hop headers never reach the sandbox; the rest do, in
    order, with their case and values as sent."""
    headers = [
        ("Host", host),
        ("Connection", "close, X-Custom"),
        ("X-Custom", "secret"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Proxy-Connection", "keep-alive"),
        ("X-First", "1"),
        ("x-MiXeD-case", "Value  with  spaces"),
        ("X-Dup", "one"),
        ("X-Dup", "two"),
    ]
    response = await exchange("127.0.0.1", gateway.port, request_bytes("GET", "/", headers))
    info = _raw_echo(response.body)
    names = [k.lower() for k, _ in info["headers"]]
    for gone in ("x-custom", "keep-alive", "te", "proxy-connection"):
        assert gone not in names
    passed = [
        (k, v) for k, v in info["headers"] if k.lower().startswith(("x-first", "x-mixed", "x-dup"))
    ]
    assert passed == [
        ("X-First", "1"),
        ("x-MiXeD-case", "Value  with  spaces"),
        ("X-Dup", "one"),
        ("X-Dup", "two"),
    ]
    # Connection: close was honoured towards the client.
    assert response.header("Connection") == "close"


async def test_public_host_and_forwarding_headers(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    """The sandbox sees the public Host and X-Forwarded-* / Forwarded built by the gateway."""
    info = await _echo(client, gateway, host)
    assert _upstream_headers(info, "Host") == [host]
    assert _upstream_headers(info, "X-Forwarded-For") == ["127.0.0.1"]
    assert _upstream_headers(info, "X-Forwarded-Proto") == ["http"]
    assert _upstream_headers(info, "X-Forwarded-Host") == [host]
    assert _upstream_headers(info, "X-Forwarded-Port") == ["80"]
    assert _upstream_headers(info, "Forwarded") == [f"for=127.0.0.1;host={host};proto=http"]


async def test_forwarded_port_follows_the_host_port(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    """A Host with a :port suffix gives that port in X-Forwarded-Port."""
    with_port = f"{host}:{gateway.port}"
    info = await _echo(client, gateway, with_port)
    assert _upstream_headers(info, "X-Forwarded-Port") == [str(gateway.port)]
    assert _upstream_headers(info, "Host") == [with_port]


async def test_spoofed_forwarding_headers_are_ignored_from_untrusted_peers(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    """A client's X-Forwarded-*, Forwarded, X-Real-IP and X-Request-Id are replaced."""
    spoof = {
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.test",
        "Forwarded": "for=203.0.113.7",
        "X-Real-IP": "203.0.113.7",
        "X-Request-Id": "client-chosen",
    }
    info = await _echo(client, gateway, host, headers=spoof)
    assert _upstream_headers(info, "X-Forwarded-For") == ["127.0.0.1"]
    assert _upstream_headers(info, "X-Forwarded-Proto") == ["http"]
    assert _upstream_headers(info, "X-Forwarded-Host") == [host]
    assert _upstream_headers(info, "Forwarded") == [f"for=127.0.0.1;host={host};proto=http"]
    assert _upstream_headers(info, "X-Real-IP") == []
    assert _upstream_headers(info, "X-Request-Id") != ["client-chosen"]


async def test_forwarding_headers_are_honoured_from_a_trusted_proxy(
    redis: aioredis.Redis, redis_url: str, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """With trusted_proxies 127.0.0.1/32, the load balancer's X-Forwarded-For/Proto count."""
    async with (
        running_gateway(redis_url, {"trusted_proxies": ["127.0.0.1/32"]}) as gateway,
        route_writer(redis_url) as writer,
    ):
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, upstream.port)
        host = gateway.host(upstream.port, LABEL)
        info = await _echo(
            client, gateway, host,
            headers={"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"},
        )  # fmt: skip
    assert _upstream_headers(info, "X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert _upstream_headers(info, "X-Forwarded-Proto") == ["https"]
    assert _upstream_headers(info, "X-Forwarded-Port") == ["443"]
    assert _upstream_headers(info, "Forwarded") == [f"for=203.0.113.7;host={host};proto=https"]


async def test_a_trusted_proxys_request_id_is_kept(
    redis: aioredis.Redis, redis_url: str, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """From a trusted proxy a well-formed X-Request-Id is used end to end; a malformed
    one is replaced."""
    async with (
        running_gateway(redis_url, {"trusted_proxies": ["127.0.0.1/32"]}) as gateway,
        route_writer(redis_url) as writer,
    ):
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, upstream.port)
        host = gateway.host(upstream.port, LABEL)
        async with client.get(
            gateway.url + "/", headers={"Host": host, "X-Request-Id": "lb-abc.123"}
        ) as response:
            assert response.headers["X-Request-Id"] == "lb-abc.123"
            info = await response.json()
        assert _upstream_headers(info, "X-Request-Id") == ["lb-abc.123"]
        async with client.get(
            gateway.url + "/", headers={"Host": "nope.example", "X-Request-Id": "lb-err"}
        ) as response:
            assert response.headers["X-Request-Id"] == "lb-err"
            assert (await response.json())["error"]["requestId"] == "lb-err"
        async with client.get(
            gateway.url + "/", headers={"Host": host, "X-Request-Id": "bad id!"}
        ) as response:
            assert response.headers["X-Request-Id"] != "bad id!"


async def test_request_id_on_every_response_and_sent_upstream(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    """Proxied answers and the gateway's own answers both carry X-Request-Id; the sandbox
    got the same id as the client."""
    async with client.get(gateway.url + "/", headers={"Host": host}) as response:
        request_id = response.headers["X-Request-Id"]
        info = await response.json()
    assert _upstream_headers(info, "X-Request-Id") == [request_id]
    async with client.get(gateway.url + "/status/404", headers={"Host": host}) as response:
        assert response.status == 404
        assert response.headers["X-Request-Id"]
    async with client.get(gateway.url + "/", headers={"Host": "nope.example"}) as response:
        assert response.status == 404
        assert response.headers["X-Gateway-Error"] == "unknown_host"
        assert response.headers["X-Request-Id"]
    ids = set()
    for _ in range(3):
        async with client.get(gateway.url + "/", headers={"Host": host}) as response:
            ids.add(response.headers["X-Request-Id"])
    assert len(ids) == 3


# ---------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------


async def test_status_and_reason_are_relayed(gateway: GatewayHandle, host: str) -> None:
    """A 418 with its reason phrase comes back as the sandbox sent it."""
    response = await exchange(
        "127.0.0.1", gateway.port, request_bytes("GET", "/status/418", [("Host", host)])
    )
    assert response.status == 418
    assert response.body == b"status 418\n"


async def test_duplicate_set_cookie_headers_are_kept(gateway: GatewayHandle, host: str) -> None:
    """Both Set-Cookie headers of the sandbox reach the client, in order."""
    response = await exchange(
        "127.0.0.1", gateway.port, request_bytes("GET", "/set-cookie", [("Host", host)])
    )
    cookies = response.headers_named("Set-Cookie")
    assert len(cookies) == 2
    assert cookies[0].startswith("session=abc123")
    assert cookies[1].startswith("theme=dark")


async def test_gzip_body_passes_untouched(gateway: GatewayHandle, host: str) -> None:
    """Content-Encoding: gzip bodies are relayed as the compressed bytes, length intact."""
    headers = [("Host", host), ("Accept-Encoding", "gzip")]
    response = await exchange("127.0.0.1", gateway.port, request_bytes("GET", "/gzip", headers))
    compressed = gzip.compress(GZIP_PAYLOAD, mtime=0)
    assert response.header("Content-Encoding") == "gzip"
    assert response.header("Content-Length") == str(len(compressed))
    assert response.body == compressed


async def test_gzip_request_body_passes_untouched(
    gateway: GatewayHandle, writer: RouteWriter, client: aiohttp.ClientSession
) -> None:
    """A gzip-encoded request body reaches the sandbox compressed (no server-side decoding)."""
    server, port, received = await _raw_upstream(
        "127.0.0.2", b"HTTP/1.1 204 No Content\r\n\r\n", read_body=True
    )
    compressed = gzip.compress(b"x" * 100_000, mtime=0)
    try:
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, port)
        async with client.post(
            gateway.url + "/upload", data=compressed,
            headers={"Host": gateway.host(port, LABEL), "Content-Encoding": "gzip"},
        ) as response:  # fmt: skip
            assert response.status == 204
    finally:
        server.close()
        await server.wait_closed()
    head, _, body = received[0].partition(b"\r\n\r\n")
    assert body == compressed
    assert b"\r\nContent-Encoding: gzip\r\n" in head
    assert f"\r\nContent-Length: {len(compressed)}\r\n".encode() in head


async def test_redirects_are_relayed_not_followed(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    """A 302 goes back to the client with its Location."""
    async with client.get(
        gateway.url + "/status/302", headers={"Host": host}, allow_redirects=False
    ) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/elsewhere"


async def test_no_cookie_jar(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    """A Set-Cookie from one answer is not replayed by the gateway on the next request."""
    async with client.get(gateway.url + "/set-cookie", headers={"Host": host}) as response:
        assert len(response.headers.getall("Set-Cookie")) == 2
    info = await _echo(client, gateway, host)
    assert _upstream_headers(info, "Cookie") == []


async def test_client_cookies_reach_the_sandbox(
    gateway: GatewayHandle, host: str, client: aiohttp.ClientSession
) -> None:
    """The client's own Cookie header is passed on as sent."""
    info = await _echo(client, gateway, host, headers={"Cookie": "a=1; b=2"})
    assert _upstream_headers(info, "Cookie") == ["a=1; b=2"]


async def _raw_upstream(
    address: str, answer: bytes, *, read_body: bool = False
) -> tuple[asyncio.Server, int, list[bytes]]:
    """A server that reads one request (head, and a Content-Length body if ``read_body``)
    and answers ``answer`` verbatim; ``received`` collects the request bytes."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            body = b""
            if read_body:
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        body = await reader.readexactly(int(line.split(b":")[1]))
            received.append(head + body)
            writer.write(answer)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, address, 0)
    port = server.sockets[0].getsockname()[1]
    return server, port, received


async def test_response_headers_pass_unchanged_except_hop_by_hop(
    gateway: GatewayHandle, writer: RouteWriter
) -> None:
    """The sandbox's headers come back in order and case; hop-by-hop and Connection-listed
    ones are dropped; the gateway adds no Content-Type or Server of its own."""
    answer = (
        b"HTTP/1.1 200 Fine\r\n"
        b"X-One: 1\r\n"
        b"x-lower-case: v\r\n"
        b"Connection: X-Hop\r\n"
        b"X-Hop: secret\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Content-Length: 5\r\n"
        b"\r\nhello"
    )
    server, port, _ = await _raw_upstream("127.0.0.2", answer)
    try:
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, port)
        response = await exchange(
            "127.0.0.1", gateway.port,
            request_bytes("GET", "/", [("Host", gateway.host(port, LABEL))]),
        )  # fmt: skip
    finally:
        server.close()
        await server.wait_closed()
    assert (response.status, response.reason, response.body) == (200, "Fine", b"hello")
    names = [k for k, _ in response.headers]
    assert "X-One" in names and "x-lower-case" in names
    assert names.index("X-One") < names.index("x-lower-case")
    lower = [n.lower() for n in names]
    assert "x-hop" not in lower and "keep-alive" not in lower
    assert "content-type" not in lower
    assert "server" not in lower
    assert response.header("Content-Length") == "5"
    assert response.header("X-Request-Id")


async def test_204_304_and_head_framing(gateway: GatewayHandle, host: str) -> None:
    """204 and 304 have no body, HEAD keeps Content-Length without a body, and the
    keep-alive connection stays in sync for the next request."""
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(request_bytes("GET", "/status/204", [("Host", host)]))
        no_content = await conn.read_response()
        await conn.send(request_bytes("GET", "/status/304", [("Host", host)]))
        not_modified = await conn.read_response()
        await conn.send(request_bytes("HEAD", "/bytes?size=1000", [("Host", host)]))
        head = await conn.read_response(head_request=True)
        await conn.send(request_bytes("GET", "/after", [("Host", host)]))
        after = await conn.read_response()
    assert no_content.status == 204 and no_content.body == b""
    assert no_content.header("Transfer-Encoding") is None
    assert no_content.header("Content-Length") in (None, "0")
    assert not_modified.status == 304 and not_modified.body == b""
    assert not_modified.header("Transfer-Encoding") is None
    assert head.status == 200 and head.header("Content-Length") == "1000"
    assert after.status == 200 and _raw_echo(after.body)["path_qs"] == "/after"


async def test_expect_100_continue(gateway: GatewayHandle, host: str) -> None:
    """Headers with Expect get 100 Continue; then the body goes up and the answer comes back."""
    body = b"z" * 5000
    headers = [
        ("Host", host), ("Content-Length", str(len(body))), ("Expect", "100-continue"),
    ]  # fmt: skip
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(request_bytes("POST", "/upload", headers))
        interim = await conn.read_response(keep_interim=True)
        assert interim.status == 100
        await conn.send(body)
        final = await conn.read_response()
    assert final.status == 200
    assert json.loads(final.body) == {
        "sha256": hashlib.sha256(body).hexdigest(), "length": len(body),
    }  # fmt: skip


async def test_chunked_upload(gateway: GatewayHandle, host: str) -> None:
    """A chunked request body (raw chunks) arrives whole at the sandbox."""
    parts = [b"a" * 10, b"b" * 70000, b"c"]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    headers = [("Host", host), ("Transfer-Encoding", "chunked")]
    response = await exchange(
        "127.0.0.1", gateway.port, request_bytes("POST", "/upload", headers, wire)
    )
    whole = b"".join(parts)
    assert json.loads(response.body) == {
        "sha256": hashlib.sha256(whole).hexdigest(), "length": len(whole),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------
# Connections to the sandbox
# ---------------------------------------------------------------------------------------


PEER = web.AppKey("peers", list[int])


def _peer_app(name: str) -> web.Application:
    """Answers with the gateway-side port of the connection each request came on."""
    app = web.Application()
    app[PEER] = []

    async def peer(request: web.Request) -> web.Response:
        assert request.transport is not None
        peername = request.transport.get_extra_info("peername")
        request.app[PEER].append(peername[1])
        return web.json_response({"upstream": name, "peer_port": peername[1]})

    app.router.add_route("*", "/{tail:.*}", peer)
    return app


async def _peer_port(
    client: aiohttp.ClientSession, gateway: GatewayHandle, host: str
) -> tuple[str, int]:
    async with client.get(gateway.url + "/", headers={"Host": host}) as response:
        assert response.status == 200, await response.text()
        data = await response.json()
    return data["upstream"], data["peer_port"]


async def test_keep_alive_reuse_and_per_incarnation_pools(
    gateway: GatewayHandle, writer: RouteWriter, client: aiohttp.ClientSession
) -> None:
    """Sequential requests share one upstream connection; a pause + resume (a new
    incarnation) never reuses it, and a resume at a new address goes to the new address."""
    first = await start_upstream("127.0.0.2", _peer_app("a"))
    second = await start_upstream("127.0.0.3", _peer_app("b"), port=first.port)
    try:
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, first.port)
        host = gateway.host(first.port, LABEL)
        name1, port1 = await _peer_port(client, gateway, host)
        name2, port2 = await _peer_port(client, gateway, host)
        assert (name1, name2) == ("a", "a")
        assert port1 == port2  # the pooled connection was reused

        await writer.pause(SANDBOX)
        await writer.resume(SANDBOX)  # same address, new incarnation
        name3, port3 = await _peer_port(client, gateway, host)
        assert name3 == "a"
        assert port3 != port1  # a fresh connection for the new incarnation

        await writer.pause(SANDBOX)
        await writer.resume(SANDBOX, address="127.0.0.3")
        name4, _ = await _peer_port(client, gateway, host)
        assert name4 == "b"
        assert first.app[PEER] == [port1, port2, port3]
    finally:
        await first.stop()
        await second.stop()


_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
# What the sandbox answers to each path: mostly the one answer, with a few that look
# like it (same size, or same head) but are not.
_REPEATED_HEAD_SCRIPT = {
    "/longer": _HEAD + b"helloXX",  # past its length: the connection is not reused
    "/one-byte-off": _HEAD.replace(b"plain", b"plaim") + b"hello",
    "/other-length": _HEAD.replace(b": 5", b": 2") + b"ok",
    "/other-body": _HEAD + b"HELLO",
}


def _repeated_head_reply(request: RecordedRequest) -> Reply:
    if request.method == "HEAD":
        return Reply(_HEAD)
    return Reply(_REPEATED_HEAD_SCRIPT.get(request.target, _HEAD + b"hello"))


async def test_a_repeated_answer_head_is_read_as_llhttp_reads_it(
    gateway: GatewayHandle, writer: RouteWriter
) -> None:
    """A sandbox answering a connection's requests with one head: from the third such
    answer on they are taken without the parser and relayed as the parser reads them;
    bytes that only look like that answer (one byte off, another length, a HEAD's
    answer, bytes past the body) are parsed."""
    steps = [  # the request, what the client gets, answers taken as known after it
        ("GET", "/1", b"hello", "text/plain", 0), ("GET", "/2", b"hello", "text/plain", 0),
        ("GET", "/3", b"hello", "text/plain", 1), ("HEAD", "/3", b"", "text/plain", 1),
        ("GET", "/other-body", b"HELLO", "text/plain", 2),
        ("GET", "/one-byte-off", b"hello", "text/plaim", 2),
        ("GET", "/other-length", b"ok", "text/plain", 2),
        ("GET", "/4", b"hello", "text/plain", 3), ("GET", "/longer", b"hello", "text/plain", 3),
        ("GET", "/5", b"hello", "text/plain", 3), ("GET", "/6", b"hello", "text/plain", 3),
        ("GET", "/7", b"hello", "text/plain", 4), ("HEAD", "/7", b"", "text/plain", 4),
    ]  # fmt: skip
    pool = gateway.running.handler.pool
    async with RecordingUpstream.start("127.0.0.2", script=_repeated_head_reply) as sandbox:
        host = await gateway.expose(writer, SANDBOX, sandbox.port)
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            for method, path, body, content_type, known in steps:
                await conn.send(request_bytes(method, path, [("Host", host)]))
                response = await conn.read_response(head_request=method == "HEAD")
                got = (response.status, response.body, response.header("Content-Type"))
                assert got == (200, body, content_type), (method, path)
                assert pool.known_answers == known, (method, path)
        # /longer's bytes past its body ended the first connection.
        assert [len(c.requests) for c in sandbox.connections] == [9, 4]


async def test_connect_retry_window_covers_a_late_server(
    redis: aioredis.Redis, redis_url: str, client: aiohttp.ClientSession
) -> None:
    """A server that starts listening a moment after the request began still gets it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    overrides = {"upstream": {"connect_retry_window_seconds": 2.0}}
    late: list[Upstream] = []

    async def start_late() -> None:
        await asyncio.sleep(200 * MS)
        late.append(await start_upstream("127.0.0.2", echo_app("late"), port=port))

    async with (
        running_gateway(redis_url, overrides) as gateway,
        route_writer(redis_url) as writer,
    ):
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, port)
        starter = asyncio.create_task(start_late())
        try:
            info = await _echo(client, gateway, gateway.host(port, LABEL))
        finally:
            await starter
            for server in late:
                await server.stop()
    assert info["upstream"] == "late"


async def test_http10_client_gets_a_close_delimited_body(gateway: GatewayHandle, host: str) -> None:
    """A chunked sandbox answer reaches an HTTP/1.0 client unchunked, ended by the close."""
    data = request_bytes("GET", "/stream?n=3&interval_ms=1", [("Host", host)], version="HTTP/1.0")
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(data)
        response = await conn.read_response()
    assert response.header("Transfer-Encoding") is None
    assert response.body == b"line 0\nline 1\nline 2\n"


async def test_pipelined_requests_are_answered_in_order(gateway: GatewayHandle, host: str) -> None:
    both = request_bytes("GET", "/one", [("Host", host)]) + request_bytes(
        "GET", "/two", [("Host", host)]
    )
    async with RawConnection.open("127.0.0.1", gateway.port) as conn:
        await conn.send(both)
        first = await conn.read_response()
        second = await conn.read_response()
    assert _raw_echo(first.body)["path_qs"] == "/one"
    assert _raw_echo(second.body)["path_qs"] == "/two"


async def test_an_early_answer_to_an_upload_is_relayed(
    gateway: GatewayHandle, writer: RouteWriter
) -> None:
    """A sandbox that answers 413 after the head, without reading the body (then closes
    its side and discards what still comes): the client gets the 413, not a 502, and
    without waiting for the upload to end."""

    async def handle(reader: asyncio.StreamReader, stream: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            stream.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!")
            stream.write_eof()
            while await reader.read(65536):  # a lingering close, as servers do
                pass
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            stream.close()

    server = await asyncio.start_server(handle, "127.0.0.2", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, port)
        size = 64 * 1024 * 1024
        headers = [("Host", gateway.host(port, LABEL)), ("Content-Length", str(size))]
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            await conn.send(request_bytes("POST", "/upload", headers))
            await conn.send(b"u" * 100_000)  # the rest of the 64 MiB never comes
            response = await conn.read_response(wait=10)
    finally:
        server.close()
        await server.wait_closed()
    assert (response.status, response.body) == (413, b"big!")


async def test_a_pooled_connection_the_sandbox_closed_is_retried_for_a_get(
    gateway: GatewayHandle, writer: RouteWriter, client: aiohttp.ClientSession
) -> None:
    """The sandbox drops a kept-alive connection just as the next request arrives (its
    idle timeout racing the pool): a bodiless request goes again on a fresh connection."""
    connections = 0

    async def handle(reader: asyncio.StreamReader, stream: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        mine = connections
        try:
            await reader.readuntil(b"\r\n\r\n")
            body = f"connection {mine}".encode()
            stream.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await stream.drain()
            await reader.readuntil(b"\r\n\r\n")  # the next request: dropped unanswered
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            stream.close()

    server = await asyncio.start_server(handle, "127.0.0.2", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, port)
        host = gateway.host(port, LABEL)
        for expected in ("connection 1", "connection 2"):
            async with client.get(gateway.url + "/", headers={"Host": host}) as response:
                assert response.status == 200
                assert await response.text() == expected
    finally:
        server.close()
        await server.wait_closed()


async def test_a_close_delimited_answer_is_relayed_whole(
    gateway: GatewayHandle, writer: RouteWriter
) -> None:
    """An HTTP/1.0-style sandbox (no length, no chunking, the end is its close): the
    client gets the whole body, properly framed, and the connection is not reused."""
    body = b"".join(b"line %d\n" % i for i in range(2000))
    server, port, received = await _raw_upstream("127.0.0.2", b"HTTP/1.0 200 OK\r\n\r\n" + body)
    try:
        await writer.create(SANDBOX, address="127.0.0.2")
        await writer.expose(SANDBOX, port)
        host = gateway.host(port, LABEL)
        async with RawConnection.open("127.0.0.1", gateway.port) as conn:
            for _ in range(2):
                await conn.send(request_bytes("GET", "/", [("Host", host)]))
                response = await conn.read_response()
                assert (response.status, response.body) == (200, body)
    finally:
        server.close()
        await server.wait_closed()
    assert len(received) == 2  # one connection per request
