"""Polling instead of sleeping, and the one time unit tests use.

Tests never sleep a fixed time to "let something happen": they poll a condition with
``wait_until`` (traefik's ``try`` package). Durations a test chooses itself (a delay an
upstream adds, a timeout the gateway is configured with) are written in ``MS`` so a slow CI
machine can stretch them all at once with ``GATEWAY_TEST_TIME_SCALE``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Awaitable, Callable

__all__ = ["MS", "TIME_SCALE", "poll_until", "wait_until"]

TIME_SCALE = float(os.environ.get("GATEWAY_TEST_TIME_SCALE") or 1)
"""Factor applied to every ``MS``-based duration (``GATEWAY_TEST_TIME_SCALE``, default 1)."""

MS = 0.001 * TIME_SCALE
"""One millisecond in seconds, scaled by ``TIME_SCALE``: write ``250 * MS``."""


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    # A deadline between polls, not an I/O timeout: asyncio.timeout would cancel the
    # predicate mid-call instead of letting the last poll finish.
    timeout: float = 5.0,  # noqa: ASYNC109
    interval: float = 0.01,
    what: str = "",
) -> None:
    """Poll ``predicate`` until it returns true.

    Args:
        predicate: called every ``interval`` seconds; may be sync or return an awaitable.
            Exceptions it raises propagate (a predicate that can fail should catch).
        timeout: seconds before giving up.
        interval: seconds between calls.
        what: names the condition in the failure message.

    Raises:
        AssertionError: the predicate never held within ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        outcome = predicate()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def poll_until(
    predicate: Callable[[], bool],
    *,
    timeout: float = 5.0,
    interval: float = 0.01,
    what: str = "",
) -> None:
    """Blocking twin of ``wait_until`` for sync code (session fixtures, worker threads).

    Raises:
        AssertionError: the predicate never held within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)
