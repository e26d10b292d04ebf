"""The JSON access log: one line per request or WebSocket session.

Cheap on the hot path by construction: the sink only appends the finished
``RequestRecord`` to a list; a background task formats and writes the batch every
``FLUSH_SECONDS`` (stdlib logging per request costs 30-40 % of throughput, measured in
shared/research/aiohttp-proxy-facts.md section 2). Secrets are never written: no request
headers at all, the query string is dropped unless ``include_query`` is set (preview
URLs such as Jupyter's carry tokens there), and so is the userinfo of an absolute-form
target (``http://user:pass@host/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import BinaryIO

from gateway.proxy.accounting import RequestRecord

FLUSH_SECONDS = 0.2
# A bound on what waits for the writer, so a blocked stdout can't eat memory.
MAX_PENDING = 100_000


class AccessLog:
    """Collects records (``sink``) and writes them as JSON lines (``run``)."""

    def __init__(self, stream: BinaryIO | None = None, *, include_query: bool = False) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._include_query = include_query
        self._pending: list[RequestRecord] = []
        self._wall_offset = time.time() - time.monotonic()
        self._second = -1
        self._second_text = ""
        self.dropped = 0

    def sink(self, record: RequestRecord) -> None:
        if len(self._pending) < MAX_PENDING:
            self._pending.append(record)
        else:
            self.dropped += 1

    async def run(self) -> None:
        """Write batches for ever; flushes what is pending when cancelled."""
        try:
            while True:
                await asyncio.sleep(FLUSH_SECONDS)
                self.flush()
        finally:
            with contextlib.suppress(Exception):
                self.flush()

    def flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            self._stream.write(b"".join(self.line(record) for record in batch))
            self._stream.flush()

    def line(self, record: RequestRecord) -> bytes:
        path = record.path
        if not path.startswith("/"):
            path = _without_userinfo(path)
        if not self._include_query:
            path = path.partition("?")[0]
        port = record.port
        # Built by hand: json.dumps of a dict was 15 % of a small request's CPU
        # (docs/performance.md); the C string encoder is what json.dumps uses inside.
        # Numbers are formatted from integers, without format specs (see _three_digits).
        return (
            f'{{"time":"{self._iso(record.started + self._wall_offset)}",'
            f'"requestId":{_text(record.request_id)},"kind":"{record.kind}",'
            f'"clientIp":{_text(record.client_ip)},"host":{_text(record.host)},'
            f'"sandbox":{_text_or_null(record.label)},'
            f'"port":{"null" if port is None else port},'
            f'"method":{_text(record.method)},"path":{_text(path)},'
            f'"status":{record.status},"bytesIn":{record.bytes_in},'
            f'"bytesOut":{record.bytes_out},"upstreamMs":{_millis(record.upstream_seconds)},'
            f'"totalMs":{_millis(record.total_seconds)},"outcome":"{record.outcome}",'
            f'"code":{_text_or_null(record.code or None)}}}\n'
        ).encode()

    def _iso(self, wall: float) -> str:
        """``wall`` as ISO 8601 UTC with milliseconds; the second's text is reused (lines
        of one batch mostly share their second, and strftime per line cost ~2 %)."""
        second = int(wall)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{_three_digits(int((wall - second) * 1000))}Z"


_text = json.encoder.encode_basestring_ascii


def _text_or_null(value: str | None) -> str:
    return "null" if value is None else _text(value)


def _millis(seconds: float | None) -> str:
    """``seconds`` as a JSON number of milliseconds, to the microsecond (or null)."""
    if seconds is None:
        return "null"
    micros = int(seconds * 1_000_000)
    return f"{micros // 1000}.{_three_digits(micros % 1000)}"


def _three_digits(value: int) -> str:
    """``value`` (0 to 999) with leading zeros: not ``f"{value:03d}"``, which compiled
    is a generic format call (470 ns against 130, measured)."""
    return str(value + 1000)[1:]


def _without_userinfo(target: str) -> str:
    """An absolute-form target (``http://user:pass@host/...``) without its userinfo: the
    gateway refuses such requests (invalid_host), but their line must not carry it."""
    scheme, separator, rest = target.partition("://")
    if not separator:
        return target
    cut = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    authority = rest[:cut]
    if "@" not in authority:
        return target
    return f"{scheme}://{authority.rpartition('@')[2]}{rest[cut:]}"
