"""Processes and helpers of the end-to-end suite: the gateway, the CLI, Vite, Chromium.

Everything runs on loopback and is started and stopped by pid by the fixtures in
``conftest.py``:

- the real ``gateway serve`` (``ServeProcess``) on 127.0.0.1 port 0, with the domains
  ``box.localhost`` (Chromium resolves ``*.localhost`` to loopback) and
  ``box.example.test`` (mapped to loopback with ``--host-resolver-rules``);
- the real ``gateway`` CLI as a subprocess, and the admin API over HTTP;
- a Vite dev server on the sandbox address 127.0.0.2, serving a copy of ``vite-app/``;
- Debian's Chromium, driven by Playwright (``executable_path``, never a downloaded browser).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp

from tests.support.gateway import LOOPBACK_ARGS, ServeProcess

__all__ = [
    "ADMIN_TOKEN",
    "CHROMIUM_ARGS",
    "CHROMIUM_EXECUTABLE",
    "E2E_REDIS_DB",
    "LOCAL_DOMAIN",
    "PUBLIC_DOMAIN",
    "SANDBOX_ADDRESS",
    "VITE_APP_SOURCE",
    "CliError",
    "Gateway",
    "ViteServer",
    "copy_vite_app",
    "free_port",
    "is_png",
    "leftover_processes",
    "redis_db_url",
]

SANDBOX_ADDRESS = "127.0.0.2"
LOCAL_DOMAIN = "box.localhost"
# Not .dev or another HSTS-preloaded TLD: browsers would force https there.
PUBLIC_DOMAIN = "box.example.test"
ADMIN_TOKEN = "e2e-admin-token"
# The suite's own Redis database, so the FLUSHDB of other tests' ``redis`` fixture (db 0)
# never wipes the gateway the e2e package runs.
E2E_REDIS_DB = 9

VITE_APP_SOURCE = Path(__file__).parent / "vite-app"
CHROMIUM_EXECUTABLE = os.environ.get("GATEWAY_TEST_CHROMIUM", "/usr/bin/chromium")
# This machine's closed network refuses Chromium's background connections (updates,
# sync, QUIC probes); without these flags it keeps retrying them.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    f"--host-resolver-rules=MAP *.{PUBLIC_DOMAIN} 127.0.0.1",
)

CLI_TIMEOUT_SECONDS = 30.0
VITE_START_TIMEOUT_SECONDS = 30.0
VITE_START_ATTEMPTS = 5
STOP_TIMEOUT_SECONDS = 10.0
_LOG_LINES_KEPT = 200


class CliError(AssertionError):
    """A ``gateway`` command exited non-zero; the message has its stderr."""

    def __init__(self, args: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"gateway {' '.join(args)} exited {returncode}: {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


def free_port(host: str) -> int:
    """A port that was free on ``host`` a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def redis_db_url(url: str, db: int) -> str:
    """``url`` pointing at database ``db`` (``redis://host/db``, ``unix://path?db=db``)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "db"] + [("db", str(db))]
        # urlunsplit would drop the empty authority ("unix:/path"), which redis-py refuses.
        return f"unix://{parts.path}?{urlencode(query)}"
    return urlunsplit(parts._replace(path=f"/{db}"))


def is_png(path: Path) -> bool:
    """Whether ``path`` is a non-empty PNG (signature and an IHDR chunk of non-zero size)."""
    data = path.read_bytes()
    if len(data) < 33 or not data.startswith(b"\x89PNG\r\n\x1a\n") or data[12:16] != b"IHDR":
        return False
    width, height = int.from_bytes(data[16:20]), int.from_bytes(data[20:24])
    return width > 0 and height > 0


# ---------------------------------------------------------------------------------------
# The gateway: process, CLI, admin API
# ---------------------------------------------------------------------------------------


@dataclass
class Gateway:
    """A running ``gateway serve`` and the ways to drive it.

    Attributes:
        serve: the process.
        redis_url: the Redis it and the CLI use.
        port: its public port on 127.0.0.1.
        admin_url: ``http://127.0.0.1:PORT`` of the admin API.
    """

    serve: ServeProcess
    redis_url: str
    port: int
    admin_url: str

    @classmethod
    async def start(cls, redis_url: str) -> Gateway:
        args = [
            *LOOPBACK_ARGS, "--redis-url", redis_url,
            "--domain", LOCAL_DOMAIN, "--domain", PUBLIC_DOMAIN,
        ]  # fmt: skip
        serve = await ServeProcess.start(args, env={"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN})
        listen, admin = serve.ready["listen"], serve.ready["admin"]
        gateway = cls(
            serve=serve,
            redis_url=redis_url,
            port=int(listen.rpartition(":")[2]),
            admin_url=f"http://{admin}",
        )
        return gateway

    @property
    def log(self) -> collections.deque[str]:
        return self.serve.log

    async def stop(self) -> int:
        return await self.serve.stop()

    def host(self, port: int, label: str, domain: str = LOCAL_DOMAIN) -> str:
        """The public Host of ``{port}-{label}.{domain}`` on the gateway's port."""
        return f"{port}-{label}.{domain}:{self.port}"

    def url(self, port: int, label: str, domain: str = LOCAL_DOMAIN) -> str:
        """The public URL (with a trailing slash) a browser opens."""
        return f"http://{self.host(port, label, domain)}/"

    async def cli(self, *args: str) -> Any:
        """Run ``python -m gateway ARGS --redis-url URL``; return its JSON output.

        Raises:
            CliError: the command exited non-zero.
        """
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", *args, "--redis-url", self.redis_url,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            async with asyncio.timeout(CLI_TIMEOUT_SECONDS):
                stdout, stderr = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(f"gateway {' '.join(args)} did not finish in time") from None
        if process.returncode != 0:
            raise CliError(args, process.returncode or 0, stderr.decode(errors="replace"))
        return json.loads(stdout)

    async def api(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """Call the admin API with the bearer token; return the JSON answer (2xx only)."""
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.request(method, self.admin_url + path, json=body, headers=headers) as reply,
        ):
            text = await reply.text()
            assert 200 <= reply.status < 300, f"{method} {path}: {reply.status} {text}"
            return json.loads(text) if text else None

    def recent_log(self, lines: int = 40) -> str:
        return "\n".join(list(self.log)[-lines:])


# ---------------------------------------------------------------------------------------
# Vite
# ---------------------------------------------------------------------------------------


def copy_vite_app(destination: Path) -> Path:
    """Copy the Vite project to ``destination`` (edits stay out of the repo).

    ``node_modules`` is linked, not copied: the suite's copy shares the installed packages
    (``tests/e2e/setup.sh`` runs ``npm ci``); the config keeps Vite's cache in the copy.
    """
    modules = VITE_APP_SOURCE / "node_modules"
    if not (modules / ".bin" / "vite").exists():
        raise AssertionError(f"{modules} has no vite: run `bash tests/e2e/setup.sh` (npm ci) first")
    shutil.copytree(
        VITE_APP_SOURCE,
        destination,
        ignore=shutil.ignore_patterns("node_modules", ".vite-cache"),
    )
    (destination / "node_modules").symlink_to(modules.resolve(), target_is_directory=True)
    return destination


@dataclass
class ViteServer:
    """``vite --host ADDRESS --port PORT --strictPort`` in its own process group."""

    process: asyncio.subprocess.Process
    root: Path
    host: str
    port: int
    log_path: Path

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    @classmethod
    async def start(cls, root: Path, host: str, log_dir: Path) -> ViteServer:
        """Start Vite on a free port of ``host`` (Vite cannot bind port 0: retry on collision).

        Raises:
            AssertionError: Vite did not serve its page in time, or every port collided.
        """
        failures: list[str] = []
        for attempt in range(VITE_START_ATTEMPTS):
            port = free_port(host)
            log_path = log_dir / f"vite-{attempt}.log"
            server = await cls._spawn(root, host, port, log_path)
            try:
                await server._wait_ready()
            except _ViteExited as exc:
                failures.append(str(exc))
                if "is already in use" in str(exc):
                    continue  # someone took the port between our probe and Vite's bind
                raise AssertionError(f"vite failed to start: {exc}") from None
            except BaseException:
                await server.stop()
                raise
            return server
        raise AssertionError(f"vite found no free port: {failures}")

    @classmethod
    async def _spawn(cls, root: Path, host: str, port: int, log_path: Path) -> ViteServer:
        vite = root / "node_modules" / ".bin" / "vite"
        env = {**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0", "CI": "1"}
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                str(vite), "--host", host, "--port", str(port), "--strictPort",
                cwd=root, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own group: esbuild children stop with it
            )  # fmt: skip
        return cls(process, root, host, port, log_path)

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + VITE_START_TIMEOUT_SECONDS
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                if self.process.returncode is not None:
                    raise _ViteExited(self.log_path.read_text(errors="replace")[-2000:])
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(self.origin + "/") as reply:
                        if reply.status == 200 and "/@vite/client" in await reply.text():
                            return
                if loop.time() >= deadline:
                    raise AssertionError(
                        f"vite did not answer on {self.origin} in time:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.1)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    async def stop(self) -> None:
        """SIGTERM to the group, wait, then SIGKILL; waits for the process."""
        await _stop_group(self.process)


class _ViteExited(Exception):
    pass


async def _stop_group(process: asyncio.subprocess.Process) -> None:
    pgid = process.pid  # start_new_session: the group id is the leader's pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_TIMEOUT_SECONDS):
            await process.wait()
    except TimeoutError:
        pass
    # Whatever is left of the group (the leader, or a child it did not take along).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    await process.wait()


# ---------------------------------------------------------------------------------------
# Leftovers
# ---------------------------------------------------------------------------------------


def _process_table() -> dict[int, tuple[int, str]]:
    """``pid -> (ppid, command line)`` of every process we can read."""
    table: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        table[int(entry.name)] = (ppid, cmdline.strip())
    return table


def leftover_processes(
    root_pid: int, patterns: Sequence[str], *, groups: Sequence[int] = ()
) -> list[str]:
    """Descendants of ``root_pid`` (or members of ``groups``) whose command line matches.

    Used at the end of the suite: every gateway, Vite, Playwright driver and Chromium it
    started must be gone.
    """
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = [root_pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    for pid in table:
        with contextlib.suppress(OSError):
            if os.getpgid(pid) in groups:
                found.add(pid)
    return sorted(
        f"{pid} {table[pid][1]}"
        for pid in found
        if pid in table and any(p in table[pid][1] for p in patterns)
    )
