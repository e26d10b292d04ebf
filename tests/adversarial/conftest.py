"""Fixtures of the adversarial suite, and the figures it measures for docs/security.md.

Two tenants, each a recording upstream on its own loopback address: ``victim`` (label
``vic123``, 127.0.0.2) and ``attacker`` (``att123``, 127.0.0.4). The gateway's sandbox
networks are exactly those two /32s, so 127.0.0.3 and 127.0.0.5 (canaries for metadata and
Redis) lie outside them.

Every test adds to ``FIGURES`` (inputs tried, desyncs, wrong-tenant routes, canary hits,
scanner rates). With ``GATEWAY_ADVERSARIAL_RESULTS=path`` set, the session writes them, and
each test's outcome and catalogue IDs, to that JSON file (``tests/adversarial/report.py``).
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from gateway.routing.store import RouteWriter
from tests.support.gateway import GatewayHandle, route_writer, running_gateway
from tests.support.recording import RecordingUpstream

VICTIM, ATTACKER = "vic123", "att123"
VICTIM_IP, ATTACKER_IP = "127.0.0.2", "127.0.0.4"
METADATA_IP, REDIS_IP = "127.0.0.3", "127.0.0.5"
PORT = 3000  # the public port label; upstreams sit on their own port 0

FIGURES: collections.Counter[str] = collections.Counter()
RATES: dict[str, float] = {}
_OUTCOMES: list[dict[str, Any]] = []

# The gateway tests here run with the miss budget off unless a test asks for it.
ADVERSARIAL_CONFIG: dict[str, Any] = {
    "routing": {"sandbox_networks": [f"{VICTIM_IP}/32", f"{ATTACKER_IP}/32"]},
    "limits": {"misses_per_window": 0},
}


@dataclass
class Tenants:
    """Two routed sandboxes with recording upstreams, and the gateway in front."""

    gateway: GatewayHandle
    writer: RouteWriter
    victim: RecordingUpstream
    attacker: RecordingUpstream

    def host(self, label: str) -> str:
        upstream = self.victim if label == VICTIM else self.attacker
        return self.gateway.host(upstream.port, label)

    def wrong_tenant(self, marker: str) -> int:
        """Requests carrying ``marker`` (in target or headers) that reached the victim."""
        hits = 0
        for request in self.victim.requests:
            text = request.target + "".join(v for _, v in request.headers)
            hits += marker in text
        return hits


@pytest_asyncio.fixture
async def gateway(redis: aioredis.Redis, redis_url: str) -> AsyncIterator[GatewayHandle]:
    """The gateway with the two tenants' networks only and the miss budget off."""
    async with running_gateway(redis_url, ADVERSARIAL_CONFIG) as handle:
        yield handle


@pytest_asyncio.fixture
async def tenants(gateway: GatewayHandle, redis_url: str) -> AsyncIterator[Tenants]:
    """Victim and attacker sandboxes routed to their own recording upstreams."""
    async with (
        route_writer(redis_url) as writer,
        RecordingUpstream.start(VICTIM_IP) as victim,
        RecordingUpstream.start(ATTACKER_IP) as attacker,
    ):
        await writer.create(VICTIM, address=VICTIM_IP)
        await writer.expose(VICTIM, victim.port)
        await writer.create(ATTACKER, address=ATTACKER_IP)
        await writer.expose(ATTACKER, attacker.port)
        yield Tenants(gateway, writer, victim, attacker)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _OUTCOMES.append({"nodeid": report.nodeid, "outcome": report.outcome})


_CATALOGUE: dict[str, list[str]] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        _CATALOGUE[item.nodeid] = [i for m in item.iter_markers("catalogue") for i in m.args]


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("GATEWAY_ADVERSARIAL_RESULTS")
    if not path:
        return
    for outcome in _OUTCOMES:
        outcome["catalogue"] = _CATALOGUE.get(outcome["nodeid"], [])
    with open(path, "w", encoding="utf-8") as out:
        json.dump({"figures": dict(FIGURES), "rates": RATES, "tests": _OUTCOMES}, out, indent=1)
