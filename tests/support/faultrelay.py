"""A fault-injecting TCP relay for tests (toxiproxy is not packaged here).

``FaultRelay`` listens on a loopback port and forwards every connection to one target
(a sandbox port or Redis). Faults are switched at runtime on ``relay.faults`` and apply
to bytes forwarded from then on, both ways:

* ``latency_seconds``: each segment waits this long before it is forwarded;
* ``bytes_per_second``: a bandwidth cap per direction per connection;
* ``slice_bytes``: segments are cut into pieces this small (each written on its own);
* ``blackhole``: connections are accepted and kept, nothing is forwarded either way
  (new connections are not dialled through at all);
* ``reset()``: every open connection is aborted with RST (SO_LINGER 0) on both sides;
* ``half_close()``: the target's side is shut for writing (the client sees EOF on its
  reads while it may still send).

Counters (``connections``, ``open_connections``, ``bytes_up``, ``bytes_down``) let a test
check that traffic took the relay. Loopback only: the relay binds 127.0.0.1 port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

CHUNK_BYTES = 64 * 1024


@dataclass(slots=True)
class Faults:
    """The faults in force; mutate the fields at any time."""

    latency_seconds: float = 0.0
    bytes_per_second: int | None = None
    slice_bytes: int | None = None
    blackhole: bool = False

    def clear(self) -> None:
        """Back to a transparent relay."""
        self.latency_seconds = 0.0
        self.bytes_per_second = None
        self.slice_bytes = None
        self.blackhole = False


@dataclass(slots=True, eq=False)
class _Pair:
    client: asyncio.StreamWriter
    target: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close ``writer``'s socket so the peer gets RST, not FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultRelay:
    """One listening relay to ``target_host:target_port``; start with ``await start()``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.faults = Faults()
        self.connections = 0
        self.bytes_up = 0  # client -> target
        self.bytes_down = 0  # target -> client
        self._pairs: set[_Pair] = set()
        self._server: asyncio.Server | None = None
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    async def start(self) -> FaultRelay:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        """Stop listening and abort every open connection."""
        if self._server is not None:
            self._server.close()
        self.reset()
        for pair in list(self._pairs):
            for task in pair.tasks:
                task.cancel()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()

    def reset(self) -> None:
        """Abort every open connection with RST on both sides."""
        for pair in list(self._pairs):
            _abort_with_rst(pair.client)
            if pair.target is not None:
                _abort_with_rst(pair.target)

    def half_close(self) -> None:
        """Send FIN towards every client (as if the target had shut its writing side)."""
        for pair in list(self._pairs):
            if pair.client.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    pair.client.write_eof()

    async def __aenter__(self) -> FaultRelay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # Private ------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        pair = _Pair(client=writer)
        self._pairs.add(pair)
        try:
            if self.faults.blackhole:
                # Keep the connection, forward nothing: read and drop until it is closed.
                while await reader.read(CHUNK_BYTES):
                    pass
                return
            try:
                target_reader, pair.target = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                _abort_with_rst(writer)
                return
            up = asyncio.ensure_future(self._pipe(reader, pair.target, up=True))
            down = asyncio.ensure_future(self._pipe(target_reader, writer, up=False))
            pair.tasks = [up, down]
            await asyncio.gather(up, down, return_exceptions=True)
        finally:
            self._pairs.discard(pair)
            for w in (pair.client, pair.target):
                if w is not None:
                    w.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        try:
            while data := await reader.read(CHUNK_BYTES):
                while self.faults.blackhole:
                    # Swallowed while the hole is open; bounded by the connection's life.
                    data = b""
                    await asyncio.sleep(0.05)
                if data:
                    await self._forward(data, writer, up=up)
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            writer.transport.abort()

    async def _forward(self, data: bytes, writer: asyncio.StreamWriter, *, up: bool) -> None:
        faults = self.faults
        step = faults.slice_bytes or len(data)
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            delay = faults.latency_seconds
            if faults.bytes_per_second:
                delay += len(piece) / faults.bytes_per_second
            if delay:
                await asyncio.sleep(delay)
            writer.write(piece)
            await writer.drain()
            if up:
                self.bytes_up += len(piece)
            else:
                self.bytes_down += len(piece)
