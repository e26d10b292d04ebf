"""Header policy between client, gateway and sandbox. Pure: imports neither aiohttp nor redis.

Headers are collections of ``(name, value)`` string pairs as taken from a message: names
in any case, duplicates allowed, order significant. Every function here returns new lists
and keeps the order of what passes through.

- Hop-by-hop headers, and every header a ``Connection`` header names, never cross the
  gateway (RFC 9110 section 7.6.1), in either direction.
- Forwarding headers (``X-Forwarded-*``, ``Forwarded``, client-IP look-alikes, the request
  id) are always rebuilt by the gateway from what it trusts, after the stripping above, so a
  client can neither spoof them nor delete them with ``Connection: X-Forwarded-For``.
- Framing (``Content-Length``/``Transfer-Encoding``) is the forwarder's business, not
  derived from these lists.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = [
    "GATEWAY_ERROR",
    "HOP_BY_HOP",
    "REQUEST_ID",
    "UNKNOWN_CLIENT",
    "WEBSOCKET",
    "ClientInfo",
    "HeaderPairs",
    "Network",
    "connection_listed",
    "downstream_response_headers",
    "is_valid_request_id",
    "new_request_id",
    "relayable_reason",
    "resolve_client",
    "strip_hop_by_hop",
    "upgrade_kind",
    "upstream_request_headers",
    "wants_html",
]

HeaderPairs: TypeAlias = Collection[tuple[str, str]]
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

REQUEST_ID: Final = "X-Request-Id"
GATEWAY_ERROR: Final = "X-Gateway-Error"
WEBSOCKET: Final = "websocket"
UNKNOWN_CLIENT: Final = "unknown"  # RFC 7239's name for a peer that has no IP address

HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
_CONNECTION_HEADERS = frozenset({"connection", "proxy-connection"})
_NOTHING: frozenset[str] = frozenset()

# Headers through which a client could claim an identity, an origin or a request id. The
# gateway owns them; whatever the client sent is dropped and the gateway's own are added.
# Besides the ones it sets, this covers the client-IP look-alikes that frameworks and CDNs
# read (reliability-catalogue XFF-06) and the alternative host headers (HOST-09).
_FORWARDING_PREFIX = "x-forwarded-"
_FORWARDING = frozenset(
    {
        "forwarded",
        "x-real-ip",
        "x-request-id",
        "true-client-ip",
        "cf-connecting-ip",
        "x-client-ip",
        "client-ip",
        "x-cluster-client-ip",
        "x-original-forwarded-for",
        "x-original-host",
        "x-host",
    }
)
_NOT_FORWARDED_UPSTREAM = HOP_BY_HOP | _FORWARDING | {"host"}

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_QVALUE_RE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")
_DEFAULT_PORT = {"http": "80", "https": "443"}
_MAX_ADDRESS_TEXT = 64
_PROTOS = frozenset(_DEFAULT_PORT)


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Who the client is, as far as the gateway can tell (see ``resolve_client``).

    Attributes:
        ip: the client address (normalised text, or ``"unknown"`` for a non-IP peer).
        proto: the scheme the client used, ``"http"`` or ``"https"``.
        trusted_peer: the TCP peer is in a trusted proxy network.
        forwarded_for: the X-Forwarded-For chain to send upstream: ``ip`` first, then
            each trusted hop after it, ending with the TCP peer. Empty means ``(ip,)``.
    """

    ip: str
    proto: str
    trusted_peer: bool
    forwarded_for: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------
# Hop-by-hop.
# --------------------------------------------------------------------------------------


def first_value(headers: HeaderPairs, name: str) -> str | None:
    """The first value of header ``name`` (lowercase), as aiohttp's ``headers.get``."""
    return next((v for n, v in headers if n.lower() == name), None)


def connection_listed(headers: HeaderPairs) -> frozenset[str]:
    """The lowercase header names listed in every ``Connection``/``Proxy-Connection`` value.

    Values are comma-separated; tokens are trimmed and empty ones dropped. Options such as
    ``close`` or ``upgrade`` appear too: they name no header, so dropping them is harmless.
    """
    listed: set[str] | None = None
    for name, value in headers:
        if name.lower() in _CONNECTION_HEADERS:
            for item in value.lower().split(","):
                token = item.strip()
                if token:
                    if listed is None:
                        listed = set()
                    listed.add(token)
    return frozenset(listed) if listed else _NOTHING


def strip_hop_by_hop(headers: HeaderPairs) -> list[tuple[str, str]]:
    """``headers`` without HOP_BY_HOP ones and without every Connection-listed name.

    Nothing is exempt from Connection listing, ``Host`` included: callers that need a
    Host set their own (``upstream_request_headers`` does).
    """
    listed = connection_listed(headers)
    return [
        (name, value)
        for name, value in headers
        if (key := name.lower()) not in HOP_BY_HOP and key not in listed
    ]


def downstream_response_headers(headers: HeaderPairs, *, public_host: str) -> list[tuple[str, str]]:
    """The sandbox's response headers to send to the client for a request to ``public_host``.

    - Hop-by-hop and Connection-listed headers are removed (RFC 9110 section 7.6.1).
    - ``X-Gateway-Error`` is removed: a client may trust that it comes from the gateway
      (reliability-catalogue HDR-06).
    - ``Set-Cookie`` keeps its ``Domain`` attribute only when it names ``public_host``
      itself (any case, a leading or trailing dot and the port ignored); any other
      ``Domain`` (the parent ``box.runra.dev``, another sandbox, ``runra.dev``) is removed,
      which makes the cookie host-only (RFC 6265 section 5.3 step 6), so a sandbox can
      never set a cookie that another sandbox or the platform receives (catalogue TEN-04,
      UPR-13). Rewriting rather than dropping keeps the app's session working.

    Everything else is untouched and in order, duplicates (``Set-Cookie``) included. An
    empty ``public_host`` removes every ``Domain`` attribute.
    """
    host: str | None = None  # worked out at the first Set-Cookie (most answers have none)
    out = []
    for name, value in strip_hop_by_hop(headers):
        key = name.lower()
        if key == _GATEWAY_ERROR_KEY:
            continue
        if key == "set-cookie":
            host = _canonical_cookie_host(public_host) if host is None else host
            out.append((name, _scope_cookie(value, host)))
        else:
            out.append((name, value))
    return out


_GATEWAY_ERROR_KEY = "x-gateway-error"


def _canonical_cookie_host(host: str) -> str:
    """``host`` lowercased, without a port, surrounding dots or whitespace."""
    host = host.strip().lower()
    name, colon, _port = host.rpartition(":")
    if colon and not host.endswith("]"):
        host = name
    return host.strip(".")


def _scope_cookie(value: str, host: str) -> str:
    """A Set-Cookie value without any ``Domain`` attribute that is not exactly ``host``."""
    if "domain" not in value.lower():
        return value
    pair, *attributes = value.split(";")
    kept = [pair]
    for attribute in attributes:
        name, _, domain = attribute.partition("=")
        is_domain = name.strip().lower() == "domain"
        if is_domain and (not host or _canonical_cookie_host(domain) != host):
            continue
        kept.append(attribute)
    return ";".join(kept)


# --------------------------------------------------------------------------------------
# Who is the client.
# --------------------------------------------------------------------------------------


def resolve_client(
    peer_ip: str,
    headers: HeaderPairs,
    *,
    trusted_networks: Sequence[Network],
    listener_proto: str = "http",
) -> ClientInfo:
    """Decide the client's address and scheme from the TCP peer and forwarding headers.

    An untrusted peer is the client; its X-Forwarded-* are ignored and the proto is
    ``listener_proto``. A trusted peer (a load balancer) is believed: X-Forwarded-For
    (every value, joined in order) is walked from the right, skipping trusted addresses;
    the first untrusted address is the client (all trusted: the leftmost). An entry that
    is not an IP address (bracketed IPv6 accepted) stops the walk at the last good one,
    the peer if none. The proto is the last X-Forwarded-Proto item if it is ``http`` or
    ``https``, else ``listener_proto``.

    IPv4-mapped IPv6 addresses (dual-stack sockets) are reported as IPv4, and a peer that
    is not an IP address at all (a unix socket) as ``"unknown"``, never trusted.
    """
    peer = _parse_ip(peer_ip)
    if peer is None or not _is_trusted(peer[0], trusted_networks):
        ip = UNKNOWN_CLIENT if peer is None else peer[1]
        return ClientInfo(ip=ip, proto=listener_proto, trusted_peer=False, forwarded_for=(ip,))
    chain = _trusted_chain(peer[1], headers, trusted_networks)
    return ClientInfo(
        ip=chain[0],
        proto=_forwarded_proto(headers, listener_proto),
        trusted_peer=True,
        forwarded_for=chain,
    )


def _trusted_chain(
    peer: str, headers: HeaderPairs, trusted_networks: Sequence[Network]
) -> tuple[str, ...]:
    """The X-Forwarded-For hops the gateway believes, client first and ``peer`` last."""
    entries = ",".join(v for n, v in headers if n.lower() == "x-forwarded-for").split(",")
    hops = [peer]
    for entry in reversed(entries):
        parsed = _parse_ip(entry)
        if parsed is None:
            break
        hops.append(parsed[1])
        if not _is_trusted(parsed[0], trusted_networks):
            break
    hops.reverse()
    return tuple(hops)


def _forwarded_proto(headers: HeaderPairs, default: str) -> str:
    """The last X-Forwarded-Proto item if it is http or https, else ``default``."""
    value: str | None = None
    for name, v in headers:
        if name.lower() == "x-forwarded-proto":
            value = v
    if value is None:
        return default
    proto = value.rpartition(",")[2].strip().lower()
    return proto if proto in _PROTOS else default


def _parse_ip(text: str) -> tuple[_Address, str] | None:
    """The IP address in ``text`` (optionally ``[bracketed]``) and its normalised text.

    IPv4-mapped IPv6 addresses come back as IPv4. None if ``text`` is not an address
    (anything longer than 64 characters is not: a bracketed, scoped IPv6 address fits).
    """
    return _parse_short_ip(text) if len(text) <= _MAX_ADDRESS_TEXT else None


# Parsing an address costs microseconds and a keep-alive client sends many requests from
# one peer, so results are cached; short keys keep the cache small whatever clients send.
@functools.lru_cache(maxsize=4096)
def _parse_short_ip(text: str) -> tuple[_Address, str] | None:
    """``_parse_ip`` for texts of at most 64 characters."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, str(address)


def _is_trusted(address: _Address, trusted_networks: Sequence[Network]) -> bool:
    """Whether ``address`` is in one of ``trusted_networks`` (mixed versions never match)."""
    return any(address in network for network in trusted_networks)


# --------------------------------------------------------------------------------------
# Request headers to the sandbox.
# --------------------------------------------------------------------------------------


def upstream_request_headers(
    headers: HeaderPairs,
    *,
    client: ClientInfo,
    public_host: str,
    request_id: str | None,
    host_rewrite_port: int | None = None,
) -> list[tuple[str, str]]:
    """The headers to send to the sandbox for a client request with ``headers``.

    Dropped: hop-by-hop and Connection-listed headers, Host, and every forwarding header
    the client sent (X-Forwarded-*, Forwarded, X-Real-IP, X-Request-Id, client-IP
    look-alikes), also when spelled with ``_`` for ``-`` (servers that map ``_`` to ``-``
    would read them as the real thing). ``Content-Length`` loses leading zeros. The rest
    passes in order, then these follow:

    - ``Host``: ``public_host``, or ``localhost:{host_rewrite_port}`` when given;
    - ``X-Forwarded-For``: ``client.forwarded_for`` (just the client if untrusted);
    - ``X-Forwarded-Proto``: ``client.proto``; ``X-Forwarded-Host``: ``public_host``;
    - ``X-Forwarded-Port``: the port in ``public_host``, else 443 (https) or 80 (http);
    - ``Forwarded``: ``for=...;host=...;proto=...`` (RFC 7239);
    - ``X-Request-Id``: ``request_id`` (the caller decides whether to adopt a trusted
      incoming one, see ``trusted_request_id``); None leaves it for the caller to add.
    """
    listed = connection_listed(headers)
    out = [
        # Leading zeros go: a backend reading "0200" as octal would frame 128 bytes where
        # the gateway sent 200 (catalogue SMUG-05). The parser already refused non-digits.
        (name, value.lstrip("0") or "0") if key == "content-length" else (name, value)
        for name, value in headers
        if (key := name.lower()) not in _NOT_FORWARDED_UPSTREAM
        and key not in listed
        and not key.startswith(_FORWARDING_PREFIX)
        and ("_" not in key or not _is_underscore_alias(key))
    ]
    host = public_host if host_rewrite_port is None else f"localhost:{host_rewrite_port}"
    chain = ", ".join(client.forwarded_for) if client.forwarded_for else client.ip
    out += [
        ("Host", host),
        ("X-Forwarded-For", chain),
        ("X-Forwarded-Proto", client.proto),
        ("X-Forwarded-Host", public_host),
        ("X-Forwarded-Port", _port_of(public_host, client.proto)),
        ("Forwarded", _forwarded(client, public_host)),
    ]
    if request_id is not None:
        out.append((REQUEST_ID, request_id))
    return out


def _is_underscore_alias(key: str) -> bool:
    """Whether lowercase ``key``, with ``_`` read as ``-``, names a forwarding header."""
    dashed = key.replace("_", "-")
    return dashed in _FORWARDING or dashed.startswith(_FORWARDING_PREFIX)


def _port_of(public_host: str, proto: str) -> str:
    """The port written in ``public_host``, else the default port of ``proto``."""
    _, colon, port = public_host.rpartition(":")
    if colon and port.isdigit() and not public_host.endswith("]"):
        return port
    return _DEFAULT_PORT.get(proto, "80")


def _forwarded(client: ClientInfo, public_host: str) -> str:
    """An RFC 7239 ``Forwarded`` element for ``client`` reaching ``public_host``."""
    # An IPv6 node must be quoted and bracketed (RFC 7239 section 6); only IPv6 has ":".
    node = f'"[{client.ip}]"' if ":" in client.ip else client.ip
    return f"for={node};host={_token_or_quoted(public_host)};proto={client.proto}"


def _token_or_quoted(value: str) -> str:
    """``value`` as an RFC 9110 token if it is one, else as a quoted-string."""
    if _TOKEN_RE.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


# --------------------------------------------------------------------------------------
# Upgrades, request ids, content negotiation.
# --------------------------------------------------------------------------------------


def upgrade_kind(headers: HeaderPairs, *, method: str) -> str | None:
    """What protocol the request asks to upgrade to, for the caller to accept or refuse.

    Returns None when there is no (non-empty) Upgrade header or Connection does not list
    ``upgrade``: then it is a plain request (Upgrade is stripped as hop-by-hop). Returns
    ``"websocket"`` (``WEBSOCKET``) for ``Upgrade: websocket`` (any case) on a GET.
    Anything else is the lowercased Upgrade value (e.g. ``"h2c"``), and a WebSocket
    upgrade on another method is ``"websocket over {METHOD}"``: the caller answers
    those with UnsupportedUpgrade.
    """
    values = [v.strip() for n, v in headers if n.lower() == "upgrade"]
    value = ", ".join(v for v in values if v)
    if not value or "upgrade" not in connection_listed(headers):
        return None
    # Lowercase ASCII only: str.lower() maps the Kelvin sign to "k", so "websoc\u212aet"
    # would pass as "websocket" (catalogue SMUG-24).
    value = value.lower() if value.isascii() else value
    if value != WEBSOCKET:
        return value
    return WEBSOCKET if method == "GET" else f"{WEBSOCKET} over {method}"


_REASON_RE = re.compile(r"[\t\x20-\x7e]{0,512}")


def relayable_reason(reason: str) -> str | None:
    """A sandbox's reason phrase if safe to copy (tab, space and visible ASCII, at most
    512 characters), else None for the standard phrase. A control byte would otherwise
    make aiohttp's writer refuse the head and answer 500 (catalogue UPR-05).
    """
    return reason if reason and _REASON_RE.fullmatch(reason) else None


class _RandomIds:
    """Request ids cut from one ``os.urandom`` read of many (a syscall per request shows
    in the small-request profile); every id is still 64 fresh random bits."""

    _BATCH = 512

    def __init__(self) -> None:
        self._ids: list[str] = []

    def next(self) -> str:
        if not self._ids:
            text = os.urandom(8 * self._BATCH).hex()
            self._ids = [text[i : i + 16] for i in range(0, len(text), 16)]
        return self._ids.pop()


_random_ids: Final = _RandomIds()


def new_request_id() -> str:
    """A fresh request id: 16 lowercase hex characters (64 random bits)."""
    return _random_ids.next()  # (a method: compiled, calling an instance is a generic call)


def is_valid_request_id(value: str) -> bool:
    """Whether ``value`` is safe to adopt as a request id: 1-128 of ``[A-Za-z0-9._-]``."""
    return _REQUEST_ID_RE.fullmatch(value) is not None


def trusted_request_id(
    headers: HeaderPairs, peer_ip: str, *, trusted_networks: Sequence[Network]
) -> str | None:
    """A trusted proxy's well-formed X-Request-Id, to keep (one id end to end); None for
    any other client's, which is ignored (the caller mints ``new_request_id``)."""
    if trusted_networks:
        incoming = first_value(headers, "x-request-id")
        if incoming is not None and is_valid_request_id(incoming):
            peer = _parse_ip(peer_ip)
            if peer is not None and _is_trusted(peer[0], trusted_networks):
                return incoming
    return None


def wants_html(headers: HeaderPairs) -> bool:
    """Whether an error should be an HTML page rather than JSON.

    ``Sec-Fetch-Mode`` decides when present: only ``navigate`` (a page or frame load) is
    shown HTML; ``cors``/``no-cors``/``same-origin`` mean script or subresource reads.
    Without it, True only when Accept lists ``text/html`` with q > 0 ranked at least as
    high as ``application/json`` (or what covers it) and ``*/*``. So curl's ``*/*`` and
    fetch/XHR get JSON.
    """
    mode: str | None = None
    accept: list[str] = []
    for name, value in headers:
        key = name.lower()
        if key == "sec-fetch-mode":
            mode = value.strip().lower()
        elif key == "accept":
            accept.append(value)
    if mode is not None:
        return mode == "navigate"
    return _accept_prefers_html(",".join(accept))


def _accept_prefers_html(accept: str) -> bool:
    """Whether an Accept value ranks text/html (listed, q > 0) >= JSON and ``*/*``."""
    weights: dict[str, float] = {}
    for item in accept.split(","):
        media, _, params = item.partition(";")
        media = media.strip().lower()
        if media:
            weights[media] = max(weights.get(media, 0.0), _quality(params))
    html = weights.get("text/html", 0.0)
    anything = weights.get("*/*", 0.0)
    # The most specific range that matches application/json gives its weight.
    json = weights.get("application/json", weights.get("application/*", anything))
    return html > 0 and html >= json and html >= anything


def _quality(params: str) -> float:
    """The ``q`` weight in a media range's parameters: 1 if absent, 0 if malformed."""
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            value = value.strip()
            return float(value) if _QVALUE_RE.fullmatch(value) else 0.0
    return 1.0
