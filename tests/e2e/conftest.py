"""Fixtures of the end-to-end suite, one of each process per run of this package.

Scope is the package (``tests/e2e``), on the package's event loop: the gateway, Vite and
Chromium start at the first e2e test and stop after the last one, before the rest of the
suite runs, and every async process is owned by that one loop. Test modules mark
themselves ``pytest.mark.asyncio(loop_scope="package")``.

The order of teardown is the reverse of setup; ``_no_leftover_processes`` is set up
first, so it checks last that no gateway, Vite or Chromium process outlived the suite.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis
from playwright.async_api import (
    Browser,
    BrowserContext,
    Playwright,
    ViewportSize,
    async_playwright,
)

from tests.e2e.harness import (
    CHROMIUM_ARGS,
    CHROMIUM_EXECUTABLE,
    E2E_REDIS_DB,
    SANDBOX_ADDRESS,
    Gateway,
    ViteServer,
    copy_vite_app,
    leftover_processes,
    redis_db_url,
)
from tests.support.waiting import poll_until

VIEWPORT = ViewportSize(width=960, height=600)
# Playwright's own waits (navigation, expect) in milliseconds.
PLAYWRIGHT_TIMEOUT_MS = 15_000
_OURS = ("vite", "chromium", "gateway serve", "playwright/driver")
_vite_groups: list[int] = []


@pytest.fixture(scope="package", autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    yield
    leftovers: list[str] = []

    def none_left() -> bool:
        leftovers[:] = leftover_processes(os.getpid(), _OURS, groups=_vite_groups)
        return not leftovers

    try:
        poll_until(none_left, timeout=10.0, interval=0.1, what="e2e processes to exit")
    except AssertionError:
        raise AssertionError(f"processes outlived the e2e suite: {leftovers}") from None


@pytest.fixture(scope="package")
def e2e_redis_url(redis_url: str) -> str:
    """The suite's Redis database (``E2E_REDIS_DB``), emptied first."""
    url = redis_db_url(redis_url, E2E_REDIS_DB)
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def gateway(e2e_redis_url: str) -> AsyncIterator[Gateway]:
    """``gateway serve`` on 127.0.0.1 port 0, domains box.localhost and box.example.test."""
    running = await Gateway.start(e2e_redis_url)
    try:
        yield running
    finally:
        code = await running.stop()
        assert code == 0, f"gateway serve exited {code}:\n{running.recent_log()}"


@pytest.fixture(scope="package")
def vite_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``tests/e2e/vite-app`` the tests may edit."""
    return copy_vite_app(tmp_path_factory.mktemp("e2e") / "vite-app")


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def vite(vite_root: Path) -> AsyncIterator[ViteServer]:
    """The Vite dev server on the sandbox address 127.0.0.2 (port chosen at start)."""
    server = await ViteServer.start(vite_root, SANDBOX_ADDRESS, vite_root.parent)
    _vite_groups.append(server.process.pid)
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def playwright() -> AsyncIterator[Playwright]:
    async with async_playwright() as driver:
        yield driver


@pytest.fixture(scope="package")
def chromium_executable() -> str:
    """Debian's Chromium (``GATEWAY_TEST_CHROMIUM`` overrides); never a downloaded browser."""
    if not Path(CHROMIUM_EXECUTABLE).exists():
        raise AssertionError(f"{CHROMIUM_EXECUTABLE} is missing: `apt-get install chromium`")
    return CHROMIUM_EXECUTABLE


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def browser(playwright: Playwright, chromium_executable: str) -> AsyncIterator[Browser]:
    """Chromium, headless, one for the whole suite."""
    launched = await playwright.chromium.launch(
        executable_path=chromium_executable, headless=True, args=list(CHROMIUM_ARGS)
    )
    try:
        yield launched
    finally:
        await launched.close()


@pytest_asyncio.fixture(loop_scope="package")
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh browser profile per test (no cache or cookies carried over)."""
    created = await browser.new_context(viewport=VIEWPORT)
    created.set_default_timeout(PLAYWRIGHT_TIMEOUT_MS)
    try:
        yield created
    finally:
        await created.close()
