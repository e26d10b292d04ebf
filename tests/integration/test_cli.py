"""The ``gateway`` CLI as a real subprocess (``python -m gateway``) against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from gateway.routing import schema
from tests.integration.test_store import unchanged
from tests.support.gateway import GatewayHandle, route_writer, running_gateway

CLI_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI run: this one minus anything that would pick a Redis."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("GATEWAY_REDIS_URL", "GATEWAY_STATE_DIR")
    }
    return {**env, **(extra or {})}


async def run_cli(*args: str, env: dict[str, str] | None = None) -> Ran:
    """Run ``python -m gateway ARGS`` to completion (bounded) and collect its output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env or cli_env(),
    )  # fmt: skip
    try:
        async with asyncio.timeout(CLI_TIMEOUT_SECONDS):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"gateway {' '.join(args)} did not finish in time") from None
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


@pytest_asyncio.fixture
async def gateway(redis_url: str, redis: aioredis.Redis) -> AsyncIterator[GatewayHandle]:
    """A running gateway (it wrote the table settings) on an empty table."""
    async with running_gateway(redis_url) as handle:
        yield handle


@pytest.fixture
def url(gateway: GatewayHandle, redis_url: str) -> str:
    """The --redis-url the CLI is given."""
    return redis_url


def assert_one_line_error(ran: Ran, *words: str) -> None:
    """A failure: non-zero exit, nothing on stdout, exactly one line on stderr naming it."""
    assert ran.returncode != 0, ran
    assert ran.stdout == ""
    assert ran.stderr.endswith("\n") and ran.stderr.count("\n") == 1, ran.stderr
    assert ran.stderr.startswith("gateway: ")
    assert "Traceback" not in ran.stderr
    for word in words:
        assert word in ran.stderr, ran.stderr


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------


async def test_sandbox_lifecycle(gateway: GatewayHandle, url: str) -> None:
    """sandbox create/show/pause/resume/terminate print the sandbox as JSON."""
    ran = await run_cli("sandbox", "create", "abc123", "--address", "127.0.0.2",
                        "--allow-ports", "3000,5173", "--redis-url", url)  # fmt: skip
    assert (ran.returncode, ran.stderr) == (0, "")
    assert ran.json() == {
        "id": "abc123", "label": "abc123", "state": "running", "address": "127.0.0.2",
        "allowPorts": [3000, 5173], "ports": [], "gen": 1,
    }  # fmt: skip
    shown = await run_cli("sandbox", "show", "abc123", "--redis-url", url)
    assert shown.json() == ran.json()
    paused = await run_cli("sandbox", "pause", "abc123", "--redis-url", url)
    assert (paused.json()["state"], paused.json()["gen"]) == ("paused", 2)
    resumed = await run_cli("sandbox", "resume", "abc123", "--redis-url", url)
    assert resumed.json()["state"] == "running"
    moved = await run_cli("sandbox", "resume", "abc123", "--address", "::1", "--redis-url", url)
    assert moved.json()["address"] == "::1"
    gone = await run_cli("sandbox", "terminate", "abc123", "--redis-url", url)
    assert (gone.returncode, gone.json()["state"], gone.json()["address"]) == (
        0,
        "terminated",
        None,
    )


async def test_ports(gateway: GatewayHandle, url: str, redis: aioredis.Redis) -> None:
    """ports expose (with --host-rewrite too), list and close print JSON."""
    await run_cli("sandbox", "create", "abc123", "--address", "127.0.0.2", "--redis-url", url)
    exposed = await run_cli("ports", "expose", "abc123", "3000", "--redis-url", url)
    base = f"box.test:{gateway.port}"
    assert exposed.json() == {
        "port": 3000, "url": f"http://3000-abc123.{base}", "sandboxId": "abc123",
    }  # fmt: skip
    again = await run_cli("ports", "expose", "abc123", "3000", "--redis-url", url)
    assert (again.returncode, again.json()) == (0, exposed.json())
    rewrite = await run_cli(
        "ports", "expose", "abc123", "5173", "--host-rewrite", "--redis-url", url
    )
    assert rewrite.json()["url"] == f"http://5173-abc123.{base}"
    assert await redis.hget(schema.sandbox_key("abc123"), "port:5173") == '{"hostRewrite":true}'
    listed = await run_cli("ports", "list", "abc123", "--redis-url", url)
    assert [e["port"] for e in listed.json()] == [3000, 5173]
    closed = await run_cli("ports", "close", "abc123", "3000", "--redis-url", url)
    assert [p["port"] for p in closed.json()["ports"]] == [5173]


async def test_events(gateway: GatewayHandle, url: str) -> None:
    """events prints one JSON event per line, oldest first, and exits."""
    await run_cli("sandbox", "create", "abc123", "--address", "127.0.0.2", "--redis-url", url)
    await run_cli("ports", "expose", "abc123", "3000", "--redis-url", url)
    ran = await run_cli("events", "--redis-url", url)
    assert ran.returncode == 0
    lines = [json.loads(line) for line in ran.stdout.splitlines()]
    assert [(e["type"], e["gen"], e.get("port")) for e in lines] == [
        ("sandbox.created", 1, None),
        ("port.exposed", 2, 3000),
    ]
    assert lines[1]["url"] == f"http://3000-abc123.box.test:{gateway.port}"


async def test_events_follow_streams_new_events(gateway: GatewayHandle, url: str) -> None:
    """events --follow prints old events, then one that happens later, until it is killed."""
    await run_cli("sandbox", "create", "abc123", "--address", "127.0.0.2", "--redis-url", url)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "events", "--follow", "--redis-url", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=cli_env(),
    )  # fmt: skip
    assert process.stdout is not None
    try:
        async with asyncio.timeout(CLI_TIMEOUT_SECONDS):
            first = json.loads(await process.stdout.readline())
            await run_cli("ports", "expose", "abc123", "3000", "--redis-url", url)
            second = json.loads(await process.stdout.readline())
        assert process.returncode is None  # still following
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        async with asyncio.timeout(10.0):
            await process.wait()
    assert (first["type"], second["type"], second["port"]) == (
        "sandbox.created",
        "port.exposed",
        3000,
    )


async def test_redis_url_from_the_environment(gateway: GatewayHandle, url: str) -> None:
    """GATEWAY_REDIS_URL is used when --redis-url is not given."""
    ran = await run_cli(
        "sandbox", "create", "abc123", "--address", "127.0.0.2",
        env=cli_env({"GATEWAY_REDIS_URL": url}),
    )  # fmt: skip
    assert (ran.returncode, ran.json()["id"]) == (0, "abc123")


# ---------------------------------------------------------------------------------------
# Errors: one line on stderr, non-zero exit, nothing changed
# ---------------------------------------------------------------------------------------

BAD_COMMANDS = [
    (["ports", "expose", "abc123", "80"], ["port 80 is reserved", "1024-65535"]),
    (["ports", "expose", "abc123", "03000"], ["'03000'", "leading zero"]),
    (["ports", "expose", "abc123", "65536"], ["port 65536 is invalid"]),
    (["ports", "expose", "abc123", "abc"], ["'abc'"]),
    (["ports", "expose", "nosuch", "3000"], ["no sandbox with id 'nosuch'"]),
    (["ports", "close", "nosuch", "3000"], ["'nosuch'"]),
    (["sandbox", "show", "nosuch"], ["'nosuch'"]),
    (["sandbox", "create", "new123", "--address", "10.0.0.1"], ["10.0.0.1", "outside"]),
    (["sandbox", "create", "new123", "--address", "not-an-ip"], ["'not-an-ip'"]),
    (["sandbox", "create", "New.1", "--address", "127.0.0.2"], ["'New.1'", "lowercase"]),
    (["sandbox", "create", "abc123xx", "--address", "127.0.0.2"], ["label 'abc123'", "held"]),
    (["sandbox", "resume", "abc123", "--address", "8.8.8.8"], ["8.8.8.8"]),
]


BAD_COMMAND_IDS = [
    "port-80", "port-03000", "port-65536", "port-abc", "expose-unknown", "close-unknown",
    "show-unknown", "address-outside", "address-not-ip", "id-uppercase-dots", "label-taken",
    "resume-address-outside",
]  # fmt: skip


@pytest.mark.parametrize(("argv", "words"), BAD_COMMANDS, ids=BAD_COMMAND_IDS)
async def test_errors_are_one_line(
    gateway: GatewayHandle, url: str, redis: aioredis.Redis, argv: list[str], words: list[str]
) -> None:
    """Bad input exits non-zero with one line on stderr naming the problem, changing nothing."""
    async with route_writer(url) as writer:
        await writer.create("abc123", address="127.0.0.2")
    async with unchanged(redis):
        ran = await run_cli(*argv, "--redis-url", url)
    assert_one_line_error(ran, *words)
    assert ran.returncode == 1


async def test_bad_redis_url_is_one_line(gateway: GatewayHandle) -> None:
    """A --redis-url that is not a Redis URL is one line naming the flag, not a traceback."""
    ran = await run_cli("sandbox", "show", "abc123", "--redis-url", "localhost:6379")
    assert_one_line_error(ran, "--redis-url", "redis://")


async def test_unreachable_redis_is_one_line() -> None:
    """A Redis nobody answers on is one line saying so."""
    ran = await run_cli("sandbox", "show", "abc123", "--redis-url", "redis://127.0.0.1:1")
    assert_one_line_error(ran, "Redis unreachable")


async def test_usage_errors_are_one_line() -> None:
    """A missing argument is one line too (exit 2), not argparse's usage block."""
    ran = await run_cli("ports", "expose", "abc123")
    assert_one_line_error(ran, "required", "port")
    assert ran.returncode == 2


async def test_no_serve_running(tmp_path: Path) -> None:
    """With no URL and an empty state dir the CLI says in one line that no serve is running."""
    ran = await run_cli(
        "sandbox", "show", "abc123", env=cli_env({"GATEWAY_STATE_DIR": str(tmp_path)})
    )
    assert_one_line_error(ran, "no gateway serve is running", str(tmp_path))


async def test_serve_that_crashed(tmp_path: Path) -> None:
    """A URL left behind by a crashed serve (nobody answers) is the same one-line message."""
    (tmp_path / "redis.url").write_text(f"unix://{tmp_path}/redis.sock\n")
    ran = await run_cli(
        "ports", "list", "abc123", env=cli_env({"GATEWAY_STATE_DIR": str(tmp_path)})
    )
    assert_one_line_error(ran, "no gateway serve is running", "does not answer")
