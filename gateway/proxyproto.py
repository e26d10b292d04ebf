"""PROXY protocol v1 and v2 headers (HAProxy's spec), parsed from bytes. Pure.

``parse(buffer)`` answers one of: ``NEED_MORE`` (the header is not complete yet), a
``ProxyHeader`` plus how many bytes it took, or raises ``ProxyProtocolError``. The
listener requires the header on every connection when the feature is on, and believes
it only from trusted peers (see gateway/listener.py): auto-detection would let any
client claim any address.

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX_BYTES = 107  # the spec's bound for a v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_BYTES = 16
V2_MAX_BYTES = V2_HEADER_BYTES + 65535

_FAMILY_V2 = {0x11: 4, 0x21: 16}  # TCP over IPv4 / IPv6: address length


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header; the connection must be closed."""


class NeedMore:
    """The header is incomplete: read more bytes and call ``parse`` again."""


NEED_MORE = NeedMore()


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """The client as the load balancer saw it; ``source`` is None for LOCAL/UNKNOWN
    (health checks of the balancer itself: keep the real peer)."""

    source: tuple[str, int] | None
    destination: tuple[str, int] | None


def parse(buffer: bytes) -> tuple[ProxyHeader, int] | NeedMore:
    """Parse the header at the start of ``buffer``; see the module docstring."""
    if buffer.startswith(V2_SIGNATURE[: len(buffer)]) and len(buffer) < len(V2_SIGNATURE):
        return NEED_MORE
    if buffer.startswith(V2_SIGNATURE):
        return _parse_v2(buffer)
    if V1_PREFIX.startswith(buffer[: len(V1_PREFIX)]) and len(buffer) < len(V1_PREFIX):
        return NEED_MORE
    if buffer.startswith(V1_PREFIX):
        return _parse_v1(buffer)
    raise ProxyProtocolError("the connection did not start with a PROXY protocol header")


def _parse_v1(buffer: bytes) -> tuple[ProxyHeader, int] | NeedMore:
    end = buffer.find(b"\r\n", 0, V1_MAX_BYTES)
    if end < 0:
        if len(buffer) >= V1_MAX_BYTES:
            raise ProxyProtocolError("PROXY v1 line longer than 107 bytes")
        return NEED_MORE
    parts = buffer[:end].decode("ascii", "replace").split(" ")
    if parts[1:2] == ["UNKNOWN"]:
        return ProxyHeader(None, None), end + 2
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("malformed PROXY v1 line")
    version = 4 if parts[1] == "TCP4" else 6
    source = (_address(parts[2], version), _port(parts[4]))
    destination = (_address(parts[3], version), _port(parts[5]))
    return ProxyHeader(source, destination), end + 2


def _parse_v2(buffer: bytes) -> tuple[ProxyHeader, int] | NeedMore:
    if len(buffer) < V2_HEADER_BYTES:
        return NEED_MORE
    version_command, family, length = struct.unpack("!BBH", buffer[12:16])
    if version_command >> 4 != 2:
        raise ProxyProtocolError("PROXY v2 header with an unknown version")
    total = V2_HEADER_BYTES + length
    if len(buffer) < total:
        return NEED_MORE
    command = version_command & 0x0F
    if command == 0:  # LOCAL: the balancer's own connection (health check)
        return ProxyHeader(None, None), total
    if command != 1:
        raise ProxyProtocolError("PROXY v2 header with an unknown command")
    size = _FAMILY_V2.get(family)
    if size is None:  # UNSPEC or UNIX: nothing we can use as a client address
        return ProxyHeader(None, None), total
    if length < 2 * size + 4:
        raise ProxyProtocolError("PROXY v2 address block too short")
    body = buffer[V2_HEADER_BYTES:total]
    src = ipaddress.ip_address(body[:size])
    dst = ipaddress.ip_address(body[size : 2 * size])
    src_port, dst_port = struct.unpack("!HH", body[2 * size : 2 * size + 4])
    return ProxyHeader((str(src), src_port), (str(dst), dst_port)), total


def _address(text: str, version: int) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"PROXY v1: {text!r} is not an address") from None
    if ip.version != version:
        raise ProxyProtocolError("PROXY v1: address family does not match")
    return str(ip)


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise ProxyProtocolError(f"PROXY v1: {text!r} is not a port")
    return int(text)
