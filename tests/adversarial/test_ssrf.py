"""SSRF and loops (catalogue TEN-06): routes outside the sandbox networks, or at the gateway.

Canaries on 127.0.0.3 (metadata) and 127.0.0.5 (Redis) stand in for what a route must
never reach; the gateway's sandbox networks are 127.0.0.2/32 and 127.0.0.4/32.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway import errors
from gateway.routing import schema
from tests.adversarial.conftest import FIGURES, METADATA_IP, REDIS_IP, VICTIM, VICTIM_IP
from tests.support.canaries import Canary
from tests.support.gateway import GatewayHandle, route_writer, running_gateway
from tests.support.rawhttp import exchange


async def _status(gw: GatewayHandle, port: int, label: str) -> tuple[int, str | None]:
    data = f"GET / HTTP/1.1\r\nHost: {gw.host(port, label)}\r\nConnection: close\r\n\r\n"
    response = await exchange("127.0.0.1", gw.port, data.encode())
    FIGURES["inputs"] += 1
    return response.status, response.header("X-Gateway-Error")


@pytest.mark.catalogue("TEN-06")
async def test_write_time_refusal_by_library_api_and_cli(
    gateway: GatewayHandle, redis_url: str
) -> None:
    """Library, admin API and CLI all refuse an address outside the sandbox networks."""
    for address in (METADATA_IP, REDIS_IP, "169.254.169.254", "10.0.0.1", "0.0.0.0", "::1"):
        async with route_writer(redis_url) as writer:
            with pytest.raises(errors.RuleViolation):
                await writer.create("lib001", address=address)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{gateway.admin_url}/v1/sandboxes", json={"id": "api001", "address": address}
            ) as r,
        ):
            assert r.status == 422, address
        FIGURES["inputs"] += 2
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "sandbox", "create", "cli001", "--address", METADATA_IP,
        "--redis-url", redis_url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _out, err = await asyncio.wait_for(cli.communicate(), 30)
    FIGURES["inputs"] += 1
    assert cli.returncode != 0
    assert METADATA_IP in err.decode()


@pytest.mark.catalogue("TEN-06")
async def test_dial_time_refusal_of_records_written_straight_into_redis(
    gateway: GatewayHandle,
    redis: aioredis.Redis,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A record aimed at the metadata or Redis canary gets 502; the canaries see 0 connections."""
    async with route_writer(redis_url) as writer:
        await writer.create(VICTIM, address=VICTIM_IP)
        for target_ip in (METADATA_IP, REDIS_IP):
            async with Canary.start(target_ip) as canary:
                await writer.expose(VICTIM, canary.port)
                # Straight into Redis, as a control plane in another language might;
                # no request came yet, so the gateway reads this record.
                await redis.hset(schema.sandbox_key(VICTIM), "address", target_ip)
                caplog.clear()
                status, code = await _status(gateway, canary.port, VICTIM)
                FIGURES["canary_hits"] += canary.connections
                assert (status, code) == (502, "upstream_refused")
                assert canary.connections == 0
                # Refused by the dial check, not merely "nothing listening".
                assert f"to {target_ip}:{canary.port}" in caplog.text
                await writer.close(VICTIM, canary.port)


@pytest.mark.catalogue("TEN-06")
async def test_a_route_to_the_gateways_own_listener_is_refused(
    redis: aioredis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Exposing the gateway's own port at its address is refused when written and when dialled."""
    overrides = {"limits": {"misses_per_window": 0}}  # sandbox networks: all of 127.0.0.0/8
    async with running_gateway(redis_url, overrides) as gw, route_writer(redis_url) as writer:
        await writer.create("loop01", address="127.0.0.1")
        with pytest.raises(errors.RuleViolation):
            await writer.expose("loop01", gw.port)
        await writer.create("loop02", address=VICTIM_IP)
        await writer.expose("loop02", gw.port)
        await redis.hset(schema.sandbox_key("loop02"), "address", "127.0.0.1")
        status, code = await _status(gw, gw.port, "loop02")
        assert (status, code) == (502, "upstream_refused")
        assert f"refused route of loop02 to 127.0.0.1:{gw.port}" in caplog.text
