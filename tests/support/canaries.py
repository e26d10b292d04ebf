"""Loopback canaries: listeners that must never be reached, counting who reaches them.

A canary stands in for something the gateway must never dial: a cloud metadata service,
Redis, an admin port, the target of a sandbox's ``Location:``. It binds a 127.0.0.x
address on port 0, counts every TCP connection and the bytes received, and closes.

    async with Canary.start("127.0.0.3") as metadata:
        ...
        assert metadata.connections == 0
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

__all__ = ["Canary"]


class Canary:
    """A TCP listener on ``host`` port 0 that records connections and closes them."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 0
        self.connections = 0
        self.received = bytearray()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, host: str, port: int = 0) -> AsyncIterator[Canary]:
        """Listen on ``host:port`` (0: any) for the duration of the ``async with``."""
        if not host.startswith("127."):
            raise ValueError("canaries are loopback only")
        canary = cls(host)
        canary._server = await asyncio.start_server(canary._hit, host, port)
        canary.port = canary._server.sockets[0].getsockname()[1]
        try:
            yield canary
        finally:
            canary._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(canary._server.wait_closed(), 2.0)

    async def _hit(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(Exception):
            self.received += await asyncio.wait_for(reader.read(4096), 0.2)
        writer.close()
