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
        self._second_text = b""
        self._millisecond = -1
        self._millisecond_text = b""
        self._peers: dict[tuple[str, str, str, str | None, int | None, str], bytes] = {}
        # The last record's peer and its fields: a connection's requests come in a row.
        self._last_kind = self._last_ip = self._last_host = self._last_method = ""
        self._last_label: str | None = None
        self._last_port: int | None = None
        self._last_fields = b""
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
        code = record.code
        if record.outcome == "ok" and not code:
            outcome = _OK_FIELDS
        else:
            outcome = b'"outcome":"%b","code":%b' % (
                record.outcome.encode(),
                b'"%b"' % code.encode() if code else b"null",
            )
        total = int(record.total_seconds * 1_000_000)  # (as _millis, without its bytes)
        # Bytes formatting with only bytes and ints is one C call when compiled (the
        # parts' lengths, then copies), where an f-string of the same parts built a str
        # to encode: a third of a line's cost.
        return (
            b'{"time":"%b","requestId":"%b",%b"path":%b,"status":%d,"bytesIn":%d,'
            b'"bytesOut":%d,"upstreamMs":%b,"totalMs":%d.%b,%b}\n'
        ) % (
            self._iso(record.started + self._wall_offset), record.request_id.encode(),
            self._peer_fields(record), _text(path).encode(), record.status, record.bytes_in,
            record.bytes_out, _millis(record.upstream_seconds), total // 1000,
            _THREE_DIGITS[total % 1000], outcome,
        )  # fmt: skip

    def _peer_fields(self, record: RequestRecord) -> bytes:
        """The ``kind`` to ``method`` fields, escaped once per distinct peer: a client
        repeats them on every request of a connection, and escaping them was a fifth of
        a line's cost (docs/performance.md). The last record's are checked first (its
        strings are mostly the very same objects), then a bounded table."""
        kind, ip, host, method = record.kind, record.client_ip, record.host, record.method
        label, port = record.label, record.port
        if (
            ip == self._last_ip and host == self._last_host and method == self._last_method
            and port == self._last_port and label == self._last_label
            and kind == self._last_kind
        ):  # fmt: skip
            return self._last_fields
        key = (kind, ip, host, label, port, method)
        fields = self._peers.get(key)
        if fields is None:
            if len(self._peers) >= MAX_PEER_FIELDS:
                self._peers.clear()
            fields = (
                f'"kind":"{kind}","clientIp":{_text(ip)},"host":{_text(host)},'
                f'"sandbox":{"null" if label is None else _text(label)},'
                f'"port":{"null" if port is None else port},"method":{_text(method)},'
            ).encode()
            self._peers[key] = fields
        self._last_kind, self._last_ip, self._last_host = kind, ip, host
        self._last_method, self._last_label, self._last_port = method, label, port
        self._last_fields = fields
        return fields

    def _iso(self, wall: float) -> bytes:
        """``wall`` as ISO 8601 UTC with milliseconds. The text is reused within its
        millisecond (under load, dozens of lines share one) and the seconds part within
        its second (strftime per line cost ~2 %)."""
        millis = int(wall * 1000)
        if millis != self._millisecond:
            self._millisecond = millis
            second = millis // 1000
            if second != self._second:
                self._second = second
                gmt = time.gmtime(second)
                self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", gmt).encode()
            self._millisecond_text = b"%b.%bZ" % (self._second_text, _THREE_DIGITS[millis % 1000])
        return self._millisecond_text


_text: Final = json.encoder.encode_basestring_ascii
# The last fields of a line whose request went well (most lines).
_OK_FIELDS: Final = b'"outcome":"ok","code":null'
# b"000" to b"999": an indexed tuple, where a format spec (``%03d``, ``f"{n:03d}"``) is a
# generic format call when compiled (470 ns against 130 for str() slicing, measured).
_THREE_DIGITS: Final = tuple((b"%d" % (n + 1000))[1:] for n in range(1000))


def _millis(seconds: float | None) -> bytes:
    """``seconds`` as a JSON number of milliseconds, to the microsecond (or null)."""
    if seconds is None:
        return b"null"
    micros = int(seconds * 1_000_000)
    return b"%d.%b" % (micros // 1000, _THREE_DIGITS[micros % 1000])


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
