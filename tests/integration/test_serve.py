"""``gateway serve`` as a real process: the embedded default, its ready line, and refusals."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway import compiled
from gateway.routing import schema
from tests.integration.test_cli import Ran, assert_one_line_error, cli_env, run_cli
from tests.support.gateway import LOOPBACK_ARGS, ServeProcess
from tests.support.waiting import wait_until

SERVE_TIMEOUT_SECONDS = 30.0


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short, empty state dir (a unix socket path must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="gw-state-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def serve_env(state_dir: Path) -> dict[str, str]:
    """No Redis URL, no token: only the state dir."""
    env = cli_env({"GATEWAY_STATE_DIR": str(state_dir)})
    env.pop("GATEWAY_ADMIN_TOKEN", None)
    return env


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def run_serve(*args: str, env: dict[str, str]) -> Ran:
    """Run a serve that is expected to refuse to start (bounded)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        async with asyncio.timeout(SERVE_TIMEOUT_SECONDS):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"gateway serve {' '.join(args)} kept running") from None
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


async def test_embedded_default_end_to_end(state_dir: Path) -> None:
    """Serve with no Redis URL runs an embedded Redis the CLI finds; SIGTERM stops both."""
    env = serve_env(state_dir)
    served = await ServeProcess.start(LOOPBACK_ARGS, env=env)
    try:
        ready = served.ready
        assert set(ready) == {"event", "listen", "admin", "redis", "build"}
        assert ready["event"] == "ready"
        assert ready["build"] == compiled.describe_build()  # the same tree runs both
        assert ready["redis"] == f"unix://{state_dir}/redis.sock"
        host, _, port_text = ready["listen"].rpartition(":")
        assert host == "127.0.0.1" and int(port_text) > 0
        assert ready["admin"].startswith("127.0.0.1:") and not ready["admin"].endswith(":0")
        redis_pid = int((state_dir / "redis.pid").read_text())
        assert pid_alive(redis_pid)

        created = await run_cli("sandbox", "create", "abc123", "--address", "127.0.0.2", env=env)
        assert (created.returncode, created.stderr) == (0, "")
        exposed = await run_cli("ports", "expose", "abc123", "3000", env=env)
        assert exposed.returncode == 0, exposed.stderr
        assert exposed.json() == {
            "port": 3000,
            "url": f"http://3000-abc123.box.localhost:{port_text}",
            "sandboxId": "abc123",
        }
    finally:
        code = await served.stop()
    assert code == 0
    await wait_until(lambda: not pid_alive(redis_pid), timeout=5.0, what="redis-server to exit")
    assert not (state_dir / "redis.url").exists()
    assert not (state_dir / "redis.pid").exists()
    stopped = await run_cli("sandbox", "show", "abc123", env=env)
    assert_one_line_error(stopped, "no gateway serve is running")


async def test_admin_beyond_loopback_needs_a_token(state_dir: Path) -> None:
    """--admin-listen 0.0.0.0:0 without GATEWAY_ADMIN_TOKEN refuses to start, in one line."""
    ran = await run_serve(
        "--listen", "127.0.0.1:0", "--admin-listen", "0.0.0.0:0", env=serve_env(state_dir)
    )
    assert_one_line_error(ran, "admin_listen", "0.0.0.0:0", "GATEWAY_ADMIN_TOKEN")
    assert not (state_dir / "redis.url").exists()


async def test_unknown_config_key_refuses_to_start(state_dir: Path) -> None:
    """--config with an unknown key refuses to start, naming the key."""
    config = state_dir / "gateway.yaml"
    config.write_text("listen: 127.0.0.1:0\ncache:\n  max_entrys: 5\n")
    ran = await run_serve("--config", str(config), *LOOPBACK_ARGS, env=serve_env(state_dir))
    assert_one_line_error(ran, "cache.max_entrys", "unknown key")


async def test_bad_yaml_is_one_line(state_dir: Path) -> None:
    """A --config file that is not YAML is one line too, though the YAML error has several."""
    config = state_dir / "gateway.yaml"
    config.write_text("listen: [\n")
    ran = await run_serve("--config", str(config), *LOOPBACK_ARGS, env=serve_env(state_dir))
    assert_one_line_error(ran, "not valid YAML")


async def test_schema_mismatch_refuses_to_start(
    state_dir: Path, redis_url: str, redis: aioredis.Redis
) -> None:
    """A route table of another schema version makes serve refuse, naming the versions."""
    await redis.hset(schema.META_KEY, mapping={"schema_version": "99"})
    ran = await run_serve("--redis-url", redis_url, *LOOPBACK_ARGS, env=serve_env(state_dir))
    assert_one_line_error(ran, "schema version 99")
    assert await redis.hgetall(schema.META_KEY) == {"schema_version": "99"}


async def test_listen_address_in_use_is_one_line(
    state_dir: Path, redis_url: str, redis: aioredis.Redis
) -> None:
    """A listener that cannot bind is one line with the reason, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = await run_serve(
            "--redis-url", redis_url, "--listen", f"127.0.0.1:{port}",
            "--admin-listen", "127.0.0.1:0", env=serve_env(state_dir),
        )  # fmt: skip
    assert_one_line_error(ran, "in use")
