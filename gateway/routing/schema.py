"""The Redis schema: key names, field encodings, messages. Pure.

This module is the cross-language contract that docs/route-table.md describes; change
one only with the other, and bump ``SCHEMA_VERSION`` for any incompatible change.

Keys are tagged by label (``gw:{abc123}:...``) so one lookup is one read and every
per-sandbox script touches one Redis Cluster hash slot.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.routing.model import PortOptions, Sandbox, State

SCHEMA_VERSION = 1

META_KEY = "gw:meta"
INVALIDATION_CHANNEL = "gw:invalidate"
EVENTS_STREAM = "gw:events"
HEARTBEAT_PREFIX = "hb:"
PORT_FIELD_PREFIX = "port:"

# An HGETALL answer, with or without decode_responses.
RawHash = Mapping[bytes, bytes] | Mapping[str, str] | Mapping[bytes | str, bytes | str]


def sandbox_key(label: str) -> str:
    """The sandbox (or tombstone) hash of ``label``."""
    return f"gw:{{{label}}}:sandbox"


def gen_key(label: str) -> str:
    """The label's write counter; never expires, so generations only grow."""
    return f"gw:{{{label}}}:gen"


# ---------------------------------------------------------------------------------------
# Sandbox hash
# ---------------------------------------------------------------------------------------


def encode_sandbox(record: Sandbox) -> dict[str, str]:
    """Hash fields of ``record`` (without ``gen``: the write script sets it)."""
    fields = {
        "id": record.id,
        "label": record.label,
        "state": record.state.value,
        "address": record.address,
        "incarnation": record.incarnation,
        "created_at": _time_text(record.created_at),
        "updated_at": _time_text(record.updated_at),
    }
    if record.allow_ports is not None:
        fields["allow_ports"] = ",".join(str(p) for p in sorted(record.allow_ports))
    if record.limits:
        fields["limits"] = json.dumps(dict(record.limits), sort_keys=True)
    for port, options in record.ports.items():
        fields[f"{PORT_FIELD_PREFIX}{port}"] = encode_port_options(options)
    return fields


def decode_sandbox(raw: RawHash) -> Sandbox | None:
    """The record in an HGETALL answer; None for an empty answer (no such key).

    Raises:
        ValueError: the hash is not a valid record (a writer broke the contract).
    """
    if not raw:
        return None
    fields = {_text(k): _text(v) for k, v in raw.items()}
    try:
        allow = fields.get("allow_ports")
        return Sandbox(
            id=fields["id"],
            label=fields["label"],
            state=State(fields["state"]),
            address=fields.get("address", ""),
            incarnation=fields.get("incarnation", ""),
            gen=int(fields.get("gen", "0")),
            allow_ports=None if allow is None else frozenset(int(p) for p in allow.split(",") if p),
            ports={
                int(name[len(PORT_FIELD_PREFIX) :]): decode_port_options(value)
                for name, value in fields.items()
                if name.startswith(PORT_FIELD_PREFIX)
            },
            limits=_decode_limits(fields["limits"]) if "limits" in fields else {},
            created_at=float(fields.get("created_at", "0")),
            updated_at=float(fields.get("updated_at", "0")),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"invalid sandbox record: {exc!r}") from None


def _decode_limits(text: str) -> dict[str, int]:
    limits = json.loads(text)
    if not isinstance(limits, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in limits.values()
    ):
        raise ValueError("limits must be a JSON object of whole numbers")
    return limits


def encode_port_options(options: PortOptions) -> str:
    data: dict[str, object] = dict(options.extra)
    if options.host_rewrite:
        data["hostRewrite"] = True
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def decode_port_options(text: str) -> PortOptions:
    data = json.loads(text) if text else {}
    if not isinstance(data, dict):
        raise ValueError("port options must be a JSON object")
    host_rewrite = data.pop("hostRewrite", False)
    return PortOptions(host_rewrite=host_rewrite is True, extra=data)


# ---------------------------------------------------------------------------------------
# Table settings (the meta hash)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TableSettings:
    """The rules every writer applies, stored beside the table by ``gateway serve``."""

    label_length: int
    url_template: str
    sandbox_networks: tuple[str, ...]
    quarantine_seconds: int
    events_max_length: int
    # The gateway's own listeners ("host:port"): routes there would loop.
    gateway_listeners: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION

    def public_url(self, port: int, label: str) -> str:
        return self.url_template.replace("{port}", str(port)).replace("{label}", label)

    def listener_endpoints(self) -> list[tuple[str, int]]:
        endpoints = []
        for text in self.gateway_listeners:
            host, _, port = text.rpartition(":")
            endpoints.append((host.strip("[]"), int(port)))
        return endpoints


def encode_settings(settings: TableSettings) -> dict[str, str]:
    return {
        "schema_version": str(settings.schema_version),
        "label_length": str(settings.label_length),
        "url_template": settings.url_template,
        "sandbox_networks": json.dumps(list(settings.sandbox_networks)),
        "quarantine_seconds": str(settings.quarantine_seconds),
        "events_max_length": str(settings.events_max_length),
        "gateway_listeners": json.dumps(list(settings.gateway_listeners)),
    }


def schema_version_of(raw: RawHash) -> str | None:
    """The ``schema_version`` field of a meta hash as written, or None when absent.

    Writers check it before anything else in the hash: another version may have changed
    every other field.
    """
    for key, value in raw.items():
        if _text(key) == "schema_version":
            return _text(value)
    return None


def decode_settings(raw: RawHash) -> TableSettings | None:
    """Settings from the meta hash; None when it is missing.

    Raises:
        ValueError: present but unreadable.
    """
    if not raw:
        return None
    fields = {_text(k): _text(v) for k, v in raw.items()}
    try:
        return TableSettings(
            schema_version=int(fields["schema_version"]),
            label_length=int(fields["label_length"]),
            url_template=fields["url_template"],
            sandbox_networks=_string_list(fields["sandbox_networks"], "sandbox_networks"),
            quarantine_seconds=int(fields["quarantine_seconds"]),
            events_max_length=int(fields["events_max_length"]),
            gateway_listeners=_string_list(
                fields.get("gateway_listeners", "[]"), "gateway_listeners"
            ),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"invalid table settings in {META_KEY}: {exc!r}") from None


def _string_list(text: str, name: str) -> tuple[str, ...]:
    items = json.loads(text)
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"{name} must be a JSON list of strings")
    return tuple(items)


# ---------------------------------------------------------------------------------------
# Invalidation messages and events
# ---------------------------------------------------------------------------------------


def invalidation_message(label: str, gen: int) -> str:
    return f"{label} {gen}"


def parse_invalidation(data: bytes | str) -> tuple[str, int] | None:
    """``(label, gen)`` of an invalidation; None for anything else (e.g. a heartbeat)."""
    try:
        text = _text(data)
    except UnicodeDecodeError:
        return None  # not ours: the channel is open to anyone who can PUBLISH
    if text.startswith(HEARTBEAT_PREFIX):
        return None
    label, sep, rest = text.partition(" ")
    gen = rest.partition(" ")[0]
    if not label or not sep or not gen.isascii() or not gen.isdigit():
        return None
    return label, int(gen)


def invalidation_time_ms(data: bytes | str) -> int | None:
    """When Redis published an invalidation (``label gen millis``), in Unix milliseconds;
    None for messages without the optional third field."""
    parts = data.split()
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return int(parts[2])


def event_fields(
    kind: str,
    record: Sandbox,
    *,
    gen: int,
    port: int | None = None,
    url: str | None = None,
    now: float | None = None,
) -> dict[str, str]:
    """Fields of one event in the ``gw:events`` stream."""
    fields = {
        "type": kind,
        "sandboxId": record.id,
        "label": record.label,
        "gen": str(gen),
        "time": _iso_time(time.time() if now is None else now),
    }
    if port is not None:
        fields["port"] = str(port)
    if url is not None:
        fields["url"] = url
    return fields


def decode_event(entry_id: bytes | str, raw: RawHash) -> dict[str, object]:
    """An event as the CLI prints it: stream id, fields, ``gen`` and ``port`` as numbers."""
    event: dict[str, object] = {"id": _text(entry_id)}
    for key, value in raw.items():
        name, text = _text(key), _text(value)
        event[name] = int(text) if name in ("gen", "port") and text.isdigit() else text
    return event


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _time_text(value: float) -> str:
    return f"{value:.3f}"


def _iso_time(value: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(value))
    return f"{seconds}.{int(value % 1 * 1000):03d}Z"
