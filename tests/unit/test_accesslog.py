"""The access log's line format (pure: records in, bytes out)."""

from __future__ import annotations

import io
import json

from gateway.accesslog import AccessLog
from gateway.proxy.accounting import RequestRecord


def _line(record: RequestRecord, *, include_query: bool = False) -> dict[str, object]:
    line = AccessLog(io.BytesIO(), include_query=include_query).line(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    parsed: dict[str, object] = json.loads(line)
    return parsed


def test_a_line_is_one_json_object_with_every_field() -> None:
    """Every field is present, typed as documented, None as null."""
    record = RequestRecord(request_id="abc", method="GET", path="/x?token=1")
    record.host = "h"
    record.finish()
    entry = _line(record)
    assert set(entry) == {
        "time", "requestId", "kind", "clientIp", "host", "sandbox", "port", "method",
        "path", "status", "bytesIn", "bytesOut", "upstreamMs", "totalMs", "outcome", "code",
    }  # fmt: skip
    assert entry["path"] == "/x"
    assert entry["sandbox"] is None and entry["port"] is None and entry["code"] is None
    assert entry["upstreamMs"] is None
    assert isinstance(entry["totalMs"], float)


def test_hostile_text_is_escaped_not_injected() -> None:
    """Quotes, newlines, control and undecodable bytes in client text stay inside their field."""
    nasty = 'a"b\\c\n{"x":1}\x00\udcff'
    record = RequestRecord(request_id="r", method=nasty, path="/" + nasty)
    record.host, record.client_ip, record.label = nasty, nasty, "lbl"
    record.port, record.code = 3000, "upstream_error"
    record.upstream_seconds = 0.0012345
    entry = _line(record, include_query=True)
    assert entry["method"] == nasty and entry["host"] == nasty and entry["clientIp"] == nasty
    assert entry["path"] == "/" + nasty
    assert entry["port"] == 3000 and entry["code"] == "upstream_error"
    assert isinstance(entry["port"], int)  # not 3000.0 (compiled code and float params)
    assert entry["upstreamMs"] == 1.234


def test_userinfo_of_an_absolute_target_is_dropped() -> None:
    """An absolute-form target's credentials never reach the log."""
    record = RequestRecord(request_id="r", path="http://user:pass@host/p?q=1")
    assert _line(record)["path"] == "http://host/p"
