"""A real HAProxy in front of gateway replicas, for rolling-restart tests.

``HAProxy.start(frontend_port, servers)`` renders a config (``render_config``) into a temp
dir and runs ``haproxy -f CFG -db`` as a child process (stopped by its pid). Each server
is health-checked with ``GET /readyz`` on its admin port (``check port``), every 200 ms,
down after one failure and up after one success, so a draining replica leaves the
rotation well within its drain delay. ``server_states()`` reads the runtime view over
the stats socket, so a test waits for "UP"/"DOWN" instead of sleeping.

Debian package: ``haproxy`` (``apt-get install -y haproxy``). ``HAPROXY_BIN`` overrides
the binary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Backend", "HAProxy", "ServerStats", "haproxy_binary", "render_config"]

START_SECONDS = 10.0
STOP_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Backend:
    """One gateway replica as HAProxy sees it: traffic port and health-check port."""

    name: str
    host: str
    port: int
    check_port: int


@dataclass(frozen=True, slots=True)
class ServerStats:
    """A server's runtime state and counters from ``show stat``."""

    status: str  # UP, DOWN, MAINT, "UP 1/2" (going down), ...
    retries: int  # wretr: connections retried
    redispatches: int  # wredis: requests sent to another server after a failure
    connection_errors: int  # econ
    response_errors: int  # eresp
    sessions: int  # stot


def haproxy_binary() -> str | None:
    """The haproxy executable, or None when it is not installed."""
    return (
        os.environ.get("HAPROXY_BIN")
        or shutil.which("haproxy")
        or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    )


def render_config(
    frontend_host: str,
    frontend_port: int,
    servers: Sequence[Backend],
    *,
    stats_socket: Path,
    check_interval_ms: int = 200,
) -> str:
    """The HAProxy configuration: one HTTP frontend, one backend of ``servers``.

    Timeouts: the client and server sides wait 30 s, idle keep-alive 10 s (the gateway's
    own keep-alive idle timeout must stay above it); a failed connect is retried 3 times,
    the last one on another server (``option redispatch``).
    """
    lines = [
        "global",
        "    maxconn 4096",
        f"    stats socket {stats_socket} mode 600 level admin",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    timeout client 30s",
        "    timeout server 30s",
        "    timeout http-request 10s",
        "    timeout http-keep-alive 10s",
        "    timeout queue 5s",
        "    timeout check 1s",
        "    retries 3",
        "    option redispatch",
        "    http-reuse safe",
        "",
        "frontend edge",
        f"    bind {frontend_host}:{frontend_port}",
        "    default_backend gateways",
        "",
        "backend gateways",
        "    balance roundrobin",
        "    option httpchk GET /readyz",
        "    http-check expect status 200",
        f"    default-server inter {check_interval_ms}ms fastinter {check_interval_ms}ms "
        f"downinter {check_interval_ms}ms fall 1 rise 1",
    ]
    lines += [f"    server {s.name} {s.host}:{s.port} check port {s.check_port}" for s in servers]
    return "\n".join(lines) + "\n"


class HAProxy:
    """A running ``haproxy -db``; stop it exactly once with ``stop()``."""

    def __init__(
        self, process: asyncio.subprocess.Process, workdir: Path, frontend: tuple[str, int]
    ) -> None:
        self.process = process
        self.workdir = workdir
        self.frontend = frontend
        self.log: list[str] = []
        self._reader = asyncio.get_running_loop().create_task(self._read_log())

    @property
    def stats_socket(self) -> Path:
        return self.workdir / "admin.sock"

    @property
    def url(self) -> str:
        host, port = self.frontend
        return f"http://{host}:{port}"

    @classmethod
    async def start(
        cls,
        frontend_port: int,
        servers: Sequence[Backend],
        *,
        frontend_host: str = "127.0.0.1",
        check_interval_ms: int = 200,
    ) -> HAProxy:
        """Render the config, start HAProxy and wait until its frontend accepts.

        Raises:
            RuntimeError: haproxy is not installed, or exited (e.g. the port was taken);
                the message carries its output.
        """
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is not installed (Debian package: haproxy)")
        workdir = Path(tempfile.mkdtemp(prefix="gw-haproxy-"))
        config = workdir / "haproxy.cfg"
        text = render_config(
            frontend_host, frontend_port, servers,
            stats_socket=workdir / "admin.sock", check_interval_ms=check_interval_ms,
        )  # fmt: skip
        config.write_text(text)
        process = await asyncio.create_subprocess_exec(
            binary, "-f", str(config), "-db",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        proxy = cls(process, workdir, (frontend_host, frontend_port))
        try:
            await proxy._wait_ready()
        except BaseException:
            await proxy.stop()
            raise
        return proxy

    async def server_states(self) -> dict[str, ServerStats]:
        """Each backend server's state, by name (from ``show stat`` on the stats socket)."""
        reader, writer = await asyncio.open_unix_connection(str(self.stats_socket))
        try:
            writer.write(b"show stat\n")
            await writer.drain()
            async with asyncio.timeout(2.0):
                text = (await reader.read()).decode()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        lines = [line for line in text.splitlines() if line]
        if not lines or not lines[0].startswith("# "):
            return {}
        columns = lines[0][2:].split(",")
        states: dict[str, ServerStats] = {}
        for line in lines[1:]:
            row = dict(zip(columns, line.split(","), strict=False))
            if row.get("pxname") != "gateways" or row.get("svname") in ("FRONTEND", "BACKEND"):
                continue
            states[row["svname"]] = ServerStats(
                status=row.get("status", ""),
                retries=_int(row.get("wretr")),
                redispatches=_int(row.get("wredis")),
                connection_errors=_int(row.get("econ")),
                response_errors=_int(row.get("eresp")),
                sessions=_int(row.get("stot")),
            )
        return states

    async def status_of(self, name: str) -> str:
        """One server's status, "" if unknown."""
        states = await self.server_states()
        return states[name].status if name in states else ""

    async def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if needed; removes the temp dir."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_SECONDS):
                    await self.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(self._reader, STOP_SECONDS)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # Private methods ------------------------------------------------------------------

    async def _read_log(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        while line := await stream.readline():
            self.log.append(line.decode(errors="replace").rstrip())

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_SECONDS
        host, port = self.frontend
        while True:
            if self.process.returncode is not None:
                await asyncio.sleep(0.05)  # let the reader take the last lines
                raise RuntimeError("haproxy exited: " + " | ".join(self.log[-10:]))
            if self.stats_socket.exists():
                try:
                    _, writer = await asyncio.open_connection(host, port)
                except OSError:
                    pass
                else:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
                    return
            if loop.time() >= deadline:
                raise RuntimeError("haproxy did not start: " + " | ".join(self.log[-10:]))
            await asyncio.sleep(0.02)


def _int(text: str | None) -> int:
    return int(text) if text and text.isdigit() else 0
