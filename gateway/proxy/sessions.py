"""Open streams and WebSockets, by label, so lifecycle changes can end them.

After a close, pause or terminate (or a resume at a new address), connections to the old
route must not live on: "at once" includes them (DESIGN.md section 2). The handler
registers every long-lived exchange here; when a label is invalidated, ``enforce`` looks
at the label's new record and stops every session the record no longer routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

from gateway import errors
from gateway.routing import model

log = logging.getLogger("gateway.sessions")

Stop = Callable[[str], Awaitable[None]]


class Session:
    """One request or WebSocket session in progress to a sandbox's port; compared by
    identity. A plain class: one is made per request, and a compiled dataclass keeps an
    interpreted ``__init__`` (gateway/compiled.py)."""

    __slots__ = ("incarnation", "label", "port", "restart", "stop", "stopping")

    def __init__(
        self, label: str, port: int, incarnation: str, stop: Stop, restart: Stop | None = None
    ) -> None:
        self.label = label
        self.port = port
        self.incarnation = incarnation
        self.stop = stop
        # WebSockets only: end the session asking the client to reconnect (drain).
        self.restart = restart
        self.stopping = False


class ActiveSessions:
    def __init__(self) -> None:
        self._by_label: dict[str, set[Session]] = {}

    @contextlib.contextmanager
    def track(
        self, label: str, port: int, incarnation: str, stop: Stop, *, restart: Stop | None = None
    ) -> Iterator[Session]:
        """Register a session for the duration of the ``with`` block."""
        session = self.add(Session(label, port, incarnation, stop, restart))
        try:
            yield session
        finally:
            self.remove(session)

    def add(self, session: Session) -> Session:
        """Register ``session`` until ``remove`` (for callers that are not one block)."""
        self._by_label.setdefault(session.label, set()).add(session)
        return session

    def remove(self, session: Session) -> None:
        sessions = self._by_label.get(session.label)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._by_label[session.label]

    def labels(self) -> list[str]:
        return list(self._by_label)

    def has(self, label: str) -> bool:
        return label in self._by_label

    def count(self) -> int:
        return sum(len(s) for s in self._by_label.values())

    def count_websockets(self) -> int:
        return sum(1 for s in self._by_label.values() for x in s if x.restart is not None)

    async def enforce(self, label: str, record: model.Sandbox | None) -> int:
        """Stop the sessions of ``label`` that ``record`` no longer routes; return how many.

        The stops run concurrently: each may wait a moment for its sandbox's close answer,
        and all of them must be torn down within the same 2 s.
        """
        stopping: list[tuple[Session, str]] = []
        for session in list(self._by_label.get(label, ())):
            reason = _reason_to_stop(session, record)
            if reason is None or session.stopping:
                continue
            session.stopping = True
            stopping.append((session, reason))
        results = await asyncio.gather(
            *(session.stop(reason) for session, reason in stopping), return_exceptions=True
        )
        for result in results:
            if isinstance(result, Exception):  # one broken session must not shield the others
                log.error("stopping a session of %s failed", label, exc_info=result)
        return len(stopping)

    async def restart_websockets(self, reason: str) -> None:
        """Ask every WebSocket client to reconnect elsewhere (a draining replica)."""
        restarting = [
            session
            for sessions in self._by_label.values()
            for session in sessions
            if session.restart is not None and not session.stopping
        ]
        for session in restarting:
            session.stopping = True
        await asyncio.gather(
            *(s.restart(reason) for s in restarting if s.restart), return_exceptions=True
        )

    async def stop_all(self, reason: str) -> None:
        """End every session (shutdown), all at once."""
        stopping = [
            session
            for sessions in self._by_label.values()
            for session in sessions
            if not session.stopping
        ]
        for session in stopping:
            session.stopping = True
        await asyncio.gather(*(s.stop(reason) for s in stopping), return_exceptions=True)


def _reason_to_stop(session: Session, record: model.Sandbox | None) -> str | None:
    try:
        upstream = model.resolve(record, session.port, label=session.label)
    except errors.EdgeError as exc:
        return exc.message
    if upstream.incarnation != session.incarnation:
        return f"sandbox {session.label} moved to a new address"
    return None
