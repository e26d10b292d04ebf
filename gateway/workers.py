"""``gateway serve --workers N``: a master process and N workers sharing the listeners.

Strategy: the master resolves Redis (starting the embedded one if needed), reserves the
listener ports with SO_REUSEPORT sockets that never listen (so port 0 resolves once,
for the whole group), then runs N ordinary ``gateway serve`` processes that bind the
same ports with SO_REUSEPORT; the kernel spreads connections over them. Each worker has
its own route cache and Redis subscription. Workers publish their metrics to a shared
directory, so /metrics on any of them reports the group.

The master prints the ready line once every worker is ready, relays the workers' stdout
(the access log), restarts a worker that dies, and on SIGTERM passes the signal on (a
second SIGTERM too: the workers' hard stop) and exits 0 once all have drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence

from gateway import compiled, errors
from gateway.config import Config, Endpoint
from gateway.server import check_admin_binding, redis_for

log = logging.getLogger("gateway.workers")

READY_SECONDS = 30.0
RESTART_DELAY_SECONDS = 1.0


def reserve(endpoint: Endpoint) -> tuple[socket.socket, Endpoint]:
    """A bound, non-listening SO_REUSEPORT socket holding ``endpoint``'s port."""
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((endpoint.host, endpoint.port))
    return holder, Endpoint(endpoint.host, holder.getsockname()[1])


class WorkerFailed(errors.GatewayError):
    """A worker could not start; ``gateway serve`` says so in one line."""

    code = "worker_failed"


class _Worker:
    def __init__(self, index: int, argv: list[str], env: dict[str, str]) -> None:
        self.index = index
        self._argv = argv
        self._env = env
        self.process: asyncio.subprocess.Process | None = None
        self._relay: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", *self._argv,
            stdout=asyncio.subprocess.PIPE, env=self._env,
        )  # fmt: skip
        assert self.process.stdout is not None
        async with asyncio.timeout(READY_SECONDS):
            line = await self.process.stdout.readline()
        if not line:
            raise WorkerFailed(f"worker {self.index} exited before it was ready (see its log)")
        self._relay = asyncio.get_running_loop().create_task(self._relay_stdout())

    async def _relay_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def wait(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        if self._relay is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._relay
        return code


async def serve_workers(
    config: Config, argv: Sequence[str], *, on_ready: Callable[[dict[str, str]], None]
) -> int:
    """Run ``config.workers`` workers until SIGTERM; return the exit code."""
    check_admin_binding(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    workers: list[_Worker] = []

    def on_signal() -> None:
        stopping.set()
        for worker in workers:
            worker.signal(signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    listen_holder, listen = reserve(config.listen_endpoint)
    admin_holder, admin = reserve(config.admin_endpoint)
    with listen_holder, admin_holder, tempfile.TemporaryDirectory() as metrics_dir:
        async with redis_for(config) as url:
            worker_argv = [*argv, "--workers", "1", "--listen", str(listen),
                           "--admin-listen", str(admin), "--redis-url", url]  # fmt: skip
            env = {**os.environ, "GATEWAY_SERVER__REUSE_PORT": "true",
                   "GATEWAY_METRICS_DIR": config.metrics_dir or metrics_dir}  # fmt: skip
            workers.extend(_Worker(i, worker_argv, env) for i in range(config.workers))
            try:
                await asyncio.gather(*(worker.start() for worker in workers))
            except BaseException:
                for worker in workers:  # never leave the ones that did start behind
                    worker.signal(signal.SIGKILL)
                await asyncio.gather(
                    *(w.wait() for w in workers if w.process), return_exceptions=True
                )
                raise
            on_ready({
                "event": "ready", "listen": str(listen), "admin": str(admin), "redis": url,
                "workers": str(config.workers), "build": compiled.describe_build(),
            })  # fmt: skip
            codes = await asyncio.gather(*(_supervise(w, stopping) for w in workers))
    return 0 if all(code == 0 for code in codes) else 1


async def _supervise(worker: _Worker, stopping: asyncio.Event) -> int:
    """Wait for ``worker``; restart it if it died while the group was not stopping."""
    while True:
        code = await worker.wait()
        if stopping.is_set():
            return code
        log.error("worker %d exited with %d; restarting it", worker.index, code)
        await asyncio.sleep(RESTART_DELAY_SECONDS)
        if stopping.is_set():
            return code
        await worker.start()
