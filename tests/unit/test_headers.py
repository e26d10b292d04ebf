"""Unit tests for gateway.headers: hop-by-hop, forwarding, upgrades, ids, negotiation."""

from __future__ import annotations

import ipaddress
import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.headers import (
    GATEWAY_ERROR,
    HOP_BY_HOP,
    REQUEST_ID,
    ClientInfo,
    Network,
    connection_listed,
    downstream_response_headers,
    is_valid_request_id,
    new_request_id,
    relayable_reason,
    resolve_client,
    strip_hop_by_hop,
    upgrade_kind,
    upstream_request_headers,
    wants_html,
)

Pairs = list[tuple[str, str]]

LB = ipaddress.ip_network("10.0.0.0/8")
LB6 = ipaddress.ip_network("fd00::/8")
TRUSTED: tuple[Network, ...] = (LB, LB6)
PUBLIC_HOST = "3000-abc123.box.runra.dev"
UNTRUSTED_CLIENT = ClientInfo(ip="203.0.113.7", proto="https", trusted_peer=False)


def names(headers: Pairs) -> list[str]:
    """The lowercase header names of ``headers``, in order."""
    return [name.lower() for name, _ in headers]


def values(headers: Pairs, name: str) -> list[str]:
    """Every value of header ``name`` (any case) in ``headers``, in order."""
    return [v for n, v in headers if n.lower() == name.lower()]


def upstream(headers: Pairs, client: ClientInfo = UNTRUSTED_CLIENT, **kw: int | None) -> Pairs:
    """upstream_request_headers with the test defaults."""
    return upstream_request_headers(
        headers,
        client=client,
        public_host=PUBLIC_HOST,
        request_id="req-1",
        host_rewrite_port=kw.get("host_rewrite_port"),
    )


# --------------------------------------------------------------------------------------
# Hop-by-hop and Connection-listed headers.
# --------------------------------------------------------------------------------------


def test_hop_by_hop_set() -> None:
    """HOP_BY_HOP is the lowercase RFC 9110 list plus the proxy ones."""
    expected = frozenset(
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
    assert expected == HOP_BY_HOP


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], frozenset()),
        ([("Accept", "*/*")], frozenset()),
        ([("Connection", "close")], frozenset({"close"})),
        ([("Connection", " Keep-Alive , X-Foo ,, ")], frozenset({"keep-alive", "x-foo"})),
        ([("connection", "a"), ("CONNECTION", "b, c")], frozenset({"a", "b", "c"})),
        ([("Proxy-Connection", "X-Bar")], frozenset({"x-bar"})),
        ([("Connection", "")], frozenset()),
        ([("Connection", " , ,")], frozenset()),
    ],
    ids=[
        "none",
        "no-connection",
        "close",
        "trim-lower-drop-empty",
        "several-headers",
        "proxy-connection",
        "empty-value",
        "only-commas",
    ],
)
def test_connection_listed(headers: Pairs, expected: frozenset[str]) -> None:
    """Tokens of every Connection/Proxy-Connection value, trimmed, lowercased, non-empty."""
    assert connection_listed(headers) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            [
                ("Connection", "keep-alive, X-Foo"),
                ("X-Foo", "1"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Connection", "keep-alive"),
                ("TE", "trailers"),
                ("Trailer", "X"),
                ("Transfer-Encoding", "chunked"),
                ("Proxy-Authorization", "Basic eDp5"),
                ("Proxy-Authenticate", "Basic"),
                ("Upgrade", "h2c"),
                ("Accept", "*/*"),
            ],
            [("Accept", "*/*")],
        ),
        (
            [("A", "1"), ("Connection", "b"), ("B", "2"), ("C", "3"), ("a", "4")],
            [("A", "1"), ("C", "3"), ("a", "4")],
        ),
        ([("Connection", "Host"), ("Host", "x")], []),
        ([("X-Foo", "1"), ("x-foo", "2"), ("CONNECTION", "X-FOO")], []),
    ],
    ids=["every-hop-by-hop", "order-and-duplicates-kept", "host-can-be-listed", "any-case"],
)
def test_strip_hop_by_hop(headers: Pairs, expected: Pairs) -> None:
    """Hop-by-hop and Connection-listed headers go; the rest stays in order, as sent."""
    assert strip_hop_by_hop(headers) == expected


def test_downstream_response_headers_keep_set_cookie_duplicates() -> None:
    """Response headers lose hop-by-hop ones only; Set-Cookie duplicates and order stay."""
    response = [
        ("Content-Type", "text/html"),
        ("Set-Cookie", "a=1; Path=/"),
        ("Connection", "close, X-Secret"),
        ("X-Secret", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Set-Cookie", "b=2; Path=/"),
        ("Access-Control-Allow-Origin", "*"),
        ("Set-Cookie", "a=3; Path=/x"),
    ]
    assert downstream_response_headers(response, public_host="3000-abc.box.test") == [
        ("Content-Type", "text/html"),
        ("Set-Cookie", "a=1; Path=/"),
        ("Set-Cookie", "b=2; Path=/"),
        ("Access-Control-Allow-Origin", "*"),
        ("Set-Cookie", "a=3; Path=/x"),
    ]


@pytest.mark.parametrize(
    ("cookie", "expected"),
    [
        ("s=1; Domain=box.test; Path=/", "s=1; Path=/"),
        ("s=1; Domain=.box.test", "s=1"),
        ("s=1; domain=test; Secure", "s=1; Secure"),
        ("s=1;Domain=3000-other.box.test", "s=1"),
        ("s=1; Domain=evil.test; Domain=3000-abc.box.test", "s=1; Domain=3000-abc.box.test"),
        ("s=1; Domain=3000-ABC.box.test.", "s=1; Domain=3000-ABC.box.test."),
        ("s=1; Domain=3000-abc.box.test", "s=1; Domain=3000-abc.box.test"),
        ("__Host-x=1; Domain=box.test; Path=/; Secure", "__Host-x=1; Path=/; Secure"),
        ("s=domain; Path=/", "s=domain; Path=/"),
        ("s=1; Path=/", "s=1; Path=/"),
    ],
)
def test_set_cookie_domain_scoped_to_the_public_host(cookie: str, expected: str) -> None:
    """A Set-Cookie Domain other than the request's own host is removed (host-only)."""
    got = downstream_response_headers([("Set-Cookie", cookie)], public_host="3000-abc.box.test:80")
    assert got == [("Set-Cookie", expected)]


def test_set_cookie_without_public_host_loses_every_domain() -> None:
    """With no public host known, no Domain attribute survives."""
    got = downstream_response_headers([("Set-Cookie", "s=1; Domain=a.test")], public_host="")
    assert got == [("Set-Cookie", "s=1")]


def test_sandbox_gateway_error_header_is_dropped() -> None:
    """A sandbox cannot send X-Gateway-Error (any case): only the gateway's own is seen."""
    response = [("X-Gateway-Error", "sandbox_paused"), ("x-gateway-error", "x"), ("A", "1")]
    assert downstream_response_headers(response, public_host="h") == [("A", "1")]


# --------------------------------------------------------------------------------------
# resolve_client.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        (
            "203.0.113.7",
            [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Proto", "https")],
            ClientInfo("203.0.113.7", "http", False, ("203.0.113.7",)),
        ),
        (
            "203.0.113.7",
            [("Forwarded", "for=6.6.6.6;proto=https")],
            ClientInfo("203.0.113.7", "http", False, ("203.0.113.7",)),
        ),
        (
            "::ffff:203.0.113.7",
            [],
            ClientInfo("203.0.113.7", "http", False, ("203.0.113.7",)),
        ),
        (
            "::ffff:10.0.0.1",
            [("X-Forwarded-For", "198.51.100.1")],
            ClientInfo("198.51.100.1", "http", True, ("198.51.100.1", "10.0.0.1")),
        ),
        (
            "2001:DB8::1",
            [],
            ClientInfo("2001:db8::1", "http", False, ("2001:db8::1",)),
        ),
        ("", [], ClientInfo("unknown", "http", False, ("unknown",))),
        ("/run/gw.sock", [], ClientInfo("unknown", "http", False, ("unknown",))),
    ],
    ids=[
        "untrusted-xff-ignored",
        "untrusted-forwarded-ignored",
        "ipv4-mapped-normalised",
        "ipv4-mapped-trusted",
        "ipv6-normalised",
        "empty-peer",
        "unix-socket-peer",
    ],
)
def test_resolve_client_peer(peer: str, headers: Pairs, expected: ClientInfo) -> None:
    """An untrusted peer is the client, whatever it claims; addresses are normalised."""
    assert resolve_client(peer, headers, trusted_networks=TRUSTED) == expected


@pytest.mark.parametrize(
    ("xff", "client", "chain"),
    [
        ([], "10.0.0.1", ("10.0.0.1",)),
        (["198.51.100.1"], "198.51.100.1", ("198.51.100.1", "10.0.0.1")),
        (["6.6.6.6, 198.51.100.1"], "198.51.100.1", ("198.51.100.1", "10.0.0.1")),
        (
            ["6.6.6.6, 198.51.100.1, 10.1.2.3"],
            "198.51.100.1",
            ("198.51.100.1", "10.1.2.3", "10.0.0.1"),
        ),
        (["6.6.6.6", "198.51.100.1"], "198.51.100.1", ("198.51.100.1", "10.0.0.1")),
        (["10.9.9.9, 10.8.8.8"], "10.9.9.9", ("10.9.9.9", "10.8.8.8", "10.0.0.1")),
        (["198.51.100.1, garbage, 10.1.2.3"], "10.1.2.3", ("10.1.2.3", "10.0.0.1")),
        (["198.51.100.1, garbage"], "10.0.0.1", ("10.0.0.1",)),
        (["198.51.100.1,,"], "10.0.0.1", ("10.0.0.1",)),
        (["1.2.3.4:5678"], "10.0.0.1", ("10.0.0.1",)),
        (["unknown"], "10.0.0.1", ("10.0.0.1",)),
        (["[2001:db8::1]"], "2001:db8::1", ("2001:db8::1", "10.0.0.1")),
        (["2001:DB8::1, fd00::5"], "2001:db8::1", ("2001:db8::1", "fd00::5", "10.0.0.1")),
        ([" 198.51.100.1 "], "198.51.100.1", ("198.51.100.1", "10.0.0.1")),
        (["\u0661.2.3.4"], "10.0.0.1", ("10.0.0.1",)),
        (["fe80::1%eth0"], "fe80::1%eth0", ("fe80::1%eth0", "10.0.0.1")),
        ([" " * 70 + "198.51.100.1"], "10.0.0.1", ("10.0.0.1",)),
    ],
    ids=[
        "no-xff",
        "one-hop",
        "spoofed-prefix-ignored",
        "trusted-hops-skipped",
        "several-headers-joined",
        "all-trusted-leftmost",
        "garbage-stops-at-last-good",
        "garbage-rightmost-is-peer",
        "empty-entries",
        "ip-with-port-unparsable",
        "unknown-unparsable",
        "bracketed-ipv6",
        "ipv6-normalised-and-trusted-v6-skipped",
        "whitespace",
        "non-ascii-digit",
        "scoped-ipv6",
        "overlong-entry",
    ],
)
def test_resolve_client_trusted_peer_walks_xff_from_the_right(
    xff: list[str], client: str, chain: tuple[str, ...]
) -> None:
    """Behind a trusted peer the client is the rightmost untrusted X-Forwarded-For entry."""
    headers = [("X-Forwarded-For", v) for v in xff]
    info = resolve_client("10.0.0.1", headers, trusted_networks=TRUSTED)
    assert (info.ip, info.trusted_peer, info.forwarded_for) == (client, True, chain)


@pytest.mark.parametrize(
    ("peer", "headers", "listener_proto", "proto"),
    [
        ("10.0.0.1", [("X-Forwarded-Proto", "https")], "http", "https"),
        ("10.0.0.1", [("X-Forwarded-Proto", "HTTPS ")], "http", "https"),
        ("10.0.0.1", [("X-Forwarded-Proto", "http")], "https", "http"),
        (
            "10.0.0.1",
            [("X-Forwarded-Proto", "https"), ("x-forwarded-proto", "http")],
            "https",
            "http",
        ),
        ("10.0.0.1", [("X-Forwarded-Proto", "http, https")], "http", "https"),
        ("10.0.0.1", [("X-Forwarded-Proto", "wss")], "http", "http"),
        ("10.0.0.1", [("X-Forwarded-Proto", "")], "https", "https"),
        ("10.0.0.1", [], "https", "https"),
        ("203.0.113.7", [("X-Forwarded-Proto", "https")], "http", "http"),
    ],
    ids=[
        "trusted-https",
        "case-and-space",
        "trusted-http-over-https-listener",
        "last-header-wins",
        "last-item-wins",
        "unknown-value",
        "empty-value",
        "absent",
        "untrusted-ignored",
    ],
)
def test_resolve_client_proto(peer: str, headers: Pairs, listener_proto: str, proto: str) -> None:
    """The proto is the trusted peer's last X-Forwarded-Proto if http/https, else the listener's."""
    info = resolve_client(peer, headers, trusted_networks=TRUSTED, listener_proto=listener_proto)
    assert info.proto == proto


def test_no_trusted_networks_trusts_nobody() -> None:
    """With the default of no trusted networks, loopback's X-Forwarded-For is ignored too."""
    info = resolve_client("127.0.0.1", [("X-Forwarded-For", "6.6.6.6")], trusted_networks=())
    assert (info.ip, info.trusted_peer) == ("127.0.0.1", False)


@given(xff=st.lists(st.text(max_size=40), max_size=5), peer=st.text(max_size=40))
def test_resolve_client_never_raises(xff: list[str], peer: str) -> None:
    """Arbitrary peer text and X-Forwarded-For values give a ClientInfo, never an exception."""
    headers = [("X-Forwarded-For", v) for v in xff]
    for candidate in (peer, "10.0.0.1"):
        info = resolve_client(candidate, headers, trusted_networks=TRUSTED)
        assert info.forwarded_for[0] == info.ip


# --------------------------------------------------------------------------------------
# upstream_request_headers.
# --------------------------------------------------------------------------------------


def test_upstream_headers_shape_and_order() -> None:
    """Passed-through headers come first in order, then Host, then the forwarding headers."""
    headers = [
        ("Host", PUBLIC_HOST),
        ("User-Agent", "curl/8"),
        ("Cookie", "a=1"),
        ("Accept", "*/*"),
        ("Cookie", "b=2"),
    ]
    assert upstream(headers) == [
        ("User-Agent", "curl/8"),
        ("Cookie", "a=1"),
        ("Accept", "*/*"),
        ("Cookie", "b=2"),
        ("Host", PUBLIC_HOST),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", PUBLIC_HOST),
        ("X-Forwarded-Port", "443"),
        ("Forwarded", f"for=203.0.113.7;host={PUBLIC_HOST};proto=https"),
        ("X-Request-Id", "req-1"),
    ]


@pytest.mark.parametrize(
    "name",
    [
        "X-Forwarded-For",
        "x-forwarded-proto",
        "X-FORWARDED-HOST",
        "X-Forwarded-Port",
        "X-Forwarded-Prefix",
        "X-Forwarded-Server",
        "Forwarded",
        "X-Real-IP",
        "X-Request-Id",
        "True-Client-IP",
        "CF-Connecting-IP",
        "X-Client-IP",
        "X-Original-Host",
        "X_Forwarded_For",
        "X-Forwarded_For",
        "x_real_ip",
        "X_Request_Id",
        "X_Forwarded_Prefix",
        "Connection",
        "Keep-Alive",
        "TE",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Authorization",
    ],
    ids=lambda name: name,
)
def test_upstream_drops_spoofable_and_hop_by_hop_headers(name: str) -> None:
    """Client forwarding headers (also underscore spellings) and hop-by-hop never pass."""
    out = upstream([(name, "6.6.6.6"), ("X-Keep", "1")])
    passed = out[: out.index(("Host", PUBLIC_HOST))]
    assert passed == [("X-Keep", "1")]
    assert all(v != "6.6.6.6" for _, v in out)


def test_underscore_headers_that_are_not_forwarding_pass() -> None:
    """An underscore header that is not a forwarding-header alias passes untouched."""
    out = upstream([("X_Custom_Thing", "1"), ("my_header", "2")])
    assert out[:2] == [("X_Custom_Thing", "1"), ("my_header", "2")]


@pytest.mark.parametrize(
    "listed",
    [
        "close, X-Forwarded-For",
        "X-Real-IP, X-Forwarded-Host, X-Forwarded-Proto, X-Forwarded-Port, Forwarded",
        "Host",
        "X-Request-Id",
    ],
    ids=["xff", "all-forwarding", "host", "request-id"],
)
def test_connection_listing_cannot_remove_gateway_headers(listed: str) -> None:
    """Connection-listing a header the gateway sets removes the client's copy, not ours."""
    headers = [
        ("Connection", listed),
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("Host", PUBLIC_HOST),
    ]
    out = upstream(headers)
    assert values(out, "X-Forwarded-For") == ["203.0.113.7"]
    assert values(out, "Host") == [PUBLIC_HOST]
    assert values(out, "X-Forwarded-Host") == [PUBLIC_HOST]
    assert values(out, "X-Request-Id") == ["req-1"]
    assert values(out, "X-Real-IP") == []


def test_connection_listed_client_headers_are_dropped() -> None:
    """A header the client names in Connection is not forwarded (Cookie included)."""
    out = upstream([("Connection", "X-Foo, Cookie"), ("X-Foo", "1"), ("Cookie", "a=1")])
    assert "x-foo" not in names(out)
    assert "cookie" not in names(out)


@pytest.mark.parametrize(
    ("peer", "xff", "expected_xff", "expected_for"),
    [
        ("203.0.113.7", "6.6.6.6", "203.0.113.7", "for=203.0.113.7"),
        ("10.0.0.1", "6.6.6.6, 198.51.100.1", "198.51.100.1, 10.0.0.1", "for=198.51.100.1"),
        (
            "10.0.0.1",
            "198.51.100.1, 10.2.2.2",
            "198.51.100.1, 10.2.2.2, 10.0.0.1",
            "for=198.51.100.1",
        ),
        ("10.0.0.1", "2001:db8::1", "2001:db8::1, 10.0.0.1", 'for="[2001:db8::1]"'),
        ("2001:db8::7", "6.6.6.6", "2001:db8::7", 'for="[2001:db8::7]"'),
        ("", "6.6.6.6", "unknown", "for=unknown"),
    ],
    ids=[
        "untrusted-chain-restarts",
        "trusted-chain-from-client",
        "trusted-hops-kept",
        "trusted-ipv6-client",
        "untrusted-ipv6",
        "no-ip-peer",
    ],
)
def test_forwarded_for_from_trusted_sources_only(
    peer: str, xff: str, expected_xff: str, expected_for: str
) -> None:
    """Untrusted peers restart the chain; trusted ones keep the believed chain plus the peer."""
    headers = [("X-Forwarded-For", xff)]
    client = resolve_client(peer, headers, trusted_networks=TRUSTED, listener_proto="https")
    out = upstream(headers, client)
    assert values(out, "X-Forwarded-For") == [expected_xff]
    assert values(out, "Forwarded") == [f"{expected_for};host={PUBLIC_HOST};proto=https"]


def test_client_without_chain_sends_its_ip() -> None:
    """A ClientInfo built without forwarded_for sends just its ip."""
    out = upstream([], ClientInfo(ip="198.51.100.9", proto="http", trusted_peer=True))
    assert values(out, "X-Forwarded-For") == ["198.51.100.9"]


@pytest.mark.parametrize(
    ("public_host", "proto", "port", "forwarded_host"),
    [
        (PUBLIC_HOST, "https", "443", PUBLIC_HOST),
        (PUBLIC_HOST, "http", "80", PUBLIC_HOST),
        (f"{PUBLIC_HOST}:8080", "http", "8080", f'"{PUBLIC_HOST}:8080"'),
        (f"{PUBLIC_HOST}:8443", "https", "8443", f'"{PUBLIC_HOST}:8443"'),
        ("[::1]", "http", "80", '"[::1]"'),
    ],
    ids=["https-default", "http-default", "explicit-port", "explicit-https-port", "ipv6-host"],
)
def test_forwarded_host_and_port(
    public_host: str, proto: str, port: str, forwarded_host: str
) -> None:
    """X-Forwarded-Port comes from the public host or the proto; Forwarded quotes as needed."""
    client = ClientInfo(ip="203.0.113.7", proto=proto, trusted_peer=False)
    out = upstream_request_headers([], client=client, public_host=public_host, request_id="r")
    assert values(out, "X-Forwarded-Port") == [port]
    assert values(out, "X-Forwarded-Host") == [public_host]
    assert values(out, "X-Forwarded-Proto") == [proto]
    assert values(out, "Forwarded") == [f"for=203.0.113.7;host={forwarded_host};proto={proto}"]


def test_host_rewrite() -> None:
    """With host_rewrite_port the sandbox sees Host localhost:{port}; X-Forwarded-Host stays."""
    out = upstream([("Host", PUBLIC_HOST)], host_rewrite_port=5173)
    assert values(out, "Host") == ["localhost:5173"]
    assert values(out, "X-Forwarded-Host") == [PUBLIC_HOST]


def test_exactly_one_of_each_gateway_header() -> None:
    """However many copies the client sent, each gateway header appears exactly once."""
    headers = [(name, "x") for name in ("Host", "X-Forwarded-For", "Forwarded") * 3]
    out = upstream(headers)
    gateway_names = [
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "forwarded",
        "x-request-id",
    ]
    assert names(out) == gateway_names


# --------------------------------------------------------------------------------------
# upgrade_kind.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "method", "kind"),
    [
        ([("Connection", "Upgrade"), ("Upgrade", "websocket")], "GET", "websocket"),
        ([("connection", "keep-alive, upgrade"), ("upgrade", "WebSocket")], "GET", "websocket"),
        ([("Connection", "Upgrade"), ("Upgrade", "websocket")], "POST", "websocket over POST"),
        ([("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c")], "GET", "h2c"),
        ([("Connection", "Upgrade"), ("Upgrade", "TLS/1.2")], "GET", "tls/1.2"),
        ([("Connection", "Upgrade"), ("Upgrade", "h2c, websocket")], "GET", "h2c, websocket"),
        ([("Upgrade", "websocket")], "GET", None),
        ([("Connection", "keep-alive"), ("Upgrade", "websocket")], "GET", None),
        ([("Connection", "Upgrade")], "GET", None),
        ([("Connection", "Upgrade"), ("Upgrade", " ")], "GET", None),
        ([], "GET", None),
    ],
    ids=[
        "websocket",
        "websocket-any-case",
        "websocket-not-get",
        "h2c",
        "tls",
        "list",
        "no-connection",
        "connection-without-upgrade",
        "no-upgrade-header",
        "blank-upgrade",
        "plain",
    ],
)
def test_upgrade_kind(headers: Pairs, method: str, kind: str | None) -> None:
    """WebSocket on GET is 'websocket'; other upgrades name themselves; no upgrade is None."""
    assert upgrade_kind(headers, method=method) == kind


# --------------------------------------------------------------------------------------
# Request ids and constants.
# --------------------------------------------------------------------------------------


def test_new_request_id_shape() -> None:
    """New request ids are 16 lowercase hex characters and valid ids."""
    ids = {new_request_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) and is_valid_request_id(i) for i in ids)


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("a", True),
        ("0123456789abcdef", True),
        ("Req-1.2_3", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("a b", False),
        ("a\n", False),
        ("a\r\nX-Injected: 1", False),
        ("a/b", False),
        ("\u00e9", False),
        ("<script>", False),
    ],
    ids=[
        "one-char",
        "hex",
        "punctuation",
        "max-length",
        "too-long",
        "empty",
        "space",
        "trailing-newline",
        "crlf-injection",
        "slash",
        "non-ascii",
        "markup",
    ],
)
def test_is_valid_request_id(value: str, valid: bool) -> None:
    """Only 1-128 characters of [A-Za-z0-9._-] are adoptable request ids."""
    assert is_valid_request_id(value) is valid


def test_header_name_constants() -> None:
    """The request-id and gateway-error header names are the documented ones."""
    assert (REQUEST_ID, GATEWAY_ERROR) == ("X-Request-Id", "X-Gateway-Error")


# --------------------------------------------------------------------------------------
# wants_html.
# --------------------------------------------------------------------------------------

CHROME_ACCEPT = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"
)
FIREFOX_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.mark.parametrize(
    ("headers", "html"),
    [
        ([("Sec-Fetch-Mode", "navigate"), ("Accept", CHROME_ACCEPT)], True),
        ([("sec-fetch-mode", "Navigate")], True),
        ([("Accept", FIREFOX_ACCEPT)], True),
        ([("Accept", "text/html")], True),
        ([("Accept", "text/html, application/json")], True),
        ([("Accept", "application/json;q=0.5, text/html")], True),
        ([("Accept", "TEXT/HTML;Q=0.9, */*;q=0.9")], True),
        ([("Accept", "text/html;q=0.9"), ("Accept", "*/*;q=0.1")], True),
        ([("Accept", "*/*")], False),
        ([("User-Agent", "curl/8.5.0"), ("Accept", "*/*")], False),
        ([], False),
        ([("Sec-Fetch-Mode", "cors"), ("Accept", "*/*")], False),
        ([("Sec-Fetch-Mode", "cors"), ("Accept", "text/html")], False),
        ([("Sec-Fetch-Mode", "no-cors"), ("Accept", "image/avif,image/*,*/*;q=0.8")], False),
        ([("Accept", "application/json, text/plain, */*")], False),
        ([("Accept", "application/json")], False),
        ([("Accept", "text/html;q=0.5, application/json")], False),
        ([("Accept", "text/html;q=0.5, application/*")], False),
        ([("Accept", "text/html;q=0.5, */*")], False),
        ([("Accept", "text/html;q=0")], False),
        ([("Accept", "text/html;q=abc")], False),
        ([("Accept", "text/*")], False),
        ([("Accept", "text/event-stream")], False),
    ],
    ids=[
        "chrome-navigation",
        "navigate-any-case",
        "firefox-accept-without-sec-fetch",
        "html-only",
        "html-ties-json",
        "html-beats-weighted-json",
        "html-ties-star-any-case",
        "several-accept-headers",
        "star",
        "curl",
        "no-headers",
        "fetch",
        "fetch-asking-for-html",
        "image-subresource",
        "axios",
        "json-only",
        "json-preferred",
        "application-star-preferred",
        "star-preferred",
        "html-refused",
        "malformed-q",
        "text-star-is-not-listing-html",
        "sse",
    ],
)
def test_wants_html(headers: Pairs, html: bool) -> None:
    """Browser navigations get HTML; curl, fetch/XHR and API clients get JSON."""
    assert wants_html(headers) is html


@given(accept=st.text(max_size=80), mode=st.one_of(st.none(), st.text(max_size=12)))
def test_wants_html_never_raises(accept: str, mode: str | None) -> None:
    """Any Accept and Sec-Fetch-Mode text gives a bool, never an exception."""
    headers = [("Accept", accept)]
    if mode is not None:
        headers.append(("Sec-Fetch-Mode", mode))
    assert isinstance(wants_html(headers), bool)


@given(
    headers=st.lists(
        st.tuples(
            st.sampled_from(["Connection", "X-A", "x-b", "Keep-Alive", "Set-Cookie", "Host"]),
            st.sampled_from(["x-a", "X-B, close", "1", "", "host"]),
        ),
        max_size=8,
    )
)
def test_strip_keeps_a_subsequence(headers: Pairs) -> None:
    """Stripping only removes pairs: what stays is an in-order subsequence, all end-to-end."""
    out = strip_hop_by_hop(headers)
    remaining = iter(headers)
    assert all(pair in remaining for pair in out)
    listed = connection_listed(headers)
    assert not any(n.lower() in HOP_BY_HOP or n.lower() in listed for n, _ in out)


def test_module_is_pure() -> None:
    """Importing the module loads neither aiohttp nor redis."""
    probe = "import sys, gateway.headers; print(sorted({'aiohttp', 'redis'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("reason", "expected"),
    [("Fine", "Fine"), ("I'm a teapot", "I'm a teapot"), ("", None), ("O\x01K", None),
     ("a\r\nX: y", None), ("\x7f", None), ("x" * 513, None), ("caf\u00e9", None)],
)  # fmt: skip
def test_relayable_reason(reason: str, expected: str | None) -> None:
    """Only printable ASCII reason phrases (512 characters at most) are copied."""
    assert relayable_reason(reason) == expected
