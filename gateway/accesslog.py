"""The JSON access log: one line per request or WebSocket session.

Cheap on the hot path by construction: the sink formats the finished ``RequestRecord``
into a list of lines, and a background task writes the batch every ``FLUSH_SECONDS``
(stdlib logging per request costs 30-40 % of throughput, measured in
shared/research/aiohttp-proxy-facts.md section 2). Lines, not records, wait for the
writer: bytes are not tracked by the garbage collector, while a flush interval's worth
of records (10,000 objects at 50,000 requests/s) kept it collecting (docs/performance.md).
Secrets are never written: no request headers at all, the query string is dropped unless
``include_query`` is set (preview URLs such as Jupyter's carry tokens there), and so is
the userinfo of an absolute-form target (``http://user:pass@host/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import BinaryIO, Final

from gateway.proxy.accounting import RequestRecord

FLUSH_SECONDS = 0.2
# A bound on what waits for the writer, so a blocked stdout can't eat memory.
MAX_PENDING: Final = 100_000
# A bound on the cache of escaped peer fields (AccessLog._peer_fields).
MAX_PEER_FIELDS: Final = 4096


class AccessLog:
    """Collects records (``sink``) and writes them as JSON lines (``run``)."""

    def __init__(self, stream: BinaryIO | None = None, *, include_query: bool = False) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._include_query = include_query
        self._pending: list[bytes] = []
        self._wall_offset = time.time() - time.monotonic()
        self._second = -1
        self._second_text = ""
        self._millisecond = -1
        self._millisecond_text = ""
        self._peers: dict[tuple[str, str, str | None, int | None, str], str] = {}
        self.dropped = 0

    def sink(self, record: RequestRecord) -> None:
        if len(self._pending) < MAX_PENDING:
            self._pending.append(self.line(record))
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
            self._stream.write(b"".join(batch))
            self._stream.flush()

    def line(self, record: RequestRecord) -> bytes:
        path = record.path
        if not path.startswith("/"):
            path = _without_userinfo(path)
        if not self._include_query:
            path = path.partition("?")[0]
        # Built by hand: json.dumps of a dict was 15 % of a small request's CPU
        # (docs/performance.md); the C string encoder is what json.dumps uses inside.
        # The request id and the code go in unescaped: the id matched
        # headers.is_valid_request_id or was made by the gateway, and codes are the
        # gateway's own identifiers.
        code = f'"{record.code}"' if record.code else "null"
        status = record.status
        total = int(record.total_seconds * 1_000_000)  # (as _millis, without its string)
        return (
            f'{{"time":"{self._iso(record.started + self._wall_offset)}",'
            f'"requestId":"{record.request_id}","kind":"{record.kind}",'
            f"{self._peer_fields(record)}"
            f'"path":{_text(path)},'
            # (str() of a status is a conversion; the table has every three-digit one)
            f'"status":{_THREE_DIGITS[status] if 100 <= status < 1000 else str(status)},'
            f'"bytesIn":{record.bytes_in},"bytesOut":{record.bytes_out},'
            f'"upstreamMs":{_millis(record.upstream_seconds)},'
            f'"totalMs":{total // 1000}.{_THREE_DIGITS[total % 1000]},'
            f'"outcome":"{record.outcome}","code":{code}}}\n'
        ).encode()

    def _peer_fields(self, record: RequestRecord) -> str:
        """The ``clientIp`` to ``method`` fields, escaped once per distinct peer: a
        client repeats them on every request of a connection, and escaping them was a
        fifth of a line's cost (docs/performance.md)."""
        key = (record.client_ip, record.host, record.label, record.port, record.method)
        fields = self._peers.get(key)
        if fields is None:
            if len(self._peers) >= MAX_PEER_FIELDS:
                self._peers.clear()
            port = record.port
            label = record.label
            fields = (
                f'"clientIp":{_text(record.client_ip)},"host":{_text(record.host)},'
                f'"sandbox":{"null" if label is None else _text(label)},'
                f'"port":{"null" if port is None else port},'
                f'"method":{_text(record.method)},'
            )
            self._peers[key] = fields
        return fields

    def _iso(self, wall: float) -> str:
        """``wall`` as ISO 8601 UTC with milliseconds. The text is reused within its
        millisecond (under load, dozens of lines share one) and the seconds part within
        its second (strftime per line cost ~2 %)."""
        millis = int(wall * 1000)
        if millis != self._millisecond:
            self._millisecond = millis
            second = millis // 1000
            if second != self._second:
                self._second = second
                self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._millisecond_text = f"{self._second_text}.{_THREE_DIGITS[millis % 1000]}Z"
        return self._millisecond_text


_text: Final = json.encoder.encode_basestring_ascii
# "000" to "999": an indexed tuple, where f"{n:03d}" compiled is a generic format call
# (470 ns against 130 for str() slicing, measured) and slicing still builds two strings.
_THREE_DIGITS: Final = tuple(str(n + 1000)[1:] for n in range(1000))


def _millis(seconds: float | None) -> str:
    """``seconds`` as a JSON number of milliseconds, to the microsecond (or null)."""
    if seconds is None:
        return "null"
    micros = int(seconds * 1_000_000)
    return f"{micros // 1000}.{_THREE_DIGITS[micros % 1000]}"


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
