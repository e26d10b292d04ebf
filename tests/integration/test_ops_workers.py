"""``gateway serve --workers 2``: serves, reports the whole group, drains both (issue 6, point 5).

The workers share the listeners (SO_REUSEPORT) and publish their figures to a shared
metrics directory, so a scrape of either reports the sum over the group. SIGTERM to the
master drains every worker and the group exits 0.

Skipped while the CLI still refuses more than one worker (checked once, at import).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tests.integration.test_ops_drain import (
    Replica,
    replica,
    route_sandbox,
    sample,
    scrape,
    status_of,
)
from tests.support.gateway import LOOPBACK_ARGS
from tests.support.rawhttp import exchange, request_bytes
from tests.support.upstreams import Upstream
from tests.support.waiting import wait_until

SANDBOX = "opswrk01"
REQUESTS = 200


def _workers_refused() -> bool:
    """Whether ``gateway serve --workers 2`` still says it supports only 1 worker."""
    try:
        ran = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--workers", "2", "--listen",
             "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--redis-url",
             "redis://127.0.0.1:1"],
            capture_output=True, text=True, timeout=30, check=False,
            env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return False
    return "only 1 worker" in ran.stderr


pytestmark = pytest.mark.skipif(
    _workers_refused(), reason="gateway serve still refuses --workers > 1"
)


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces, so split after ")".
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest_asyncio.fixture
async def group(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> AsyncIterator[tuple[Replica, Path]]:
    """A two-worker group with its metrics directory under ``tmp_path``."""
    env = {
        "GATEWAY_METRICS_DIR": str(tmp_path),
        "GATEWAY_SERVER__DRAIN_DELAY_SECONDS": "1",
        "GATEWAY_ACCESS_LOG__ENABLED": "false",
    }
    args = (*LOOPBACK_ARGS, "--workers", "2")
    async with replica(redis_url, env=env, args=args) as running:
        yield running, tmp_path


async def test_two_workers_serve_report_the_group_and_drain(
    group: tuple[Replica, Path], redis_url: str, upstream: Upstream
) -> None:
    """--workers 2: both serve, /metrics sums the group, SIGTERM drains both and exits 0."""
    gateway, metrics_dir = group
    assert gateway.process.ready["workers"] == "2"
    workers = _children(gateway.process.pid)
    assert len(workers) == 2, workers
    host = await route_sandbox(redis_url, SANDBOX, upstream)
    for index in range(REQUESTS):  # a new connection each: the kernel spreads them
        answer = await exchange(
            "127.0.0.1", gateway.port, request_bytes("GET", f"/w/{index}", [("Host", host)])
        )
        assert answer.status == 200

    def per_worker() -> dict[int, int]:
        counts = {}
        for path in metrics_dir.glob("*.json"):
            try:
                snapshot = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            counts[int(path.stem)] = sum(
                row[3] for row in snapshot["requests"] if row[:3] == ["http", "ok", "2xx"]
            )
        return counts

    await wait_until(
        lambda: sum(per_worker().values()) == REQUESTS, timeout=5, what="both snapshots"
    )
    shares = per_worker()
    assert set(shares) == set(workers)
    assert all(share > 0 for share in shares.values()), shares

    async def group_total_everywhere() -> bool:
        # Several scrapes: each lands on one worker or the other (the admin port is shared).
        for _ in range(6):
            samples = await scrape(gateway.admin_url)
            total = sample(
                samples, "gateway_requests_total", kind="http", outcome="ok", code_class="2xx"
            )
            if total != REQUESTS:
                return False
        return True

    await wait_until(group_total_everywhere, timeout=5, what="/metrics summing both workers")

    signalled = time.monotonic()
    gateway.signal()

    async def not_ready() -> bool:
        statuses = [await status_of(gateway.admin_url + "/readyz") for _ in range(6)]
        return all(status in (503, None) for status in statuses)

    await wait_until(not_ready, timeout=1.5, interval=0.02, what="every worker draining")
    assert await gateway.exit_code(wait_seconds=15) == 0
    assert not any(_alive(pid) for pid in workers)
    print(
        f"workers: {REQUESTS} requests split {sorted(shares.values())}; group exited 0 "
        f"{time.monotonic() - signalled:.2f} s after SIGTERM"
    )
