"""A real HAProxy on the shipped deploy/haproxy.cfg, for tests.

``HAProxy.start(frontend_port, servers)`` runs ``haproxy -db -f deploy/haproxy.cfg -f
<tmp>/local.cfg`` as a child process (stopped by its pid). The shipped file is not
copied or edited: its addresses come from the environment (``haproxy_env``), and
``local.cfg`` adds only a stats socket in its own ``global`` section. The tests set the
health checks (``GET /readyz`` on each server's admin port) to every 200 ms and up after
one success; the shipped file takes a server out after one failure, so a draining
replica leaves the rotation well within its drain delay. ``server_states()`` reads the
runtime view over the stats socket, so a test waits for "UP"/"DOWN" instead of sleeping.

deploy/haproxy.cfg names its two servers ``gateway-1`` and ``gateway-2`` (``SERVER_NAMES``)
in the backends ``gateways`` (plain HTTP) and ``gateways_proxy_v2`` (PROXY protocol v2).

Debian package: ``haproxy`` (``apt-get install -y haproxy``). ``HAPROXY_BIN`` overrides
the binary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEPLOY_CONFIG",
    "SERVER_NAMES",
    "Backend",
    "HAProxy",
    "ServerStats",
    "haproxy_binary",
    "haproxy_command_env",
    "haproxy_env",
    "local_config",
]

DEPLOY_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy.cfg"
SERVER_NAMES = ("gateway-1", "gateway-2")
START_SECONDS = 10.0
STOP_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Backend:
    """One gateway replica as HAProxy sees it: traffic port and health-check port.

    ``name`` is the server's name in deploy/haproxy.cfg (one of ``SERVER_NAMES``).
    """

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
        or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
    )


def haproxy_env(
    servers: Sequence[Backend],
    *,
    bind: str,
    stats: str,
    proxy_v2: bool = False,
    check_interval_ms: int | None = None,
    check_rise: int | None = None,
) -> dict[str, str]:
    """The variables of deploy/haproxy.cfg (documented in its header) for ``servers``.

    ``servers`` are ``gateway-1`` and ``gateway-2``, in that order. ``check_interval_ms``
    and ``check_rise`` left None keep the shipped defaults (1 s, 2).

    Raises:
        ValueError: ``servers`` are not the config's two servers.
    """
    if tuple(s.name for s in servers) != SERVER_NAMES:
        raise ValueError(f"deploy/haproxy.cfg has the servers {SERVER_NAMES}: {servers}")
    env = {"HAPROXY_BIND": bind, "HAPROXY_STATS_BIND": stats}
    env["GATEWAY_PROXY_PROTOCOL"] = "true" if proxy_v2 else "false"
    for index, server in enumerate(servers, start=1):
        env[f"GATEWAY_{index}"] = f"{server.host}:{server.port}"
        env[f"GATEWAY_{index}_ADMIN_PORT"] = str(server.check_port)
    if check_interval_ms is not None:
        env["GATEWAY_CHECK_INTERVAL"] = f"{check_interval_ms}ms"
    if check_rise is not None:
        env["GATEWAY_CHECK_RISE"] = str(check_rise)
    return env


def haproxy_command_env(env: Mapping[str, str]) -> dict[str, str]:
    """The whole environment of a haproxy child: ``PATH`` and ``env``, nothing inherited
    (so only the variables a test sets reach the config)."""
    return {"PATH": os.environ.get("PATH", ""), **env}


def local_config(stats_socket: Path) -> str:
    """The overlay file (``-f local.cfg`` after deploy/haproxy.cfg): a stats socket."""
    return f"global\n    stats socket {stats_socket} mode 600 level admin\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class HAProxy:
    """A running ``haproxy -db``; stop it exactly once with ``stop()``."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        workdir: Path,
        frontend: tuple[str, int],
        *,
        backend: str = "gateways",
        stats_port: int = 0,
    ) -> None:
        self.process = process
        self.workdir = workdir
        self.frontend = frontend
        self.backend = backend
        self.stats_port = stats_port
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
        check_rise: int = 1,
        stats_port: int | None = None,
        proxy_v2: bool = False,
    ) -> HAProxy:
        """Run HAProxy on deploy/haproxy.cfg and wait until its frontend accepts.

        The monitor/stats listener binds 127.0.0.1:``stats_port`` (a free port when None).

        Raises:
            RuntimeError: haproxy is not installed, or exited (e.g. a port was taken);
                the message carries its output.
        """
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is not installed (Debian package: haproxy)")
        stats_port = _free_port() if stats_port is None else stats_port
        env = haproxy_env(
            servers, bind=f"{frontend_host}:{frontend_port}", stats=f"127.0.0.1:{stats_port}",
            proxy_v2=proxy_v2, check_interval_ms=check_interval_ms, check_rise=check_rise,
        )  # fmt: skip
        workdir = Path(tempfile.mkdtemp(prefix="gw-haproxy-"))
        local = workdir / "local.cfg"
        local.write_text(local_config(workdir / "admin.sock"))
        try:
            process = await asyncio.create_subprocess_exec(
                binary, "-db", "-f", str(DEPLOY_CONFIG), "-f", str(local),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=haproxy_command_env(env),
            )  # fmt: skip
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        proxy = cls(
            process, workdir, (frontend_host, frontend_port),
            backend="gateways_proxy_v2" if proxy_v2 else "gateways", stats_port=stats_port,
        )  # fmt: skip
        try:
            await proxy._wait_ready()
        except BaseException:
            await proxy.stop()
            raise
        return proxy

    async def server_states(self, backend: str | None = None) -> dict[str, ServerStats]:
        """Each server's state in ``backend`` (the one traffic goes to by default), by name
        (from ``show stat`` on the stats socket)."""
        backend = self.backend if backend is None else backend
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
            if row.get("pxname") != backend or row.get("svname") in ("FRONTEND", "BACKEND"):
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
