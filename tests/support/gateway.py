"""A real gateway for tests: in-process on loopback port 0, or ``gateway serve`` as a process.

``running_gateway(redis_url)`` starts the whole gateway (public listener, admin API,
watcher) inside the test's event loop, on 127.0.0.1 port 0, and yields a handle with
the bound addresses. ``ServeProcess`` runs the real ``gateway serve`` command and reads
its ready line, for tests of the command itself; it is stopped by pid.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.config import Config, load_config
from gateway.routing import store
from gateway.server import Running, run_gateway

DOMAIN = "box.test"


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def test_config(redis_url: str, overrides: Mapping[str, Any] | None = None) -> Config:
    """A loopback config: port 0 listeners, ``box.test``, sandbox networks 127.0.0.0/8."""
    base: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "domains": [DOMAIN],
        "redis": {"url": redis_url},
        "cache": {"heartbeat_interval_seconds": 0.2},
        "upstream": {"connect_retry_window_seconds": 0.3},
    }
    return load_config(environ={}, overrides=_merge(base, overrides or {}))


@dataclass(frozen=True, slots=True)
class GatewayHandle:
    running: Running
    config: Config

    @property
    def url(self) -> str:
        """Base URL of the public listener (send a sandbox Host header with it)."""
        return f"http://127.0.0.1:{self.running.listen.port}"

    @property
    def port(self) -> int:
        return self.running.listen.port

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.running.admin.port}"

    def host(self, port: int, label: str) -> str:
        """The public Host header of ``{port}-{label}``."""
        return f"{port}-{label}.{DOMAIN}"

    async def expose(self, writer: store.RouteWriter, sandbox: str, port: int) -> str:
        """Create ``sandbox`` on 127.0.0.2 with ``port`` exposed; its public Host."""
        await writer.create(sandbox, address="127.0.0.2")
        await writer.expose(sandbox, port)
        return self.host(port, sandbox[:6])


@contextlib.asynccontextmanager
async def running_gateway(
    redis_url: str, overrides: Mapping[str, Any] | None = None
) -> AsyncIterator[GatewayHandle]:
    config = test_config(redis_url, overrides)
    async with run_gateway(config, redis_url) as running:
        yield GatewayHandle(running, config)


@contextlib.asynccontextmanager
async def route_writer(redis_url: str) -> AsyncIterator[store.RouteWriter]:
    """A writer on ``redis_url`` (the table settings must have been written: start a gateway)."""
    client = store.open_redis(redis_url)
    try:
        yield store.RouteWriter(client)
    finally:
        await client.aclose()


# ``gateway serve`` listening on loopback port 0 (the ready line says where).
LOOPBACK_ARGS: tuple[str, ...] = ("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")


class ServeProcess:
    """``python -m gateway serve ...`` as a child process; ``ready`` is its ready line."""

    def __init__(self, process: asyncio.subprocess.Process, ready: dict[str, str]) -> None:
        self.process = process
        self.ready = ready
        # Its log goes to stderr: read it all the time, or a full pipe would stall it.
        self.log: collections.deque[str] = collections.deque(maxlen=500)
        self._drain = asyncio.get_running_loop().create_task(self._read_log())

    async def _read_log(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        while line := await stream.readline():
            self.log.append(line.decode(errors="replace").rstrip())

    @classmethod
    async def start(
        cls,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        ready_seconds: float = 20.0,
    ) -> ServeProcess:
        environ = {**os.environ, **(env or {})}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environ,
        )  # fmt: skip
        assert process.stdout is not None
        try:
            async with asyncio.timeout(ready_seconds):
                line = await process.stdout.readline()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError("gateway serve printed no ready line in time") from None
        if not line:
            stderr = await process.stderr.read() if process.stderr else b""
            await process.wait()
            raise AssertionError(f"gateway serve exited: {stderr.decode(errors='replace')}")
        return cls(process, json.loads(line))

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self, wait_seconds: float = 10.0) -> int:
        """SIGTERM, wait, then SIGKILL; returns the exit code."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(wait_seconds):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(self._drain, wait_seconds)
        assert self.process.returncode is not None
        return self.process.returncode
