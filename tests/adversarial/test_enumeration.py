"""Enumeration: how many labels a scanner tests per hour, with and without the miss budget.

The scanner is one keep-alive client asking for random labels as fast as the gateway
answers, for a bounded run (SCAN_SECONDS, at most SCAN_MAX requests). A label is *tested*
when the answer tells the scanner something (404 ``sandbox_not_found``); a 429
``rate_limited`` tells it nothing. Per hour: without the budget, the measured rate
extrapolated; with it, the budget's own bound (misses per window x windows per hour),
checked against the run: the scanner got exactly the budget's misses, then only 429s.
"""

from __future__ import annotations

import asyncio
import random
import string
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.adversarial.conftest import ADVERSARIAL_CONFIG, FIGURES, RATES
from tests.support.gateway import GatewayHandle, route_writer, running_gateway
from tests.support.rawhttp import RawConnection
from tests.support.recording import RecordingUpstream

SCAN_SECONDS = 3.0
SCAN_MAX = 20_000
BUDGET = 50
WINDOW_SECONDS = 60.0


async def _scan(gw: GatewayHandle) -> tuple[int, int, float]:
    """(labels tested, 429 answers, seconds) of one bounded scan."""
    rng = random.Random(8)
    tested = limited = 0
    started = time.monotonic()
    async with RawConnection.open("127.0.0.1", gw.port) as conn:
        for _ in range(SCAN_MAX):
            if time.monotonic() - started >= SCAN_SECONDS:
                break
            label = "".join(rng.choices(string.ascii_lowercase + string.digits, k=6))
            await conn.send(f"GET / HTTP/1.1\r\nHost: 3000-{label}.box.test\r\n\r\n".encode())
            response = await conn.read_response()
            code = response.header("X-Gateway-Error")
            if code == "sandbox_not_found":
                tested += 1
            elif code == "rate_limited":
                assert response.status == 429
                limited += 1
            else:
                raise AssertionError(f"unexpected answer {response.status} {code}")
    return tested, limited, time.monotonic() - started


def _config(misses: int) -> dict[str, Any]:
    return {
        **ADVERSARIAL_CONFIG,
        "limits": {"misses_per_window": misses, "miss_window_seconds": WINDOW_SECONDS},
    }


@pytest.mark.catalogue("TEN-07")
async def test_scanner_rate_without_and_with_the_miss_budget(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """Without a budget a scanner tests thousands of labels; with one, exactly the budget."""
    async with running_gateway(redis_url, _config(0)) as gw:
        open_tested, open_limited, open_seconds = await _scan(gw)
    async with running_gateway(redis_url, _config(BUDGET)) as gw:
        tested, limited, _seconds = await _scan(gw)
    FIGURES["scanner_requests"] += open_tested + tested + limited
    RATES["labels_per_hour_without_budget"] = round(open_tested / open_seconds * 3600)
    RATES["labels_per_hour_with_budget"] = BUDGET * 3600 / WINDOW_SECONDS
    RATES["budget_misses_per_window"] = BUDGET
    RATES["budget_window_seconds"] = WINDOW_SECONDS
    RATES["scan_seconds"] = round(open_seconds, 2)
    RATES["scan_tested_without_budget"] = open_tested
    RATES["scan_tested_with_budget"] = tested
    RATES["scan_429_with_budget"] = limited
    print(f"scanner labels/hour: without budget {RATES['labels_per_hour_without_budget']}, "
          f"with budget {RATES['labels_per_hour_with_budget']:.0f}")  # fmt: skip
    assert open_limited == 0
    assert open_tested > BUDGET
    assert tested == BUDGET
    assert limited > 0


@pytest.mark.catalogue("TEN-07")
async def test_hits_cost_nothing_and_a_spent_client_is_limited_everywhere(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """Hits never spend the budget; once spent, even a live host is 429, for that IP only."""
    async with (
        running_gateway(redis_url, _config(3)) as gw,
        RecordingUpstream.start("127.0.0.2") as up,
        route_writer(redis_url) as writer,
    ):
        await writer.create("live01", address="127.0.0.2")
        await writer.expose("live01", up.port)
        live = f"GET / HTTP/1.1\r\nHost: {gw.host(up.port, 'live01')}\r\n\r\n".encode()
        async with RawConnection.open("127.0.0.1", gw.port) as conn:
            for _ in range(10):
                await conn.send(live)
                assert (await conn.read_response()).status == 200
            for code in ("port_not_exposed", "sandbox_not_found", "sandbox_not_found"):
                label = "live01" if code == "port_not_exposed" else "nosuch"
                await conn.send(f"GET / HTTP/1.1\r\nHost: 4000-{label}.box.test\r\n\r\n".encode())
                assert (await conn.read_response()).header("X-Gateway-Error") == code
            await conn.send(live)
            assert (await conn.read_response()).status == 429
        # Another client (another loopback source address) has its own budget.
        reader, writer_ = await asyncio.open_connection(
            "127.0.0.1", gw.port, local_addr=("127.0.0.9", 0)
        )
        other = RawConnection(reader, writer_)
        try:
            await other.send(live)
            assert (await other.read_response()).status == 200
        finally:
            await other.close()
