"""One accounting record per request or WebSocket session.

The handler fills a ``RequestRecord`` as the request goes; when it ends, the record is
handed to every sink (metrics and the access log subscribe later). Plain attributes and
``slots`` keep it cheap: it is built for every request on the hot path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

Sink = Callable[["RequestRecord"], None]


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    kind: str = "http"  # "http" or "websocket"
    method: str = ""
    host: str = ""
    path: str = ""
    client_ip: str = ""
    label: str | None = None
    port: int | None = None
    status: int = 0
    # The gateway's own error code ("" when the sandbox answered), or the reason a
    # stream was cut after its head went out.
    code: str = ""
    outcome: str = "ok"  # ok | gateway_error | aborted | client_gone
    # A WebSocket session that ended with a close frame: the client's connection going
    # away after it is the normal end, not "client_gone".
    closed: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    started: float = field(default_factory=time.monotonic)
    upstream_seconds: float | None = None
    ended: float | None = None

    def aborted(self, code: str) -> None:
        self.outcome = "aborted"
        self.code = code

    def finish(self) -> None:
        self.ended = time.monotonic()

    @property
    def total_seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started
