"""Real clients without a browser: the ``websockets`` library and ``curl``.

They talk to the real ``gateway serve`` (the package's ``gateway`` fixture) in front of
in-process aiohttp upstreams on the sandbox address 127.0.0.2: the standard echo app
(``tests/support/upstreams.py``) and a WebSocket echo that accepts frames of up to
16 MiB. One sandbox, ``client``, exposes both ports; a second one, ``rwcurl``, exposes
the echo port with the hostRewrite option (written through the admin API).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import websockets
from aiohttp import WSMsgType, web
from websockets.asyncio.client import ClientConnection, connect

from tests.e2e.harness import LOCAL_DOMAIN, PUBLIC_DOMAIN, SANDBOX_ADDRESS, Gateway
from tests.support.upstreams import (
    OPEN_STREAMS,
    OPEN_WEBSOCKETS,
    HandlerStats,
    Upstream,
    echo_app,
    start_upstream,
)
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="package")]

MIB = 1024 * 1024
BIG_FRAME_LIMIT = 16 * MIB
CURL_TIMEOUT_SECONDS = 60.0
SANDBOX, LABEL = "client", "client"
REWRITE_SANDBOX, REWRITE_LABEL = "rwcurl", "rwcurl"


@dataclass(frozen=True)
class Upstreams:
    echo: Upstream
    big: Upstream


def _big_frames_app() -> web.Application:
    """A WebSocket echo at /ws that accepts messages of up to ``BIG_FRAME_LIMIT``."""

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=BIG_FRAME_LIMIT)
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    return app


@pytest_asyncio.fixture(scope="module", loop_scope="package")
async def upstreams(gateway: Gateway) -> AsyncIterator[Upstreams]:
    echo = await start_upstream(SANDBOX_ADDRESS, echo_app("echo"))
    big = await start_upstream(SANDBOX_ADDRESS, _big_frames_app())
    try:
        await gateway.cli("sandbox", "create", SANDBOX, "--address", SANDBOX_ADDRESS)
        await gateway.cli("ports", "expose", SANDBOX, str(echo.port))
        await gateway.cli("ports", "expose", SANDBOX, str(big.port))
        yield Upstreams(echo, big)
    finally:
        await big.stop()
        await echo.stop()


def _connect(gateway: Gateway, port: int, path: str = "/ws", **options: object) -> connect:
    """A websockets client for ``ws://{port}-client.box.localhost:{gw}{path}``.

    The URI gives the Host header; the TCP connection goes to the gateway's listener
    (``host``/``port`` override where the URI's name would resolve).
    """
    return connect(
        f"ws://{gateway.host(port, LABEL)}{path}",
        host="127.0.0.1", port=gateway.port, proxy=None,
        open_timeout=10, close_timeout=5, **options,  # type: ignore[arg-type]
    )  # fmt: skip


async def _closed_by_peer(ws: ClientConnection) -> websockets.ConnectionClosed:
    """Wait for the peer's close; return the exception carrying its code and reason."""
    try:
        async with asyncio.timeout(10):
            while True:
                await ws.recv()
    except websockets.ConnectionClosed as closed:
        return closed
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------
# websockets
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (["unknown", "superchat", "chat"], "superchat"),
        (["vite-hmr"], "vite-hmr"),
        (["nothing-the-sandbox-speaks"], None),
    ],
)
async def test_websockets_gets_the_subprotocol_the_sandbox_chose(
    gateway: Gateway, upstreams: Upstreams, offered: list[str], chosen: str | None
) -> None:
    """The gateway offers the client's subprotocols upstream and answers with the one the
    sandbox picked (or none), which the sandbox itself reports."""
    async with _connect(gateway, upstreams.echo.port, subprotocols=offered) as ws:
        assert ws.subprotocol == chosen
        await ws.send("!info")
        info = json.loads(await ws.recv())
    assert info["protocol"] == chosen
    sent = {k.lower(): v for k, v in info["headers"]}
    assert sent["host"] == gateway.host(upstreams.echo.port, LABEL)
    assert sent["x-forwarded-host"] == gateway.host(upstreams.echo.port, LABEL)


async def test_websockets_close_codes_and_pings_pass_both_ways(
    gateway: Gateway, upstreams: Upstreams
) -> None:
    """A sandbox's close code and reason reach the client; the client's reach the sandbox;
    a ping comes back as a pong."""
    async with _connect(gateway, upstreams.echo.port) as ws:
        pong = await ws.ping(b"are you there")
        async with asyncio.timeout(5):
            await pong
        await ws.send("close:4321:bye from the sandbox")
        closed = await _closed_by_peer(ws)
    assert closed.rcvd is not None
    assert (closed.rcvd.code, closed.rcvd.reason) == (4321, "bye from the sandbox")

    stats: HandlerStats = upstreams.echo.app[OPEN_WEBSOCKETS]
    before = len(stats.close_codes)
    async with _connect(gateway, upstreams.echo.port) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.close(4000, "bye from the client")
    await wait_until(lambda: len(stats.close_codes) > before, what="the sandbox to see the close")
    assert stats.close_codes[-1] == 4000


async def test_websockets_clean_close_is_answered_with_the_same_code(
    gateway: Gateway, upstreams: Upstreams
) -> None:
    """RFC 6455 section 5.5.1: the sandbox echoes the client's close code; the client must
    get that echo, not an error code made up by the gateway."""
    async with _connect(gateway, upstreams.echo.port) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.close(4000, "bye from the client")
    assert (ws.close_code, ws.close_reason) == (4000, "bye from the client")


@pytest.mark.parametrize("size_mib", [1, 4, 8])
async def test_websockets_large_frames_are_relayed_intact(
    gateway: Gateway, upstreams: Upstreams, size_mib: int
) -> None:
    """Binary and text frames of 1-8 MiB go through the gateway and back unchanged."""
    payload = random.Random(size_mib).randbytes(size_mib * MIB)
    text = payload.hex()[: size_mib * MIB]
    async with _connect(gateway, upstreams.big.port, max_size=BIG_FRAME_LIMIT) as ws:
        await ws.send(payload)
        echoed = await ws.recv()
        assert isinstance(echoed, bytes)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        await ws.send(text)
        assert await ws.recv() == text


async def test_websockets_a_frame_too_big_for_the_sandbox_closes_with_1009(
    gateway: Gateway, upstreams: Upstreams
) -> None:
    """The standard echo accepts 4 MiB (aiohttp's default); its 1009 reaches the client."""
    async with _connect(gateway, upstreams.echo.port, max_size=BIG_FRAME_LIMIT) as ws:
        await ws.send(bytes(8 * MIB))
        closed = await _closed_by_peer(ws)
    assert closed.rcvd is not None
    assert closed.rcvd.code == 1009


async def test_websockets_closed_with_1001_when_the_port_is_closed(
    gateway: Gateway, upstreams: Upstreams
) -> None:
    """DESIGN.md section 2: closing a port tears its WebSockets down with 1001 and a reason."""
    sandbox = "goaway1"
    await gateway.cli("sandbox", "create", sandbox, "--address", SANDBOX_ADDRESS)
    await gateway.cli("ports", "expose", sandbox, str(upstreams.echo.port))
    async with websockets.connect(
        f"ws://{gateway.host(upstreams.echo.port, 'goaway')}/ws",
        host="127.0.0.1", port=gateway.port, proxy=None, open_timeout=10, close_timeout=5,
    ) as ws:  # fmt: skip
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await gateway.cli("ports", "close", sandbox, str(upstreams.echo.port))
        closed = await _closed_by_peer(ws)
    assert closed.rcvd is not None
    assert closed.rcvd.code == 1001, (closed.rcvd.code, closed.rcvd.reason)
    assert closed.rcvd.reason


# ---------------------------------------------------------------------------------------
# curl
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurlResult:
    returncode: int
    stdout: bytes
    stderr: str


def _curl_args(gateway: Gateway, host: str, path: str, *options: str) -> list[str]:
    name = host.rpartition(":")[0]
    return [
        "curl", "--silent", "--show-error", "--noproxy", "*",
        "--resolve", f"{name}:{gateway.port}:127.0.0.1",
        *options, f"http://{host}{path}",
    ]  # fmt: skip


async def _curl(args: Sequence[str]) -> CurlResult:
    process = await asyncio.create_subprocess_exec(
        *args, "--max-time", str(int(CURL_TIMEOUT_SECONDS)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(CURL_TIMEOUT_SECONDS + 5):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return CurlResult(process.returncode or 0, stdout, stderr.decode(errors="replace"))


def _head_and_body(output: bytes) -> tuple[int, dict[str, str], bytes]:
    """Split ``curl --include`` output into status, headers (lowercase names) and body."""
    head, _, body = output.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


async def test_curl_chunked_upload_streams_through(
    gateway: Gateway, upstreams: Upstreams, tmp_path: Path
) -> None:
    """``curl -H 'Transfer-Encoding: chunked' --data-binary @file``: 24 MiB arrive intact."""
    body = tmp_path / "upload.bin"
    rng = random.Random(7)
    digest = hashlib.sha256()
    with body.open("wb") as out:
        for _ in range(24):
            block = rng.randbytes(MIB)
            digest.update(block)
            out.write(block)
    host = gateway.host(upstreams.echo.port, LABEL)
    options = [
        "--verbose", "-H", "Transfer-Encoding: chunked",
        "-H", "Content-Type: application/octet-stream", "--data-binary", f"@{body}",
    ]  # fmt: skip
    result = await _curl(_curl_args(gateway, host, "/upload", *options))
    assert result.returncode == 0, result.stderr
    assert "> Transfer-Encoding: chunked" in result.stderr, "curl really sent it chunked"
    assert json.loads(result.stdout) == {"sha256": digest.hexdigest(), "length": 24 * MIB}


async def test_curl_reads_server_sent_events_as_they_come(
    gateway: Gateway, upstreams: Upstreams
) -> None:
    """``curl -N`` on an endless SSE stream prints events while it runs; when curl goes
    away, the gateway ends the stream upstream too."""
    stats: HandlerStats = upstreams.echo.app[OPEN_STREAMS]
    cancelled_before = stats.cancelled
    host = gateway.host(upstreams.echo.port, LABEL)
    args = _curl_args(gateway, host, "/sse?n=0&interval_ms=100", "--no-buffer")
    process = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    events: list[str] = []
    try:
        async with asyncio.timeout(10):
            while len(events) < 3:
                line = (await process.stdout.readline()).decode()
                assert line, "the stream ended early"
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: ").strip())
        # The stream never ends (n=0): these events can only have come as they were sent.
        assert events == ["event 0", "event 1", "event 2"]
        assert stats.open >= 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await process.communicate()
    await wait_until(
        lambda: stats.cancelled > cancelled_before and stats.open == 0,
        timeout=5, what="the upstream SSE handler to be cancelled",
    )  # fmt: skip


async def test_curl_host_rewrite_written_through_the_admin_api(
    gateway: Gateway, upstreams: Upstreams
) -> None:
    """``{"hostRewrite": true}`` in the admin API: the sandbox gets ``Host: localhost:PORT``
    and the public host in X-Forwarded-Host; without it, the public Host itself."""
    port = upstreams.echo.port
    await gateway.api("POST", "/v1/sandboxes", {"id": REWRITE_SANDBOX, "address": SANDBOX_ADDRESS})
    exposed = await gateway.api(
        "POST", f"/v1/sandboxes/{REWRITE_SANDBOX}/ports", {"port": port, "hostRewrite": True}
    )
    assert exposed["port"] == port
    for domain in (PUBLIC_DOMAIN, LOCAL_DOMAIN):
        public = gateway.host(port, REWRITE_LABEL, domain)
        result = await _curl(_curl_args(gateway, public, "/hello?x=1"))
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
        headers = {k.lower(): v for k, v in seen["headers"]}
        assert headers["host"] == f"localhost:{port}"
        assert headers["x-forwarded-host"] == public
        assert seen["path_qs"] == "/hello?x=1"

    plain = gateway.host(port, LABEL, PUBLIC_DOMAIN)  # sandbox "client": no rewrite
    result = await _curl(_curl_args(gateway, plain, "/"))
    headers = {k.lower(): v for k, v in json.loads(result.stdout)["headers"]}
    assert headers["host"] == plain


async def test_curl_gets_json_errors_and_browsers_get_pages(
    gateway: Gateway, upstreams: Upstreams
) -> None:
    """A program gets the error as JSON, a browser-like Accept gets the HTML page; both
    carry the code in X-Gateway-Error and a request id."""
    host = gateway.host(4999, LABEL)  # sandbox "client" has no port 4999 exposed
    result = await _curl(_curl_args(gateway, host, "/", "--include"))
    status, headers, body = _head_and_body(result.stdout)
    assert status == 404
    assert headers["x-gateway-error"] == "port_not_exposed"
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["code"] == "port_not_exposed"
    assert error["port"] == 4999
    assert error["requestId"] == headers["x-request-id"]

    accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    result = await _curl(_curl_args(gateway, host, "/", "--include", "-H", f"Accept: {accept}"))
    status, headers, body = _head_and_body(result.stdout)
    assert status == 404
    assert headers["x-gateway-error"] == "port_not_exposed"
    assert headers["content-type"].startswith("text/html")
    assert b"Port 4999 is not exposed" in body
