"""The benchmark's floor: a bare TCP relay on uvloop, no HTTP at all.

Run as ``python -m bench.relay --upstream HOST:PORT``. It listens on 127.0.0.1 port 0,
prints one JSON line ``{"event": "ready", "port": N}`` and copies bytes both ways between
each client connection and a connection of its own to the upstream, with the gateway's
flow control (each side read only while the other side's socket buffer has room, 512 KiB)
and nothing else: no parsing, no routing, no logging. What Python and the event loop
cost for moving a request and its answer through a second process, so the gateway's
figures can be read against the fastest proxy this runtime allows (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import typing

import uvloop

WRITE_HIGH_WATER_BYTES = 512 * 1024


class _Side(asyncio.Protocol):
    """One socket of a pair; bytes it reads go to its peer's transport."""

    def __init__(self, peer: _Side | None = None) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []  # client bytes before the upstream connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)
        if self.peer is not None:  # the upstream side: flush what the client sent early
            self.peer.peer = self
            for data in self.peer.pending:
                self.transport.write(data)
            self.peer.pending.clear()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
        else:
            peer.transport.write(data)

    def eof_received(self) -> bool | None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


async def _serve(upstream_host: str, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    connects: set[asyncio.Task[object]] = set()

    def accepted() -> _Side:
        client = _Side()
        task = loop.create_task(
            loop.create_connection(lambda: _Side(client), upstream_host, upstream_port)
        )
        connects.add(task)
        task.add_done_callback(connects.discard)
        return client

    server = await loop.create_server(accepted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"event": "ready", "port": port}), flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__)
    parser.add_argument("--upstream", required=True, help="HOST:PORT to relay to")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    uvloop.run(_serve(host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
