"""Real redis-server processes for tests: one server, or a small Redis Cluster.

Strategy: processes are plain ``subprocess.Popen`` children driven by blocking code, and the
async methods run that code in a worker thread. Session fixtures are sync (pytest-asyncio
gives each test its own loop, and a process owned by one loop's child watcher could not be
stopped from another), so one implementation serves both and no loop owns a process.

Everything listens on loopback only: a unix socket in a private temp dir by default, or
127.0.0.1 with a port picked by binding port 0 (Redis cannot bind port 0 itself: it means
"no TCP"), retried when another process grabs the port first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from gateway.embedded import find_redis_server
from tests.support.waiting import poll_until

__all__ = [
    "CLUSTER_SLOTS",
    "RedisCluster",
    "RedisProcess",
    "RedisStartError",
    "start_cluster",
    "start_cluster_sync",
]

START_TIMEOUT_SECONDS = 10.0
# Redis fsyncs nothing in tests (no persistence), so SIGTERM ends it in milliseconds.
STOP_TIMEOUT_SECONDS = 5.0
PROBE_TIMEOUT_SECONDS = 0.5
TCP_ATTEMPTS = 5
# Redis 6.2 has no cluster-port setting: the cluster bus is always data port + 10000.
CLUSTER_BUS_OFFSET = 10000
CLUSTER_SLOTS = 16384
CLUSTER_START_TIMEOUT_SECONDS = 30.0
# Node timeout only matters for failover, which the suite never waits for.
CLUSTER_NODE_TIMEOUT_MS = 5000


class RedisStartError(RuntimeError):
    """redis-server exited or never answered; the message carries its last log lines."""


class RedisProcess:
    """One redis-server child with persistence off, for tests.

    Usage contract: start with ``start_sync()`` (fixtures) or ``await start()`` (tests), and
    stop exactly once with ``stop_sync()`` or ``await stop()``; stopping also removes its
    temp dir. ``pause()``/``resume()`` freeze and thaw it with SIGSTOP/SIGCONT, so clients
    see a server that accepts connections but never answers.
    """

    def __init__(
        self,
        workdir: Path,
        args: Sequence[str],
        *,
        host: str | None,
        port: int | None,
    ) -> None:
        """Hold the launch recipe; use ``start_sync``/``start`` instead of calling this."""
        self.workdir = workdir
        self.host = host
        self.port = port
        self._args = list(args)
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    # Public methods

    @classmethod
    def start_sync(
        cls,
        *,
        tcp: bool = False,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        timeout: float = START_TIMEOUT_SECONDS,
    ) -> RedisProcess:
        """Start a server and block until it answers.

        Args:
            tcp: listen on ``host`` and a free port instead of a unix socket.
            host: the loopback address for ``tcp``.
            extra_args: more ``--name value`` arguments; they win over the defaults.
            timeout: seconds to wait for each attempt to answer.

        Returns:
            The running server.

        Raises:
            RedisStartError: it never answered (after ``TCP_ATTEMPTS`` ports for TCP).
        """
        return cls._start(tcp=tcp, host=host, extra_args=extra_args, timeout=timeout)

    @classmethod
    async def start(
        cls,
        *,
        tcp: bool = False,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        # Handed to the worker thread, which cannot be cancelled; see start_sync.
        timeout: float = START_TIMEOUT_SECONDS,  # noqa: ASYNC109
    ) -> RedisProcess:
        """Async ``start_sync`` (runs it in a worker thread; same arguments and errors)."""
        return await asyncio.to_thread(
            cls._start, tcp=tcp, host=host, extra_args=extra_args, timeout=timeout
        )

    @property
    def url(self) -> str:
        """``unix://.../redis.sock`` or ``redis://HOST:PORT``."""
        if self.port is None:
            return f"unix://{self.socket_path}"
        return f"redis://{self.host}:{self.port}"

    @property
    def socket_path(self) -> Path:
        """The unix socket path (meaningful only when not started with ``tcp``)."""
        return self.workdir / "redis.sock"

    @property
    def log_path(self) -> Path:
        """redis-server's log file (its stderr goes there too)."""
        return self.workdir / "redis.log"

    @property
    def pid(self) -> int:
        """The current process id (changes on ``restart``)."""
        return self._popen().pid

    @property
    def running(self) -> bool:
        """Whether the process is alive (a paused process is alive)."""
        return self._process is not None and self._process.poll() is None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are accepted by the kernel, never answered."""
        os.kill(self.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Thaw a paused server (SIGCONT)."""
        os.kill(self.pid, signal.SIGCONT)
        self._paused = False

    def kill(self) -> None:
        """SIGKILL the server and reap it, as a crash would; the temp dir is kept."""
        process = self._popen()
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
        self._paused = False

    def restart_sync(self, *, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Stop the server if running and start it again on the same socket or port.

        Raises:
            RedisStartError: the new process never answered (e.g. the port was taken).
        """
        self._terminate()
        self._launch()
        self._wait_ready(timeout)

    async def restart(self, *, timeout: float = START_TIMEOUT_SECONDS) -> None:  # noqa: ASYNC109
        """Async ``restart_sync``."""
        await asyncio.to_thread(self.restart_sync, timeout=timeout)

    def stop_sync(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its temp dir. Idempotent."""
        self._terminate()
        shutil.rmtree(self.workdir, ignore_errors=True)

    async def stop(self) -> None:
        """Async ``stop_sync``."""
        await asyncio.to_thread(self.stop_sync)

    def sync_client(self) -> redis.Redis:
        """A blocking client with no retries and short timeouts (for probes and setup)."""
        # No retries: redis-py's default retry backs off for seconds on a refused connection.
        if self.port is None:
            return redis.Redis(
                unix_socket_path=str(self.socket_path),
                socket_timeout=PROBE_TIMEOUT_SECONDS,
                socket_connect_timeout=PROBE_TIMEOUT_SECONDS,
                retry=Retry(NoBackoff(), 0),
                decode_responses=True,
            )
        return redis.Redis(
            host=self.host or "127.0.0.1",
            port=self.port,
            socket_timeout=PROBE_TIMEOUT_SECONDS,
            socket_connect_timeout=PROBE_TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )

    # Private methods

    @classmethod
    def _start(
        cls,
        *,
        tcp: bool,
        host: str,
        extra_args: Sequence[str],
        timeout: float,
        need_bus_port: bool = False,
    ) -> RedisProcess:
        attempts = TCP_ATTEMPTS if tcp else 1
        for attempt in range(1, attempts + 1):
            # A fresh dir per attempt: a failed cluster node may have written nodes.conf
            # naming the port it could not bind.
            workdir = Path(tempfile.mkdtemp(prefix="gw-redis-"))
            args = [
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", str(workdir), "--logfile", str(workdir / "redis.log"),
            ]  # fmt: skip
            port: int | None = None
            if tcp:
                port = _free_port(host, need_bus_port=need_bus_port)
                args += ["--port", str(port), "--bind", host]
            else:
                args += ["--port", "0", "--unixsocket", str(workdir / "redis.sock")]
                args += ["--unixsocketperm", "700"]
            proc = cls(workdir, [*args, *extra_args], host=host if tcp else None, port=port)
            try:
                return proc._first_start(timeout)
            except RedisStartError:
                # For TCP, most likely another process took the port between our probe
                # and redis's bind: pick another one.
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def _first_start(self, timeout: float) -> RedisProcess:
        self._launch()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop_sync()
            raise
        return self

    def _launch(self) -> None:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [find_redis_server(), *self._args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def _wait_ready(self, timeout: float) -> None:
        """Block until *our* process answers; a PING alone could reach a stranger on the port."""
        process = self._popen()
        client = self.sync_client()

        def answering() -> bool:
            if process.poll() is not None:
                raise RedisStartError(
                    f"redis-server exited with status {process.returncode}: {self._log_tail()}"
                )
            try:
                info = client.info("server")
            except (RedisError, OSError):
                return False
            return bool(info.get("process_id") == process.pid)

        try:
            poll_until(answering, timeout=timeout, what=f"redis-server on {self.url}")
        except AssertionError as exc:
            raise RedisStartError(f"{exc}: {self._log_tail()}") from None
        finally:
            client.close()

    def _terminate(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
            # A stopped process only acts on SIGTERM once it runs again.
            if self._paused:
                os.kill(process.pid, signal.SIGCONT)
        self._paused = False
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_SECONDS)

    def _popen(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("redis-server was never started")
        return self._process

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"


def _free_port(host: str, *, need_bus_port: bool) -> int:
    """A port on ``host`` that was free a moment ago (and port + 10000 too, if asked)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if not need_bus_port:
            return port
        if port + CLUSTER_BUS_OFFSET <= 65535 and _port_is_free(host, port + CLUSTER_BUS_OFFSET):
            return port


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# ---------------------------------------------------------------------------------------
# Redis Cluster
# ---------------------------------------------------------------------------------------


@dataclass
class RedisCluster:
    """A running Redis Cluster of master-only nodes on 127.0.0.1.

    Attributes:
        nodes: one ``RedisProcess`` per node; node i owns the i-th equal share of slots.
    """

    nodes: list[RedisProcess]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every node, for ``redis.asyncio.cluster.ClusterNode``."""
        return [(node.host or "127.0.0.1", node.port or 0) for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT`` of the first node; cluster clients discover the rest."""
        return self.nodes[0].url

    def stop_sync(self) -> None:
        """Stop every node and remove their temp dirs. Idempotent."""
        for node in self.nodes:
            node.stop_sync()

    async def stop(self) -> None:
        """Async ``stop_sync``."""
        await asyncio.to_thread(self.stop_sync)


def start_cluster_sync(
    n: int = 3, *, timeout: float = CLUSTER_START_TIMEOUT_SECONDS
) -> RedisCluster:
    """Start ``n`` nodes, split the slots, join them, and wait for ``cluster_state:ok``.

    The cluster is built with plain commands (ADDSLOTS, MEET) rather than
    ``redis-cli --cluster create``: it needs no second binary, works on Redis 6.2 (which
    lacks ADDSLOTSRANGE) and 7, and waits by polling instead of redis-cli's fixed sleeps.

    Args:
        n: number of master nodes (no replicas).
        timeout: seconds for the whole cluster to report ok on every node.

    Returns:
        The running cluster.

    Raises:
        RedisStartError: a node did not start.
        AssertionError: the cluster did not converge within ``timeout``.
    """
    extra = [
        "--cluster-enabled", "yes",
        # Relative to --dir, so each node keeps its own file in its own temp dir.
        "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
    ]  # fmt: skip
    cluster = RedisCluster(nodes=[])
    try:
        for _ in range(n):
            cluster.nodes.append(
                RedisProcess._start(
                    tcp=True,
                    host="127.0.0.1",
                    extra_args=extra,
                    timeout=START_TIMEOUT_SECONDS,
                    need_bus_port=True,
                )
            )
        _form_cluster(cluster, timeout)
    except BaseException:
        cluster.stop_sync()
        raise
    return cluster


async def start_cluster(
    n: int = 3,
    *,
    timeout: float = CLUSTER_START_TIMEOUT_SECONDS,  # noqa: ASYNC109 (a worker thread's bound)
) -> RedisCluster:
    """Async ``start_cluster_sync`` (runs it in a worker thread; same arguments and errors)."""
    return await asyncio.to_thread(start_cluster_sync, n, timeout=timeout)


def _form_cluster(cluster: RedisCluster, timeout: float) -> None:
    clients = [node.sync_client() for node in cluster.nodes]
    try:
        count = len(clients)
        for index, client in enumerate(clients):
            first, end = index * CLUSTER_SLOTS // count, (index + 1) * CLUSTER_SLOTS // count
            client.cluster("ADDSLOTS", *range(first, end))
        for host, port in cluster.startup_nodes[1:]:
            clients[0].cluster("MEET", host, port)

        def converged() -> bool:
            for client in clients:
                info = _cluster_info(client)
                if info.get("cluster_state") != "ok" or info.get("cluster_known_nodes") != str(
                    count
                ):
                    return False
            return True

        poll_until(converged, timeout=timeout, interval=0.05, what="cluster_state:ok on all nodes")
    finally:
        for client in clients:
            client.close()


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    """CLUSTER INFO as a dict of strings, parsed here so redis-py's callbacks don't matter."""
    raw = client.cluster("INFO")
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}
