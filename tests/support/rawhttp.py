"""A tiny raw-socket HTTP/1.1 client for byte-exact checks.

aiohttp's client normalises targets, adds headers and hides framing; this one sends the
exact bytes a test writes and reads the raw response back: the status line, the headers
in order and as sent (duplicates kept), and the body with its framing undone
(Content-Length, chunked, or until close). A body that ends early raises
``IncompleteBody`` carrying what did arrive, so a test can tell an aborted transfer from a
complete one.

    async with RawConnection.open("127.0.0.1", port) as conn:
        await conn.send(b"GET / HTTP/1.1\\r\\nHost: ...\\r\\n\\r\\n")
        response = await conn.read_response()

Every read is bounded by ``wait`` seconds (``TimeoutError`` after it): a test never
hangs on a gateway that stopped answering.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

__all__ = ["IncompleteBody", "RawConnection", "RawResponse", "exchange", "request_bytes"]

DEFAULT_TIMEOUT_SECONDS = 5.0
_MAX_HEAD_BYTES = 64 * 1024


class IncompleteBody(Exception):
    """The connection ended before the body its framing announced was complete."""

    def __init__(self, message: str, partial: bytes) -> None:
        super().__init__(message)
        self.partial = partial


@dataclass(frozen=True, slots=True)
class RawResponse:
    """One response as it came off the wire (body with its framing undone)."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    head: bytes  # the raw status line and headers, CRLF CRLF included

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        """Every value of header ``name`` (any case), in order."""
        key = name.lower()
        return [v for k, v in self.headers if k.lower() == key]


def request_bytes(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes = b"",
    *,
    version: str = "HTTP/1.1",
) -> bytes:
    """Build a request head (and body) from parts, exactly as given (no headers added)."""
    lines = [f"{method} {target} {version}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class RawConnection:
    """One TCP connection that sends raw bytes and parses raw responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, host: str, port: int, *, wait: float = DEFAULT_TIMEOUT_SECONDS
    ) -> AsyncIterator[RawConnection]:
        """Connect to ``host:port`` for the duration of the ``async with``."""
        async with asyncio.timeout(wait):
            reader, writer = await asyncio.open_connection(host, port)
        connection = cls(reader, writer)
        try:
            yield connection
        finally:
            await connection.close()

    async def send(self, data: bytes) -> None:
        """Write ``data`` as is and wait until it is handed to the kernel."""
        self.writer.write(data)
        await self.writer.drain()

    async def read_head(
        self, *, wait: float = DEFAULT_TIMEOUT_SECONDS
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Read one response head: (status, reason, headers, raw head bytes).

        Raises:
            IncompleteBody: the connection closed before a complete head (partial = bytes).
            TimeoutError: nothing complete within ``wait`` seconds.
        """
        async with asyncio.timeout(wait):
            try:
                raw = await self.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                raise IncompleteBody("the connection closed inside a head", exc.partial) from None
            except asyncio.LimitOverrunError:
                raise AssertionError("response head too large") from None
        lines = raw[:-4].decode("latin-1").split("\r\n")
        _version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        return int(code), reason, headers, raw

    async def read_response(
        self,
        *,
        head_request: bool = False,
        wait: float = DEFAULT_TIMEOUT_SECONDS,
        keep_interim: bool = False,
    ) -> RawResponse:
        """Read one response; interim (1xx) responses are skipped unless ``keep_interim``.

        Raises:
            IncompleteBody: the body ended before its framing said it would.
            TimeoutError: no complete response within ``wait`` seconds.
        """
        async with asyncio.timeout(wait):
            while True:
                status, reason, headers, head = await self.read_head(wait=wait)
                if 100 <= status < 200 and status != 101 and not keep_interim:
                    continue
                break
            body = await self._read_body(status, headers, head_request=head_request)
        return RawResponse(status, reason, headers, body, head)

    async def read_until_close(self, *, wait: float = DEFAULT_TIMEOUT_SECONDS) -> bytes:
        """Everything the peer sends until it closes (a reset counts as a close)."""
        chunks = []
        async with asyncio.timeout(wait):
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)

    async def closed_by_peer(self, *, wait: float = DEFAULT_TIMEOUT_SECONDS) -> bool:
        """Whether the peer closes (or resets) the connection within ``wait`` seconds,
        with no further bytes."""
        try:
            async with asyncio.timeout(wait):
                data = await self.reader.read(1)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    # Private methods ------------------------------------------------------------------

    async def _read_body(
        self, status: int, headers: list[tuple[str, str]], *, head_request: bool
    ) -> bytes:
        if head_request or status in (204, 304) or 100 <= status < 200:
            return b""
        names = {k.lower(): v for k, v in headers}
        if "chunked" in names.get("transfer-encoding", "").lower():
            return await self._read_chunked()
        length = names.get("content-length")
        if length is not None:
            try:
                return await self.reader.readexactly(int(length))
            except asyncio.IncompleteReadError as exc:
                raise IncompleteBody(
                    f"{len(exc.partial)} of {length} body bytes", exc.partial
                ) from None
            except ConnectionResetError:
                raise IncompleteBody("reset inside a Content-Length body", b"") from None
        return await self.read_until_close()

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        try:
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    # Trailers (none expected) end with an empty line.
                    while await self.reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    return bytes(body)
                body += await self.reader.readexactly(size)
                await self.reader.readexactly(2)
        except asyncio.IncompleteReadError as exc:
            raise IncompleteBody("the connection closed inside a chunked body", bytes(body)) from (
                exc
            )
        except ConnectionResetError:
            raise IncompleteBody("reset inside a chunked body", bytes(body)) from None


async def exchange(
    host: str,
    port: int,
    data: bytes,
    *,
    head_request: bool = False,
    wait: float = DEFAULT_TIMEOUT_SECONDS,
) -> RawResponse:
    """Open a connection, send ``data``, read one response, close."""
    async with RawConnection.open(host, port, wait=wait) as connection:
        await connection.send(data)
        return await connection.read_response(head_request=head_request, wait=wait)
