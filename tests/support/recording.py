"""A recording upstream (the catalogue's MIRROR) and loopback plumbing for adversarial tests.

``RecordingUpstream`` is a raw asyncio TCP server playing a sandbox port. Per TCP
connection it keeps exactly the bytes it received and the requests it parsed from them
(with httptools, the llhttp parser, strict mode), and answers each parsed request with
what a script returns: raw bytes, so a test can send a hostile response that no HTTP
library would produce.

    async with RecordingUpstream.start("127.0.0.2", script=lambda req: OK) as mirror:
        ...
        assert [r.target for r in mirror.requests] == ["/a", "/b"]

The smuggling oracle (catalogue SMUG-25) is ``desync_free()``: every connection's bytes
parsed completely into requests, with no parse error and no bytes left over after the
last complete message, so nothing a client smuggled rode inside the gateway's framing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httptools

__all__ = [
    "OK",
    "RecordedConnection",
    "RecordedRequest",
    "RecordingUpstream",
    "Reply",
    "ok_reply",
]

# Longest a hostile "endless" reply writes before giving up (bounded in size and time).
_ENDLESS_MAX_BYTES = 256 * 1024 * 1024
_ENDLESS_CHUNK = b"x" * 16384


@dataclass
class RecordedRequest:
    """One request as the upstream parsed it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    complete: bool = False

    def header(self, name: str) -> str | None:
        """The first value of ``name`` (any case), or None."""
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        key = name.lower()
        return [v for k, v in self.headers if k.lower() == key]


@dataclass
class Reply:
    """What the upstream sends for one request.

    Attributes:
        data: raw bytes written as they are.
        then: ``"keep"`` (keep-alive: read the next request), ``"close"`` (FIN after
            ``data``), ``"reset"`` (RST after ``data``), ``"hang"`` (send nothing more,
            discard what arrives, until the peer leaves), ``"endless"`` (after ``data``,
            write body bytes until the peer leaves; bounded at 256 MiB).
        early: answer as soon as the head is parsed, without waiting for the body (an
            app refusing an upload, catalogue SMUG-18/UPR-19); then the connection closes.
    """

    data: bytes
    then: str = "keep"
    early: bool = False


def ok_reply(body: bytes = b"ok", *, extra: bytes = b"") -> Reply:
    """A well-formed 200 with ``Content-Length`` and optional extra raw header lines."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra)
    return Reply(head + body)


OK = ok_reply()

Script = Callable[["RecordedRequest"], Reply]


@dataclass
class RecordedConnection:
    """One accepted TCP connection: every byte received and the requests parsed."""

    received: bytearray = field(default_factory=bytearray)
    requests: list[RecordedRequest] = field(default_factory=list)
    parse_error: str | None = None
    closed: bool = False
    # The script answered before the body (Reply.early): unread bytes are expected then.
    answered_early: bool = False

    @property
    def trailing_bytes(self) -> bool:
        """Whether bytes arrived that did not (yet) form a complete request."""
        return bool(self.requests) and not self.requests[-1].complete and not self.answered_early


class _Parsing:
    """httptools callbacks filling one connection's request list."""

    def __init__(self, connection: RecordedConnection) -> None:
        self.connection = connection
        self.current: RecordedRequest | None = None
        self._url = bytearray()
        self.heads: asyncio.Queue[RecordedRequest] = asyncio.Queue()
        self.done: asyncio.Queue[RecordedRequest] = asyncio.Queue()
        self.parser = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self.current = RecordedRequest(method="", target="", headers=[])
        self._url.clear()
        self.connection.requests.append(self.current)

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.method = self.parser.get_method().decode("latin-1")
        self.current.target = self._url.decode("latin-1")
        self.heads.put_nowait(self.current)

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body += body

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.current.complete = True
        self.done.put_nowait(self.current)


class RecordingUpstream:
    """A raw TCP server on ``host``, port 0, answering each request with ``script(req)``."""

    def __init__(self, host: str, script: Script) -> None:
        self.host = host
        self.port = 0
        self.script = script
        self.connections: list[RecordedConnection] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls, host: str, *, script: Script | None = None
    ) -> AsyncIterator[RecordingUpstream]:
        """Listen on ``host`` port 0 for the duration of the ``async with``."""
        upstream = cls(host, script or (lambda _request: OK))
        upstream._server = await asyncio.start_server(upstream._serve, host, 0)
        upstream.port = upstream._server.sockets[0].getsockname()[1]
        try:
            yield upstream
        finally:
            await upstream.stop()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request parsed, over all connections, in arrival order per connection."""
        return [r for c in self.connections for r in c.requests]

    def desync_free(self) -> bool:
        """The smuggling oracle: every connection parsed cleanly into complete requests.

        False if any connection had a parse error or ended with bytes that are not a
        complete request (an open connection in the middle of a streamed body counts:
        call this once the exchange is over).
        """
        return all(c.parse_error is None and not c.trailing_bytes for c in self.connections)

    # Private methods ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        connection = RecordedConnection()
        self.connections.append(connection)
        parsing = _Parsing(connection)
        try:
            await self._converse(reader, writer, connection, parsing)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            connection.closed = True
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _converse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connection: RecordedConnection,
        parsing: _Parsing,
    ) -> None:
        answered = 0
        while True:
            # Answer what is complete (or, for early replies, what has a head) first.
            while answered < len(connection.requests):
                request = connection.requests[answered]
                if not request.method:
                    break
                reply = self.script(request)
                if not (request.complete or reply.early):
                    break
                answered += 1
                if not await self._send(reader, writer, reply):
                    return
                if reply.early:
                    connection.answered_early = True
                    return
            data = await reader.read(65536)
            if not data:
                return
            connection.received += data
            try:
                parsing.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                connection.parse_error = "upgrade"
                return
            except httptools.HttpParserError as exc:
                connection.parse_error = str(exc) or type(exc).__name__
                return

    async def _send(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: Reply
    ) -> bool:
        """Write ``reply``; False when the connection is to end."""
        writer.write(reply.data)
        await writer.drain()
        if reply.then == "close":
            return False
        if reply.then == "reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if reply.then == "hang":
            # Answer nothing more, but notice the peer leaving (EOF or reset) or stop().
            while await reader.read(65536):
                pass
            return False
        if reply.then == "endless":
            sent = 0
            while sent < _ENDLESS_MAX_BYTES:
                writer.write(_ENDLESS_CHUNK)
                await writer.drain()
                sent += len(_ENDLESS_CHUNK)
            return False
        return True
