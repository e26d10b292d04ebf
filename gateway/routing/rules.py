"""Validation of writer input: sandbox ids, ports, addresses. Pure.

Every function here either returns a clean value or raises ``errors.RuleViolation``
whose ``code`` names the rule and whose message names the bad value, before anything is
written. The gateway applies ``is_gateway_listener`` again at dial time (defence in depth:
a control plane in another language may write the table directly).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

from gateway.errors import RuleViolation

MIN_PORT, MAX_PORT = 1024, 65535
MAX_LABEL_LENGTH = 57  # "{port}-" (6 octets at most) + label must fit one 63-octet DNS label
MAX_ID_LENGTH = 64
_ID = re.compile(r"[a-z0-9]+")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Endpoint = tuple[str, int]


def check_sandbox_id(sandbox_id: object, *, label_length: int) -> str:
    """Return the id if it is 1-64 lowercase letters and digits (<= 57 with whole-id labels)."""
    if not isinstance(sandbox_id, str) or not _ID.fullmatch(sandbox_id):
        raise RuleViolation(
            f"sandbox id {sandbox_id!r} must be lowercase letters and digits only",
            code="invalid_id",
        )
    limit = MAX_LABEL_LENGTH if label_length == 0 else MAX_ID_LENGTH
    if len(sandbox_id) > limit:
        raise RuleViolation(
            f"sandbox id {sandbox_id!r} is longer than {limit} characters", code="invalid_id"
        )
    return sandbox_id


def label_of(sandbox_id: str, *, label_length: int) -> str:
    """The public label: the first ``label_length`` characters (0: the whole id)."""
    return sandbox_id if label_length == 0 else sandbox_id[:label_length]


def parse_port(value: object) -> int:
    """A port that may be exposed: 1024-65535, given as an int or as decimal text.

    Below 1024 (0 included) is refused as reserved; anything else that is not 1024-65535
    (negative, too large, not a number, a leading zero, a bool) as invalid.
    """
    allowed = f"sandboxes may expose {MIN_PORT}-{MAX_PORT}"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise RuleViolation(
            f"port {value!r} is invalid: not a number; {allowed}", code="invalid_port"
        )
    text = str(value)
    if not text.isascii() or not text.isdigit():
        what = "negative" if _is_negative_integer(text) else "not a number"
        raise RuleViolation(f"port {value!r} is invalid: {what}; {allowed}", code="invalid_port")
    if len(text) > 1 and text.startswith("0"):
        raise RuleViolation(
            f"port {value!r} is invalid: it has a leading zero; {allowed}", code="invalid_port"
        )
    port = int(text)
    if port < MIN_PORT:
        raise RuleViolation(f"port {port} is reserved: {allowed}", code="reserved_port")
    if port > MAX_PORT:
        raise RuleViolation(f"port {port} is invalid: {allowed}", code="invalid_port")
    return port


def _is_negative_integer(text: str) -> bool:
    return text.startswith("-") and text[1:].isascii() and text[1:].isdigit()


def parse_port_list(value: object) -> frozenset[int]:
    """``allowPorts``: a list of ports, or comma-separated text (the CLI's form)."""
    items: Iterable[object]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise RuleViolation(f"allowPorts {value!r} is not a list of ports", code="invalid_port")
    return frozenset(parse_port(item) for item in items)


def check_address(address: object, *, networks: Sequence[IPNetwork]) -> str:
    """Return the canonical text of ``address`` if it is an IP literal inside ``networks``.

    Refusing everything else at write time keeps the route table from pointing at the
    gateway's host, Redis or a metadata service (SSRF).
    """
    if not isinstance(address, str):
        raise RuleViolation(f"address {address!r} is not an IP address", code="invalid_address")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise RuleViolation(
            f"address {address!r} is not an IPv4 or IPv6 literal", code="invalid_address"
        ) from None
    if ip.is_unspecified or ip.is_multicast or not any(ip in net for net in networks):
        allowed = ", ".join(str(n) for n in networks) or "none"
        raise RuleViolation(
            f"address {address} is outside the sandbox networks ({allowed})",
            code="address_not_allowed",
        )
    return str(ip)


def is_gateway_listener(address: str, port: int, listeners: Iterable[Endpoint]) -> bool:
    """True when ``address:port`` would reach one of the gateway's own listeners.

    A listener on a wildcard address (0.0.0.0 or ::) accepts on every local address, of
    which this pure check knows the loopback ones: any 127.0.0.0/8 or ::1 address on its port.
    """
    ip = ipaddress.ip_address(address)
    for host, listener_port in listeners:
        if listener_port != port:
            continue
        listener_ip = ipaddress.ip_address(host) if _is_ip(host) else None
        if listener_ip is None or listener_ip == ip:
            return True
        if listener_ip.is_unspecified and ip.is_loopback:
            return True
    return False


def check_not_listener(address: str, port: int, listeners: Iterable[Endpoint]) -> None:
    """Refuse a route that would loop back into the gateway."""
    if is_gateway_listener(address, port, listeners):
        raise RuleViolation(
            f"{address}:{port} is one of the gateway's own listeners", code="address_not_allowed"
        )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
