"""A lean keep-alive HTTP/1.1 client connection for the bench's own Python clients.

``HttpConnection`` carries one request at a time on one TCP connection and parses the
answer with httptools (llhttp), so the client costs little next to what it measures.
``send`` returns a future (for the open-loop scheduler's callbacks); ``request`` awaits
it. A connection that failed or was closed by the server is ``broken`` and must not be
used again. Bodies are counted, and kept up to ``BODY_KEEP_BYTES``.
"""

from __future__ import annotations

import asyncio
import typing
from dataclasses import dataclass, field

import httptools

BODY_KEEP_BYTES = 64 * 1024


@dataclass(slots=True)
class Response:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)  # names in lower case
    body: bytes = b""
    body_bytes: int = 0


def request_bytes(
    path: str, host: str, *, method: str = "GET", extra: tuple[tuple[str, str], ...] = ()
) -> bytes:
    """A request head with no body: ``METHOD path HTTP/1.1``, Host, and ``extra``."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class HttpConnection(asyncio.Protocol):
    """One client connection; see the module docstring."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.broken = False
        self._parser = httptools.HttpResponseParser(self)
        self._future: asyncio.Future[Response] | None = None
        self._response = Response()
        self._body: list[bytes] = []
        self._kept = 0

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, port)
        return protocol

    def send(self, raw: bytes) -> asyncio.Future[Response]:
        """Send one complete request; the future gets its response (or the error)."""
        assert self._future is None, "one request at a time"
        future = asyncio.get_running_loop().create_future()
        if self.broken or self.transport is None:
            future.set_exception(ConnectionError("connection is closed"))
            return future
        self._future = future
        self._response = Response()
        self._body = []
        self._kept = 0
        self.transport.write(raw)
        return future

    async def request(self, raw: bytes) -> Response:
        return await self.send(raw)

    def close(self) -> None:
        self.broken = True
        if self.transport is not None:
            self.transport.close()

    # asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = True
        self._fail(ConnectionError(f"connection lost: {exc}"))

    # httptools callbacks ------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._response.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self._response.body_bytes += len(body)
        if self._kept < BODY_KEEP_BYTES:
            self._body.append(body)
            self._kept += len(body)

    def on_message_complete(self) -> None:
        response = self._response
        response.status = self._parser.get_status_code()
        response.body = b"".join(self._body)
        if not self._parser.should_keep_alive():
            self.close()
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_result(response)

    def _fail(self, exc: Exception) -> None:
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_exception(exc)
