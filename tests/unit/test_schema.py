"""gateway.routing.schema: keys, the record and settings encodings, messages, events. Pure."""

from __future__ import annotations

import dataclasses
import re

import pytest

from gateway.routing import schema
from gateway.routing.model import PortOptions, Sandbox, State

RUNNING = Sandbox(
    id="abc123xyz",
    label="abc123",
    state=State.RUNNING,
    address="10.0.0.5",
    incarnation="0011223344556677",
    gen=4,
    allow_ports=frozenset({3000, 5173}),
    ports={3000: PortOptions(), 5173: PortOptions(host_rewrite=True)},
    limits={"connections": 20},
    created_at=1700000000.125,
    updated_at=1700000001.5,
)
RECORDS = [
    pytest.param(RUNNING, id="running-full"),
    pytest.param(
        Sandbox(id="abc", label="abc", state=State.PAUSED, address="fd00::1", incarnation="i"),
        id="paused-minimal-v6",
    ),
    pytest.param(dataclasses.replace(RUNNING, allow_ports=frozenset()), id="empty-allow-ports"),
    pytest.param(
        Sandbox(id="abc123xyz", label="abc123", state=State.TERMINATED, address="", incarnation=""),
        id="tombstone",
    ),
]
SETTINGS = schema.TableSettings(
    label_length=6,
    url_template="https://{port}-{label}.box.runra.dev",
    sandbox_networks=("10.0.0.0/8", "fd00::/8"),
    quarantine_seconds=86400,
    events_max_length=100000,
    gateway_listeners=("0.0.0.0:8080", "[::1]:8081"),
)


def as_redis_hash(
    fields: dict[str, str], *, gen: int, as_bytes: bool
) -> dict[str, str] | dict[bytes, bytes]:
    """What HGETALL returns after write_record.lua stored ``fields`` at ``gen``."""
    stored = {"gen": str(gen), **fields}
    if as_bytes:
        return {k.encode(): v.encode() for k, v in stored.items()}
    return stored


# ---------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------


def test_keys_are_hash_tagged_by_label() -> None:
    """Both per-label keys carry {label} so they share one Cluster slot."""
    assert schema.sandbox_key("abc123") == "gw:{abc123}:sandbox"
    assert schema.gen_key("abc123") == "gw:{abc123}:gen"
    assert (schema.META_KEY, schema.INVALIDATION_CHANNEL, schema.EVENTS_STREAM) == (
        "gw:meta",
        "gw:invalidate",
        "gw:events",
    )


# ---------------------------------------------------------------------------------------
# The sandbox hash
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_bytes", [False, True], ids=["str", "bytes"])
@pytest.mark.parametrize("original", RECORDS)
def test_sandbox_round_trip(original: Sandbox, as_bytes: bool) -> None:
    """decode(encode(record)) is the record, with the gen the script stored."""
    raw = as_redis_hash(schema.encode_sandbox(original), gen=9, as_bytes=as_bytes)
    assert schema.decode_sandbox(raw) == dataclasses.replace(original, gen=9)


def test_encoding_of_every_field() -> None:
    """The hash fields are exactly the documented ones, in their documented text forms."""
    assert schema.encode_sandbox(RUNNING) == {
        "id": "abc123xyz",
        "label": "abc123",
        "state": "running",
        "address": "10.0.0.5",
        "incarnation": "0011223344556677",
        "created_at": "1700000000.125",
        "updated_at": "1700000001.500",
        "allow_ports": "3000,5173",
        "limits": '{"connections": 20}',
        "port:3000": "{}",
        "port:5173": '{"hostRewrite":true}',
    }


def test_no_allow_ports_field_means_no_policy() -> None:
    """Without allow_ports every port may be exposed (None), unlike an empty list."""
    record = dataclasses.replace(RUNNING, allow_ports=None, limits={})
    fields = schema.encode_sandbox(record)
    assert "allow_ports" not in fields and "limits" not in fields
    decoded = schema.decode_sandbox(fields)
    assert decoded is not None and decoded.allow_ports is None


def test_empty_hash_is_no_record() -> None:
    """An empty HGETALL answer (no key) decodes to None."""
    assert schema.decode_sandbox({}) is None


def test_unknown_port_option_keys_are_kept() -> None:
    """Port options written by a newer writer survive a decode/encode round trip."""
    text = '{"hostRewrite":true,"tokenHash":"ab12","visibility":"private"}'
    options = schema.decode_port_options(text)
    assert options == PortOptions(
        host_rewrite=True, extra={"tokenHash": "ab12", "visibility": "private"}
    )
    assert schema.encode_port_options(options) == text


def test_unknown_record_fields_are_ignored() -> None:
    """A field this version doesn't know (a newer writer's) doesn't break the decode."""
    fields = {**schema.encode_sandbox(RUNNING), "gen": "3", "owner": "team-a"}
    decoded = schema.decode_sandbox(fields)
    assert decoded == dataclasses.replace(RUNNING, gen=3)


@pytest.mark.parametrize(
    ("change", "drop"),
    [
        ({}, "id"),
        ({}, "label"),
        ({}, "state"),
        ({"state": "sleeping"}, None),
        ({"gen": "x"}, None),
        ({"allow_ports": "3000,abc"}, None),
        ({"port:abc": "{}"}, None),
        ({"port:3000": "not json"}, None),
        ({"port:3000": "[1, 2]"}, None),
        ({"limits": "[1]"}, None),
        ({"limits": '{"connections": "many"}'}, None),
        ({"limits": "{"}, None),
        ({"created_at": "yesterday"}, None),
    ],
    ids=[
        "no-id", "no-label", "no-state", "bad-state", "bad-gen", "bad-allow-ports",
        "bad-port-field", "port-options-not-json", "port-options-not-object",
        "limits-not-object", "limits-not-numbers", "limits-not-json", "bad-time",
    ],
)  # fmt: skip
def test_corrupt_hash_raises_value_error(change: dict[str, str], drop: str | None) -> None:
    """A hash that breaks the contract raises ValueError (never a half-read record)."""
    fields = {**schema.encode_sandbox(RUNNING), "gen": "3", **change}
    if drop is not None:
        del fields[drop]
    with pytest.raises(ValueError, match="invalid sandbox record"):
        schema.decode_sandbox(fields)


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_bytes", [False, True], ids=["str", "bytes"])
def test_settings_round_trip(as_bytes: bool) -> None:
    """decode_settings(encode_settings(s)) is s."""
    fields = schema.encode_settings(SETTINGS)
    raw = {k.encode(): v.encode() for k, v in fields.items()} if as_bytes else fields
    assert schema.decode_settings(raw) == SETTINGS


def test_settings_encoding() -> None:
    """The meta hash fields are the documented ones, in their documented text forms."""
    assert schema.encode_settings(SETTINGS) == {
        "schema_version": "1",
        "label_length": "6",
        "url_template": "https://{port}-{label}.box.runra.dev",
        "sandbox_networks": '["10.0.0.0/8", "fd00::/8"]',
        "quarantine_seconds": "86400",
        "events_max_length": "100000",
        "gateway_listeners": '["0.0.0.0:8080", "[::1]:8081"]',
    }


def test_settings_missing_is_none_and_listeners_optional() -> None:
    """No meta hash is None; a meta without gateway_listeners (another writer's) decodes."""
    assert schema.decode_settings({}) is None
    fields = schema.encode_settings(SETTINGS)
    del fields["gateway_listeners"]
    decoded = schema.decode_settings(fields)
    assert decoded == dataclasses.replace(SETTINGS, gateway_listeners=())


@pytest.mark.parametrize(
    ("change", "drop"),
    [
        ({}, "schema_version"),
        ({}, "url_template"),
        ({"label_length": "six"}, None),
        ({"sandbox_networks": "10.0.0.0/8"}, None),
        ({"sandbox_networks": '"10.0.0.0/8"'}, None),
        ({"sandbox_networks": "[1, 2]"}, None),
        ({"gateway_listeners": "{}"}, None),
    ],
    ids=[
        "no-version", "no-template", "bad-length", "networks-not-json", "networks-a-string",
        "networks-not-strings", "listeners-not-list",
    ],
)  # fmt: skip
def test_corrupt_settings_raise_value_error(change: dict[str, str], drop: str | None) -> None:
    """An unreadable meta hash raises ValueError naming gw:meta."""
    fields = {**schema.encode_settings(SETTINGS), **change}
    if drop is not None:
        del fields[drop]
    with pytest.raises(ValueError, match="gw:meta"):
        schema.decode_settings(fields)


@pytest.mark.parametrize(
    ("template", "port", "label", "url"),
    [
        ("https://{port}-{label}.box.runra.dev", 3000, "abc123", "https://3000-abc123.box.runra.dev"),
        ("http://{port}-{label}.box.localhost:8080", 5173, "x1", "http://5173-x1.box.localhost:8080"),
    ],
    ids=["production", "local"],
)  # fmt: skip
def test_public_url(template: str, port: int, label: str, url: str) -> None:
    """public_url fills {port} and {label} into the stored template."""
    assert dataclasses.replace(SETTINGS, url_template=template).public_url(port, label) == url


def test_listener_endpoints_parse_v4_and_v6() -> None:
    """gateway_listeners "host:port" and "[v6]:port" become (host, port) pairs."""
    assert SETTINGS.listener_endpoints() == [("0.0.0.0", 8080), ("::1", 8081)]


# ---------------------------------------------------------------------------------------
# Invalidation messages
# ---------------------------------------------------------------------------------------


def test_invalidation_message_round_trip() -> None:
    """The invalidation is "label gen" and parses back, from str or bytes."""
    message = schema.invalidation_message("abc123", 42)
    assert message == "abc123 42"
    assert schema.parse_invalidation(message) == ("abc123", 42)
    assert schema.parse_invalidation(message.encode()) == ("abc123", 42)


@pytest.mark.parametrize("data", ["abc123 42 1796236025284", b"abc123 42 1796236025284"])
def test_invalidation_with_the_publish_time(data: str | bytes) -> None:
    """The write script's "label gen millis" parses to (label, gen) and its Redis time."""
    assert schema.parse_invalidation(data) == ("abc123", 42)
    assert schema.invalidation_time_ms(data) == 1796236025284


def test_invalidation_without_a_time_has_none() -> None:
    """A writer that publishes "label gen" alone is still understood; no time to measure."""
    assert schema.invalidation_time_ms("abc123 42") is None
    assert schema.invalidation_time_ms("abc123 42 soon") is None


@pytest.mark.parametrize(
    "data",
    ["hb:replica1:7", "hb:x 5", "abc123", "abc123 ", "abc123 x", " 5", b"\xff\xfe 1", "a \u0663"],
    ids=["heartbeat", "heartbeat-with-space", "no-gen", "empty-gen", "bad-gen", "no-label",
         "not-utf8", "non-ascii-digit"],
)  # fmt: skip
def test_other_messages_are_ignored(data: str | bytes) -> None:
    """Heartbeats (hb: prefix) and anything not "label gen" parse to None."""
    assert schema.parse_invalidation(data) is None


# ---------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------


def test_event_fields_of_a_port_event() -> None:
    """A port event carries type, sandboxId, label, gen, time, port and url."""
    fields = schema.event_fields(
        "port.exposed", RUNNING, gen=5, port=3000, url="https://3000-abc123.box.runra.dev",
        now=1700000000.25,
    )  # fmt: skip
    assert fields == {
        "type": "port.exposed",
        "sandboxId": "abc123xyz",
        "label": "abc123",
        "gen": "5",
        "time": "2023-11-14T22:13:20.250Z",
        "port": "3000",
        "url": "https://3000-abc123.box.runra.dev",
    }


def test_event_fields_of_a_sandbox_event() -> None:
    """A sandbox event has no port or url, and its time is ISO 8601 UTC with milliseconds."""
    fields = schema.event_fields("sandbox.paused", RUNNING, gen=6)
    assert set(fields) == {"type", "sandboxId", "label", "gen", "time"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["time"])


def test_decode_event_numbers_gen_and_port() -> None:
    """decode_event gives the stream id and the fields, gen and port as numbers."""
    raw = {b"type": b"port.closed", b"gen": b"7", b"port": b"3000", b"label": b"abc123"}
    assert schema.decode_event(b"1-0", raw) == {
        "id": "1-0",
        "type": "port.closed",
        "gen": 7,
        "port": 3000,
        "label": "abc123",
    }


@pytest.mark.parametrize(
    ("raw", "version"),
    [({"schema_version": "1"}, "1"), ({b"schema_version": b"2", b"x": b"y"}, "2"), ({}, None)],
    ids=["str", "bytes-other-fields", "missing"],
)
def test_schema_version_of(raw: schema.RawHash, version: str | None) -> None:
    """The version is read on its own, whatever else the meta hash holds."""
    assert schema.schema_version_of(raw) == version
