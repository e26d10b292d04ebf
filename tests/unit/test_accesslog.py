"""The access log's line format (pure: records in, bytes out)."""

from __future__ import annotations

import io
import json
import time
from datetime import datetime

from gateway.accesslog import MAX_PEER_FIELDS, AccessLog
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


def test_lines_of_different_peers_through_one_log_keep_their_own_fields() -> None:
    """The cached per-peer fields (the last record's, then the table's) never leak from
    one record's line into another's, whichever field differs."""
    log = AccessLog(io.BytesIO())
    for kind, client_ip, host, label, port, method in [
        ("http", "10.0.0.1", "3000-aaaaaa.box", "aaaaaa", 3000, "GET"),
        ("http", "10.0.0.1", "3000-aaaaaa.box", "aaaaaa", 3000, "GET"),
        ("http", "10.0.0.2", "3000-aaaaaa.box", "aaaaaa", 3000, "GET"),
        ("http", "10.0.0.1", "3000-aaaaaa.box", "aaaaaa", 3000, "POST"),
        ("websocket", "10.0.0.1", "3000-aaaaaa.box", "aaaaaa", 3000, "POST"),
        ("http", "10.0.0.1", "3000-aaaaaa.box", "aaaaab", 3000, "POST"),
        ("http", "10.0.0.1", "3000-aaaaaa.box", "aaaaab", 3001, "POST"),
        ("http", "10.0.0.1", "bad host", None, None, "GET"),
        ("http", "10.0.0.1", "bad host", "", None, "GET"),
        ("http", "10.0.0.1", "3000-aaaaaa.box", "aaaaaa", 3000, "GET"),
    ]:
        record = RequestRecord(request_id="r", method=method, path="/")
        record.client_ip, record.host, record.label, record.port = client_ip, host, label, port
        record.kind = kind
        record.finish()
        entry = json.loads(log.line(record))
        fields = (entry["kind"], entry["clientIp"], entry["host"], entry["sandbox"],
                  entry["port"], entry["method"])  # fmt: skip
        assert fields == (kind, client_ip, host, label, port, method)


def test_the_outcome_and_code_are_each_records_own() -> None:
    """A line that went well, and lines with another outcome or a code, each say theirs."""
    log = AccessLog(io.BytesIO())
    for outcome, code in [("ok", ""), ("aborted", "upstream_error"), ("ok", ""),
                          ("client_gone", ""), ("gateway_error", "no_route")]:  # fmt: skip
        record = RequestRecord(request_id="r")
        record.outcome, record.code = outcome, code
        record.finish()
        entry = json.loads(log.line(record))
        assert (entry["outcome"], entry["code"]) == (outcome, code or None)


def test_the_cache_of_peer_fields_stays_bounded() -> None:
    """More distinct peers than MAX_PEER_FIELDS empty the cache, and lines stay right."""
    log = AccessLog(io.BytesIO())
    for n in range(MAX_PEER_FIELDS + 10):
        record = RequestRecord(request_id="r", method="GET", path="/")
        record.client_ip = f"10.{n // 65536}.{n // 256 % 256}.{n % 256}"
        record.finish()
        assert json.loads(log.line(record))["clientIp"] == record.client_ip
    assert len(log._peers) <= MAX_PEER_FIELDS


def test_the_time_is_each_records_own_to_the_millisecond() -> None:
    """Records a fraction of a millisecond, a millisecond and a second apart each get
    their own ISO 8601 UTC time (the cached texts never stand in for another moment)."""
    log = AccessLog(io.BytesIO())
    base = time.monotonic()
    wall_of_base = time.time() - (time.monotonic() - base)
    for offset in (0.0, 0.0002, 0.0013, 1.0007, 1.0011, 61.5):
        record = RequestRecord(request_id="r")
        record.started = base + offset
        record.finish()
        text = str(json.loads(log.line(record))["time"])
        assert text.endswith("Z") and len(text) == len("2026-01-01T00:00:00.000Z"), text
        written = datetime.fromisoformat(text).timestamp()
        assert abs(written - (wall_of_base + offset)) < 0.002, (offset, text)
