"""The gateway's own pages, as Chromium shows them, and screenshots of them for the docs.

The suite always takes the screenshots (into a temporary directory) and checks they are
PNG images; with ``GATEWAY_TEST_UPDATE_SCREENSHOTS=1`` it also writes them to
``docs/screenshots/`` (so a CI run never dirties the tree).
"""

from __future__ import annotations

import http
import os
import shutil
import socket
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, expect

from tests.e2e.browser import open_until
from tests.e2e.harness import Gateway, free_port, is_png

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="package")]

DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
# GATEWAY_TEST_*: the only GATEWAY_ variables `gateway serve` ignores (others are config keys).
UPDATE_ENV = "GATEWAY_TEST_UPDATE_SCREENSHOTS"
# The README's example sandbox; an address with nothing listening on it.
SANDBOX, LABEL, ADDRESS = "abc123", "abc123", "127.0.0.3"


def _nothing_listens(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((ADDRESS, port)) != 0


async def test_gateway_pages_render_and_are_captured(
    gateway: Gateway, context: BrowserContext, tmp_path: Path
) -> None:
    """Upstream refused, port not exposed, paused and terminated: each is the gateway's
    HTML page with its status and X-Gateway-Error code, captured as a PNG."""
    port = 3000 if _nothing_listens(3000) else free_port(ADDRESS)
    url = gateway.url(port, LABEL)
    page = await context.new_page()
    shots: dict[str, Path] = {}

    async def capture(name: str, code: str, status: int, title: str) -> None:
        response = await open_until(
            page, url,
            lambda r: r.status == status and r.headers.get("x-gateway-error") == code,
            what=f"the {code} page",
        )  # fmt: skip
        assert response.headers["content-type"].startswith("text/html")
        assert response.headers.get("x-request-id")
        await expect(page.locator("h1")).to_have_text(title)
        phrase = http.HTTPStatus(status).phrase
        await expect(page.locator(".status")).to_have_text(f"{status} · {phrase}")
        await expect(page.locator("footer")).to_contain_text(f"Error {code}")
        shots[name] = tmp_path / f"{name}.png"
        await page.screenshot(path=shots[name])

    await gateway.cli("sandbox", "create", SANDBOX, "--address", ADDRESS)
    await gateway.cli("ports", "expose", SANDBOX, str(port))
    await capture(
        "upstream-refused", "upstream_refused", 502, f"Nothing is listening on port {port}"
    )
    await gateway.cli("ports", "close", SANDBOX, str(port))
    await capture("port-not-exposed", "port_not_exposed", 404, f"Port {port} is not exposed")
    await gateway.cli("ports", "expose", SANDBOX, str(port))
    await gateway.cli("sandbox", "pause", SANDBOX)
    await capture("paused", "sandbox_paused", 503, "Sandbox paused")
    await gateway.cli("sandbox", "terminate", SANDBOX)
    await capture("terminated", "sandbox_terminated", 410, "Sandbox terminated")

    for name, path in shots.items():
        assert is_png(path), f"{name}: {path} is not a PNG"
    if os.environ.get(UPDATE_ENV) == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for name, path in shots.items():
            shutil.copyfile(path, DOCS_SCREENSHOTS / f"{name}.png")
