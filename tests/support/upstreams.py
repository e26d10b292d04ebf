"""Real aiohttp upstream servers for integration tests, and the apps they serve.

An upstream plays a sandbox port: ``start_upstream("127.0.0.2", echo_app("a"))`` binds
127.0.0.2 on port 0 and returns the port the kernel chose, which becomes the route's
address while the public ``{port}`` label stays e.g. 3000. Distinct loopback addresses
(127.0.0.2, 127.0.0.3, ...) let one test tell several sandboxes apart.

``echo_app(name)`` serves, besides the echo at every other path:

    /stream?n=N&interval_ms=M       chunked text, N lines (n=0: until the client leaves)
    /sse?n=N&interval_ms=M          text/event-stream, N events (n=0: until the client leaves)
    /bytes?size=N[&interval_ms=M]   N deterministic bytes with Content-Length
    /slow-headers?delay_ms=M        answers after M ms
    /status/{code}                  that status (204 and 304 bodiless, 302 to /elsewhere)
    /set-cookie                     two Set-Cookie headers
    /gzip                           GZIP_PAYLOAD gzip-compressed, Content-Encoding: gzip
    /upload                         {"sha256", "length"} of the streamed request body
    /ws                             WebSocket echo (subprotocols chat, vite-hmr, superchat)
    /ws-reject                      403 to the upgrade

Long-lived handlers (stream, sse, bytes) count themselves in ``app[OPEN_STREAMS]`` and
WebSockets in ``app[OPEN_WEBSOCKETS]``, so a test can see an abandoned stream torn down
upstream: ``await wait_until(lambda: stats.cancelled == 1)``.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import json
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

__all__ = [
    "BLOCK_SIZE",
    "GZIP_PAYLOAD",
    "OPEN_STREAMS",
    "OPEN_WEBSOCKETS",
    "UPSTREAM_NAME",
    "WS_PROTOCOLS",
    "HandlerStats",
    "Upstream",
    "deterministic_bytes",
    "deterministic_chunks",
    "echo_app",
    "expected_sha256",
    "start_upstream",
]

BLOCK_SIZE = 64 * 1024
_SEED = 20240601
WS_PROTOCOLS = ("chat", "vite-hmr", "superchat")
GZIP_PAYLOAD = b"hello from a gzip upstream\n" * 64
# Cleanup waits this long for open handlers (an n=0 SSE stream never ends by itself)
# before cancelling them; aiohttp's 60 s default would stall every teardown.
SHUTDOWN_TIMEOUT_SECONDS = 0.5


@dataclass
class HandlerStats:
    """Counts of one kind of long-lived handler in one app.

    Attributes:
        started: handlers that began answering.
        open: handlers running now.
        completed: handlers that finished on their own.
        cancelled: handlers ended early because the client left (cancelled by
            ``handler_cancellation``, or a write hit a closed connection).
        close_codes: for WebSockets, the close code seen when each handler ended.
    """

    started: int = 0
    open: int = 0
    completed: int = 0
    cancelled: int = 0
    close_codes: list[int | None] = field(default_factory=list)

    @asynccontextmanager
    async def track(self) -> AsyncIterator[None]:
        """Count the enclosed handler body; classify how it ended."""
        self.started += 1
        self.open += 1
        try:
            yield
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            raise
        else:
            self.completed += 1
        finally:
            self.open -= 1


OPEN_STREAMS = web.AppKey("open_streams", HandlerStats)
OPEN_WEBSOCKETS = web.AppKey("open_websockets", HandlerStats)
UPSTREAM_NAME = web.AppKey("upstream_name", str)


# ---------------------------------------------------------------------------------------
# Deterministic content
# ---------------------------------------------------------------------------------------


@functools.cache
def _block() -> bytes:
    return random.Random(_SEED).randbytes(BLOCK_SIZE)


def deterministic_chunks(size: int, *, chunk_size: int = BLOCK_SIZE) -> Iterator[bytes]:
    """Yield ``size`` bytes of fixed pseudo-random content, ``chunk_size`` at a time.

    The content is one 64 KiB block from a fixed seed, repeated; any prefix of it is the
    same for every size, so a truncated download compares equal to a shorter expectation.
    """
    block = _block()
    offset = 0
    while offset < size:
        start = offset % BLOCK_SIZE
        length = min(chunk_size, BLOCK_SIZE - start, size - offset)
        yield block[start : start + length]
        offset += length


def deterministic_bytes(size: int) -> bytes:
    """Return the first ``size`` bytes of the deterministic content (for small sizes)."""
    return b"".join(deterministic_chunks(size))


@functools.cache
def expected_sha256(size: int) -> str:
    """Hex sha256 of ``deterministic_bytes(size)``, computed without holding it in memory."""
    digest = hashlib.sha256()
    for chunk in deterministic_chunks(size):
        digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------


@dataclass
class Upstream:
    """A running upstream server.

    Attributes:
        host: the loopback address it is bound to.
        port: the port the kernel chose.
        runner: its aiohttp runner (``runner.app`` is the app, for its stats).
    """

    host: str
    port: int
    runner: web.AppRunner

    @property
    def url(self) -> str:
        """``http://HOST:PORT``."""
        return f"http://{self.host}:{self.port}"

    @property
    def app(self) -> web.Application:
        """The app it serves."""
        return self.runner.app

    async def stop(self) -> None:
        """Close the listener and end open handlers (cancelled after a short grace)."""
        await self.runner.cleanup()


async def start_upstream(host: str, app: web.Application, *, port: int = 0) -> Upstream:
    """Serve ``app`` on ``host:port`` and return once it accepts connections.

    Args:
        host: a loopback address (127.0.0.0/8).
        app: the application; ``echo_app(name)`` for the standard one.
        port: 0 to let the kernel choose (the default; never hard-code ports).

    Returns:
        The running upstream, with the bound port.
    """
    # handler_cancellation: a client that leaves must cancel the handler, as in production
    # aiohttp servers; otherwise abandoned streams would run on and hide leaks.
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    return Upstream(host=str(bound_host), port=int(bound_port), runner=runner)


# ---------------------------------------------------------------------------------------
# The echo app
# ---------------------------------------------------------------------------------------


def echo_app(name: str) -> web.Application:
    """Build the standard upstream app (see the module docstring for its routes).

    Args:
        name: reported as ``"upstream"`` in JSON answers, to tell upstreams apart.
    """
    app = web.Application()
    app[UPSTREAM_NAME] = name
    app[OPEN_STREAMS] = HandlerStats()
    app[OPEN_WEBSOCKETS] = HandlerStats()
    app.router.add_route("*", "/stream", _stream)
    app.router.add_route("*", "/sse", _sse)
    app.router.add_route("*", "/bytes", _bytes)
    app.router.add_route("*", "/slow-headers", _slow_headers)
    app.router.add_route("*", r"/status/{code:\d+}", _status)
    app.router.add_route("*", "/set-cookie", _set_cookie)
    app.router.add_route("*", "/gzip", _gzip)
    app.router.add_route("*", "/upload", _upload)
    app.router.add_get("/ws", _websocket)
    app.router.add_route("*", "/ws-reject", _ws_reject)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


def _int_query(request: web.Request, key: str, default: int) -> int:
    try:
        return int(request.query.get(key, default))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{key} must be an integer") from None


async def _body_digest(request: web.Request) -> tuple[str, int]:
    # Hash as chunks arrive: proves the body streamed through without holding it.
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    return digest.hexdigest(), length


def _request_info(request: web.Request) -> dict[str, object]:
    return {
        "upstream": request.app[UPSTREAM_NAME],
        "method": request.method,
        # raw_path: exactly what the gateway sent, before any decoding or normalising.
        "path_qs": request.raw_path,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "http_version": f"{request.version.major}.{request.version.minor}",
        "remote": request.remote,
    }


async def _echo(request: web.Request) -> web.Response:
    body_sha256, body_len = await _body_digest(request)
    info = _request_info(request)
    info.update(body_sha256=body_sha256, body_len=body_len)
    return web.json_response(info)


async def _stream(request: web.Request) -> web.StreamResponse:
    count = _int_query(request, "n", 5)
    interval = _int_query(request, "interval_ms", 10) / 1000
    async with request.app[OPEN_STREAMS].track():
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        index = 0
        while count == 0 or index < count:
            await response.write(f"line {index}\n".encode())
            index += 1
            if count == 0 or index < count:
                await asyncio.sleep(interval)
        await response.write_eof()
        return response


async def _sse(request: web.Request) -> web.StreamResponse:
    count = _int_query(request, "n", 5)
    interval = _int_query(request, "interval_ms", 10) / 1000
    async with request.app[OPEN_STREAMS].track():
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        index = 0
        while count == 0 or index < count:
            await response.write(f"id: {index}\ndata: event {index}\n\n".encode())
            index += 1
            if count == 0 or index < count:
                await asyncio.sleep(interval)
        await response.write_eof()
        return response


async def _bytes(request: web.Request) -> web.StreamResponse:
    size = _int_query(request, "size", BLOCK_SIZE)
    interval = _int_query(request, "interval_ms", 0) / 1000
    async with request.app[OPEN_STREAMS].track():
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        for chunk in deterministic_chunks(size):
            await response.write(chunk)
            if interval:
                await asyncio.sleep(interval)
        await response.write_eof()
        return response


async def _slow_headers(request: web.Request) -> web.Response:
    delay_ms = _int_query(request, "delay_ms", 100)
    await asyncio.sleep(delay_ms / 1000)
    return web.json_response({"upstream": request.app[UPSTREAM_NAME], "delay_ms": delay_ms})


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    if not 200 <= code <= 599:
        raise web.HTTPBadRequest(text="status must be 200-599")
    if code in (204, 304):
        return web.Response(status=code)
    headers = {"Location": "/elsewhere"} if code in (301, 302, 303, 307, 308) else {}
    return web.Response(status=code, headers=headers, text=f"status {code}\n")


async def _set_cookie(request: web.Request) -> web.Response:
    response = web.json_response({"upstream": request.app[UPSTREAM_NAME]})
    response.set_cookie("session", "abc123", path="/", httponly=True)
    response.set_cookie("theme", "dark", path="/", max_age=3600)
    return response


async def _gzip(request: web.Request) -> web.Response:
    # Compressed by hand (mtime=0: the same bytes every run) so the bytes on the wire are
    # exactly these; a gateway must pass them through, not decode them.
    return web.Response(
        body=gzip.compress(GZIP_PAYLOAD, mtime=0),
        headers={"Content-Type": "text/plain; charset=utf-8", "Content-Encoding": "gzip"},
    )


async def _upload(request: web.Request) -> web.Response:
    sha256, length = await _body_digest(request)
    return web.json_response({"sha256": sha256, "length": length})


async def _websocket(request: web.Request) -> web.WebSocketResponse:
    """Echo text and binary; ``close:CODE:REASON`` closes; ``!info`` answers the handshake."""
    stats = request.app[OPEN_WEBSOCKETS]
    ws = web.WebSocketResponse(protocols=WS_PROTOCOLS)
    await ws.prepare(request)
    async with stats.track():
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    await _websocket_text(request, ws, message.data)
                elif message.type == WSMsgType.BINARY:
                    await ws.send_bytes(message.data)
        finally:
            stats.close_codes.append(ws.close_code)
    return ws


async def _websocket_text(request: web.Request, ws: web.WebSocketResponse, text: str) -> None:
    if text.startswith("close:"):
        _, code, *reason = text.split(":", 2)
        await ws.close(code=int(code), message="".join(reason).encode())
    elif text == "!info":
        info = _request_info(request)
        info["protocol"] = ws.ws_protocol
        await ws.send_str(json.dumps(info))
    else:
        await ws.send_str(text)


async def _ws_reject(request: web.Request) -> web.Response:
    return web.Response(status=403, text="websocket refused by upstream\n")
