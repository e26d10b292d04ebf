"""A per-client budget of misses, so a stranger cannot cheaply enumerate sandbox labels. Pure.

Labels are short (6 characters by default), so a scanner could walk them. Every answer
``sandbox_not_found`` or ``port_not_exposed`` is a *miss*; each client (the client IP as
``headers.resolve_client`` decides it) may make ``misses_per_window`` of them per window of
``window_seconds``. Once spent, ``spent(client)`` is True until that client's window
ends, and the gateway answers its requests to sandbox hosts with 429 ``rate_limited``
without looking the label up.

Contract:
- Fixed windows per client: a client's window starts at its first miss and lasts
  ``window_seconds``; the next miss after it starts a fresh window. So a scanner gets at
  most ``misses_per_window`` misses per ``window_seconds`` (2x that across one boundary).
- Hits cost nothing: a client that only reaches live sandboxes is never limited.
- Memory is bounded: at most ``max_clients`` clients are tracked; beyond it the client
  whose window started longest ago is forgotten (it gets a fresh budget if it returns).
  Forgetting is the safe direction for legitimate users; a scanner rotating through more
  than ``max_clients`` addresses is a distributed attack this budget does not claim to stop.
- ``misses_per_window == 0`` or ``window_seconds == 0`` disables the budget.
- Time comes from ``clock`` (monotonic seconds), so tests drive it without sleeping.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["MISS_CODES", "MissBudget"]

# The answers that tell a scanner "no such thing here" (DESIGN.md section 5).
MISS_CODES: frozenset[str] = frozenset({"sandbox_not_found", "port_not_exposed"})


class MissBudget:
    """Counts misses per client over fixed windows (see the module docstring)."""

    def __init__(
        self,
        misses_per_window: int,
        window_seconds: float,
        *,
        max_clients: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if misses_per_window < 0 or window_seconds < 0 or max_clients < 1:
            raise ValueError("misses_per_window and window_seconds >= 0, max_clients >= 1")
        self.misses_per_window = misses_per_window
        self.window_seconds = window_seconds
        self.max_clients = max_clients
        self._clock = clock
        # client -> [window start, misses in it]; ordered by window start (oldest first).
        self._windows: OrderedDict[str, list[float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.misses_per_window > 0 and self.window_seconds > 0

    def __len__(self) -> int:
        """How many clients are tracked now."""
        return len(self._windows)

    def spent(self, client: str) -> bool:
        """Whether ``client`` has used up its misses in its current window."""
        if not self.enabled:
            return False
        window = self._windows.get(client)
        if window is None:
            return False
        if self._clock() - window[0] >= self.window_seconds:
            del self._windows[client]
            return False
        return window[1] >= self.misses_per_window

    def miss(self, client: str) -> None:
        """Count one miss for ``client``."""
        if not self.enabled:
            return
        now = self._clock()
        window = self._windows.get(client)
        if window is not None and now - window[0] < self.window_seconds:
            window[1] += 1
            return
        if window is not None:
            del self._windows[client]
        self._windows[client] = [now, 1.0]
        while len(self._windows) > self.max_clients:
            self._windows.popitem(last=False)
