"""Per-sandbox concurrent connection limit: one sandbox's traffic cannot starve the others.

Counted: requests being forwarded and WebSockets being relayed to one sandbox (every port
of one label together), i.e. the upstream connections the gateway holds for it. Idle
keep-alive connections of clients hold nothing. Over the limit a request gets 429
``rate_limited`` before any upstream connection is opened.

The limit of a sandbox is its route record's ``limits["connections"]`` when present
(docs/route-table.md), else the gateway default ``limits.connections_per_sandbox``;
0 means unlimited. Pure counting, no I/O; one instance per process (event loop).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from gateway import errors

RECORD_KEY = "connections"


def effective_limit(record_limits: Mapping[str, int], default: int) -> int:
    """The connection limit of one sandbox: the record's ``connections``, else ``default``.

    A negative record value is treated as 0 (unlimited), never as "refuse everything".
    """
    value = record_limits.get(RECORD_KEY, default)
    return max(value, 0)


class ConnectionLimiter:
    """Counts open upstream connections per label and refuses those over the limit."""

    def __init__(self) -> None:
        self._open: dict[str, int] = {}

    def open_count(self, label: str) -> int:
        """How many connections of ``label`` are held now."""
        return self._open.get(label, 0)

    def try_acquire(self, label: str, limit: int) -> bool:
        """Take one slot of ``label`` if fewer than ``limit`` are held (0: no limit)."""
        held = self._open.get(label, 0)
        if limit and held >= limit:
            return False
        self._open[label] = held + 1
        return True

    def release(self, label: str) -> None:
        """Give back one slot taken by ``try_acquire``; entries at zero are dropped."""
        held = self._open.get(label, 0) - 1
        if held > 0:
            self._open[label] = held
        else:
            self._open.pop(label, None)

    def acquire(self, label: str, limit: int, *, port: int | None = None) -> None:
        """``try_acquire``, or raise.

        Raises:
            errors.RateLimited: ``label`` already holds ``limit`` connections.
        """
        if not self.try_acquire(label, limit):
            raise errors.RateLimited(
                f"sandbox {label} has {limit} connections open, its limit", label=label, port=port
            )

    @contextlib.contextmanager
    def hold(self, label: str, limit: int, *, port: int | None = None) -> Iterator[None]:
        """One slot for the duration of the ``with`` block (raises as ``acquire``)."""
        self.acquire(label, limit, port=port)
        try:
            yield
        finally:
            self.release(label)
