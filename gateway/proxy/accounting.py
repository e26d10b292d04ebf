"""One accounting record per request or WebSocket session.

The handler fills a ``RequestRecord`` as the request goes; when it ends, the record is
handed to every sink (metrics and the access log subscribe later). Plain attributes and
``slots`` keep it cheap: it is built for every request on the hot path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

Sink = Callable[["RequestRecord"], None]
# A static: compiled, each ``time.monotonic()`` would look the function up in the module.
_monotonic: Final = time.monotonic


class RequestRecord:
    """What one request did, filled in as it goes.

    A plain class, not a dataclass: compiled (gateway/compiled.py), a dataclass keeps
    the ``__init__`` the dataclasses module writes, which runs interpreted (for this
    record about ten times the cost of a compiled one).
    """

    __slots__ = (
        "bytes_in", "bytes_out", "client_ip", "closed", "code", "ended", "host", "kind",
        "label", "method", "outcome", "path", "port", "request_id", "started", "status",
        "upstream_seconds",
    )  # fmt: skip

    def __init__(self, request_id: str, method: str = "", path: str = "") -> None:
        self.request_id = request_id
        self.kind = "http"  # "http" or "websocket"
        self.method = method
        self.host = ""
        self.path = path
        self.client_ip = ""
        self.label: str | None = None
        self.port: int | None = None
        self.status = 0
        # The gateway's own error code ("" when the sandbox answered), or the reason a
        # stream was cut after its head went out.
        self.code = ""
        self.outcome = "ok"  # ok | gateway_error | aborted | client_gone
        # A WebSocket session that ended with a close frame: the client's connection
        # going away after it is the normal end, not "client_gone".
        self.closed = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = _monotonic()
        self.upstream_seconds: float | None = None
        self.ended: float | None = None

    def aborted(self, code: str) -> None:
        self.outcome = "aborted"
        self.code = code

    def finish(self) -> None:
        self.ended = _monotonic()

    @property
    def total_seconds(self) -> float:
        return (self.ended or _monotonic()) - self.started
