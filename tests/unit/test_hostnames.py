"""Unit tests for gateway.hostnames: Host -> (port, label), and absolute-form targets."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import (
    EdgeError,
    GatewayError,
    InvalidHost,
    InvalidPort,
    UnknownHost,
)
from gateway.hostnames import (
    HostTarget,
    _parse_common,
    _parse_stepwise,
    check_absolute_target,
    parse_host,
)

DOMAINS = ("box.localhost", "box.runra.dev")


def code_of(host: str | None, domains: tuple[str, ...] = DOMAINS) -> str:
    """The error code parse_host raises for ``host`` (fails if it does not raise)."""
    with pytest.raises(EdgeError) as caught:
        parse_host(host, domains)
    return caught.value.code


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("3000-abc123.box.runra.dev", HostTarget(3000, "abc123")),
        ("3000-abc123.box.localhost", HostTarget(3000, "abc123")),
        ("3000-ABC123.BOX.RUNRA.DEV", HostTarget(3000, "abc123")),
        ("3000-abc123.box.runra.dev.", HostTarget(3000, "abc123")),
        ("3000-abc123.box.localhost:8080", HostTarget(3000, "abc123")),
        ("3000-abc123.box.runra.dev.:443", HostTarget(3000, "abc123")),
        ("3000-abc123.box.runra.dev:0", HostTarget(3000, "abc123")),
        ("3000-abc123.box.runra.dev:65535", HostTarget(3000, "abc123")),
        ("1024-a.box.runra.dev", HostTarget(1024, "a")),
        ("65535-0.box.runra.dev", HostTarget(65535, "0")),
        ("5173-" + "z" * 57 + ".box.runra.dev", HostTarget(5173, "z" * 57)),
        ("10000-" + "9" * 57 + ".box.runra.dev", HostTarget(10000, "9" * 57)),
    ],
    ids=[
        "plain",
        "other-domain",
        "uppercase",
        "trailing-dot",
        "port-suffix",
        "trailing-dot-and-port",
        "port-suffix-zero",
        "port-suffix-max",
        "lowest-port",
        "highest-port-digit-label",
        "57-char-label",
        "63-char-first-label",
    ],
)
def test_valid_hosts_parse(host: str, expected: HostTarget) -> None:
    """A well-formed sandbox host yields its port and lowercase label."""
    assert parse_host(host, DOMAINS) == expected


@pytest.mark.parametrize(
    ("host", "code"),
    [
        (None, "invalid_host"),
        ("", "invalid_host"),
        ("   ", "invalid_host"),
        ("\t", "invalid_host"),
        (" 3000-abc123.box.runra.dev", "invalid_host"),
        ("3000-abc123.box.runra.dev ", "invalid_host"),
        ("3000-abc 123.box.runra.dev", "invalid_host"),
        ("user@3000-abc123.box.runra.dev", "invalid_host"),
        ("3000-abc123.box.runra.dev/x", "invalid_host"),
        ("3000-abc123.box.runra.dev\\x", "invalid_host"),
        ("3000-abc123.box.runra.dev?x", "invalid_host"),
        ("3000-abc123.box.runra.dev#x", "invalid_host"),
        ("3000-abc123.box.runra.dev, 3000-evil.box.runra.dev", "invalid_host"),
        ("3000-abc123.box.runra.dev\x01", "invalid_host"),
        ("3000-abc123.box.runra.dev\x7f", "invalid_host"),
        ("3000-abc\u00e9.box.runra.dev", "invalid_host"),
        ("3000-abc123.box.runra.de\u212a", "invalid_host"),
        ("3000-\u0430bc123.box.runra.dev", "invalid_host"),
    ],
    ids=[
        "none",
        "empty",
        "spaces",
        "tab",
        "leading-space",
        "trailing-space",
        "inner-space",
        "userinfo",
        "path",
        "backslash",
        "query",
        "fragment",
        "list",
        "control-char",
        "del",
        "non-ascii-label",
        "kelvin-sign-lowercases-to-k",
        "cyrillic-homoglyph",
    ],
)
def test_missing_or_forbidden_characters(host: str | None, code: str) -> None:
    """No Host, whitespace, non-ASCII and userinfo/path/list characters are invalid_host."""
    assert code_of(host) == code


def test_no_host_message() -> None:
    """A missing Host header is named as such in the message."""
    with pytest.raises(InvalidHost, match="request has no Host header"):
        parse_host(None, DOMAINS)


@pytest.mark.parametrize(
    ("host", "code"),
    [
        ("3000-abc123.box.runra.dev:", "invalid_host"),
        ("3000-abc123.box.runra.dev:abc", "invalid_host"),
        ("3000-abc123.box.runra.dev:443:80", "invalid_host"),
        ("a:1:2", "invalid_host"),
        ("3000-abc123.box.runra.dev:99999", "invalid_host"),
        ("3000-abc123.box.runra.dev:65536", "invalid_host"),
        ("3000-abc123.box.runra.dev:123456", "invalid_host"),
        ("3000-abc123.box.runra.dev:+80", "invalid_host"),
        (":8080", "invalid_host"),
        ("[::1]:8080", "unknown_host"),
        ("[::1]", "unknown_host"),
        ("[2001:db8::1]:443", "unknown_host"),
        ("[::1]:99999", "invalid_host"),
        ("[::1]x", "invalid_host"),
        ("[::1", "invalid_host"),
        ("[not-an-ip]:80", "invalid_host"),
        ("127.0.0.1:8080", "unknown_host"),
    ],
    ids=[
        "empty-port",
        "alpha-port",
        "double-port",
        "double-port-short",
        "port-too-big",
        "port-65536",
        "six-digit-port",
        "signed-port",
        "port-only",
        "ipv6-literal-with-port",
        "ipv6-literal",
        "ipv6-literal-443",
        "ipv6-literal-bad-port",
        "ipv6-literal-junk-after",
        "ipv6-literal-unclosed",
        "ipv6-literal-not-an-ip",
        "ipv4-address",
    ],
)
def test_port_suffix_and_ip_literals(host: str, code: str) -> None:
    """The :port suffix must be 1-5 digits <= 65535; IP literals are unknown_host."""
    assert code_of(host) == code


@pytest.mark.parametrize(
    ("host", "code"),
    [
        ("3000-abc123.box.runra.dev..", "invalid_host"),
        ("3000-abc123..box.runra.dev", "invalid_host"),
        (".3000-abc123.box.runra.dev", "invalid_host"),
        ("..3000-abc123.box.runra.dev", "invalid_host"),
        (".", "invalid_host"),
        ("a..b", "invalid_host"),
    ],
    ids=[
        "two-trailing-dots",
        "empty-inner-label",
        "leading-dot",
        "two-leading-dots",
        "only-a-dot",
        "a..b",
    ],
)
def test_empty_labels(host: str, code: str) -> None:
    """Empty labels, including a second trailing dot, are invalid_host."""
    assert code_of(host) == code


@pytest.mark.parametrize(
    "host",
    [
        "3000-abc123.box.runra.dev.evil.test",
        "3000-abc123.evil.test",
        "evilbox.runra.dev",
        "3000-abc123.evilbox.runra.dev",
        "3000-abc123.box.runra.devx",
        "3000-abc123.runra.dev",
        "box.runra.dev",
        "box.runra.dev.",
        "BOX.LOCALHOST:8080",
        "localhost",
        "example.com",
        "dev",
    ],
    ids=[
        "domain-then-evil-suffix",
        "other-domain",
        "domain-glued-to-label",
        "sandbox-under-glued-domain",
        "domain-with-extra-chars",
        "parent-domain",
        "bare-domain",
        "bare-domain-trailing-dot",
        "bare-domain-upper-with-port",
        "localhost",
        "foreign-site",
        "tld",
    ],
)
def test_hosts_outside_the_domains_are_unknown(host: str) -> None:
    """Suffix tricks, foreign hosts and the bare domain are unknown_host."""
    assert code_of(host) == "unknown_host"


def test_bare_domain_message_explains_the_url_shape() -> None:
    """The bare domain's error says what a sandbox URL looks like."""
    with pytest.raises(UnknownHost, match=r"\{port\}-\{label\}\.box\.runra\.dev"):
        parse_host("box.runra.dev", DOMAINS)


@pytest.mark.parametrize(
    ("host", "domains", "expected"),
    [
        (
            "3000-abc123.box.runra.dev",
            ("runra.dev", "box.runra.dev"),
            HostTarget(3000, "abc123"),
        ),
        (
            "3000-abc123.box.runra.dev",
            ("box.runra.dev", "runra.dev"),
            HostTarget(3000, "abc123"),
        ),
        ("3000-abc123.runra.dev", ("runra.dev", "box.runra.dev"), HostTarget(3000, "abc123")),
    ],
    ids=["longer-listed-last", "longer-listed-first", "only-the-shorter-matches"],
)
def test_longest_domain_wins(host: str, domains: tuple[str, ...], expected: HostTarget) -> None:
    """When several domains match, the longest one decides where the label starts."""
    assert parse_host(host, domains) == expected


def test_no_domains_means_every_host_is_unknown() -> None:
    """With no configured domain nothing routes."""
    assert code_of("3000-abc123.box.runra.dev", ()) == "unknown_host"


@pytest.mark.parametrize(
    ("host", "code"),
    [
        ("a.3000-abc123.box.runra.dev", "invalid_host"),
        ("3000-abc123.x.box.runra.dev", "invalid_host"),
        ("x.box.runra.dev", "invalid_host"),
        ("3000-" + "a" * 58 + ".box.runra.dev", "invalid_host"),
        ("1024-" + "a" * 59 + ".box.runra.dev", "invalid_host"),
        ("abc-abc123.box.runra.dev", "invalid_host"),
        ("-abc123.box.runra.dev", "invalid_host"),
        ("+3000-abc123.box.runra.dev", "invalid_host"),
        ("%33000-abc123.box.runra.dev", "invalid_host"),
        ("3e3-abc123.box.runra.dev", "invalid_host"),
        ("03000-abc123.box.runra.dev", "invalid_host"),
        ("00-abc123.box.runra.dev", "invalid_host"),
        ("0000001-abc123.box.runra.dev", "invalid_host"),
        ("0-abc123.box.runra.dev", "invalid_port"),
        ("80-abc123.box.runra.dev", "invalid_port"),
        ("1023-abc123.box.runra.dev", "invalid_port"),
        ("65536-abc123.box.runra.dev", "invalid_port"),
        ("99999-abc123.box.runra.dev", "invalid_port"),
        ("99999999-abc123.box.runra.dev", "invalid_port"),
        ("99999999999999999999-abc123.box.runra.dev", "invalid_port"),
        ("3000-abc_12.box.runra.dev", "invalid_host"),
        ("3000-xn--80ak6aa92e.box.runra.dev", "invalid_host"),
        ("3000--abc123.box.runra.dev", "invalid_host"),
        ("3000-abc-x.box.runra.dev", "invalid_host"),
        ("3000-.box.runra.dev", "invalid_host"),
        ("3000-abc!.box.runra.dev", "invalid_host"),
        ("3000.box.runra.dev", "invalid_host"),
    ],
    ids=[
        "nested-subdomain",
        "label-then-extra-label",
        "no-hyphen-single-label",
        "58-char-label",
        "64-char-first-label",
        "alpha-port",
        "empty-port",
        "plus-sign-port",
        "percent-encoded-port",
        "exponent-port",
        "leading-zero",
        "double-zero",
        "leading-zeros-many",
        "zero",
        "port-80",
        "port-1023",
        "port-65536",
        "port-99999",
        "port-99999999",
        "port-20-digits",
        "underscore-in-label",
        "punycode-label",
        "double-hyphen",
        "hyphen-in-label",
        "empty-label",
        "punctuation-in-label",
        "port-without-label",
    ],
)
def test_first_label_rules(host: str, code: str) -> None:
    """The first label must be {canonical port}-{1-57 of [a-z0-9]} and nothing more."""
    assert code_of(host) == code


@pytest.mark.parametrize(
    ("host", "exc", "fragment", "port", "label"),
    [
        ("80-abc123.box.runra.dev", InvalidPort, "port 80 is reserved", 80, "abc123"),
        ("0-abc123.box.runra.dev", InvalidPort, "port 0 is reserved", 0, "abc123"),
        ("65536-abc123.box.runra.dev", InvalidPort, "out of range", 65536, "abc123"),
        ("99999999-abc123.box.runra.dev", InvalidPort, "out of range", 99999999, "abc123"),
        ("80-ABC_1.box.runra.dev", InvalidPort, "reserved", 80, None),
        ("03000-abc123.box.runra.dev", InvalidHost, "leading zero", None, "abc123"),
        ("abc-abc123.box.runra.dev", InvalidHost, "not a number", None, "abc123"),
        ("3000-abc_12.box.runra.dev", InvalidHost, "sandbox label 'abc_12'", 3000, None),
    ],
    ids=[
        "reserved",
        "zero-is-reserved",
        "just-above-range",
        "far-above-range",
        "bad-label-not-attached",
        "leading-zero",
        "not-a-number",
        "bad-label",
    ],
)
def test_errors_name_the_problem_and_carry_known_parts(
    host: str,
    exc: type[EdgeError],
    fragment: str,
    port: int | None,
    label: str | None,
) -> None:
    """Messages name the problem; port/label are attached only when they were valid."""
    with pytest.raises(exc, match=fragment) as caught:
        parse_host(host, DOMAINS)
    assert (caught.value.port, caught.value.label) == (port, label)


def test_reserved_port_message_is_exact() -> None:
    """The reserved-port message is the documented sentence."""
    with pytest.raises(InvalidPort) as caught:
        parse_host("80-abc123.box.runra.dev", DOMAINS)
    assert caught.value.message == "port 80 is reserved: sandboxes expose ports 1024-65535"


def test_messages_quote_at_most_a_bounded_part_of_the_host() -> None:
    """An error message never echoes an arbitrarily long client-supplied host."""
    with pytest.raises(UnknownHost) as caught:
        parse_host("a" * 5000 + ".example.com", DOMAINS)
    assert len(caught.value.message) < 200


# --------------------------------------------------------------------------------------
# Properties.
# --------------------------------------------------------------------------------------

_labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=57)
_ports = st.integers(min_value=1024, max_value=65535)


@given(host=st.one_of(st.none(), st.text(max_size=120)))
def test_arbitrary_text_only_raises_gateway_errors(host: str | None) -> None:
    """parse_host returns a target or raises a GatewayError, for any text at all."""
    try:
        target = parse_host(host, DOMAINS)
    except GatewayError:
        return
    assert 1024 <= target.port <= 65535


@given(
    prefix=st.text(alphabet="0123456789-abcXYZ_.:@[]", max_size=30),
    domain=st.sampled_from(DOMAINS),
    suffix=st.sampled_from(["", ".", ":8080", ".:80", ":", "..", ":1:2"]),
)
def test_near_miss_hosts_only_raise_gateway_errors(prefix: str, domain: str, suffix: str) -> None:
    """Hosts built from the grammar's own characters never raise a foreign exception."""
    with contextlib.suppress(GatewayError):
        parse_host(f"{prefix}.{domain}{suffix}", DOMAINS)


@given(
    port=_ports,
    label=_labels,
    domain=st.sampled_from(DOMAINS),
    suffix=st.sampled_from(["", ".", ":8080", ".:443", ":0", ":65535"]),
    upper=st.booleans(),
)
def test_valid_targets_round_trip(
    port: int, label: str, domain: str, suffix: str, upper: bool
) -> None:
    """Any valid (port, label) formatted as a host parses back to itself, on both paths."""
    host = f"{port}-{label}.{domain}{suffix}"
    if upper:
        host = host.upper()
    expected = HostTarget(port, label)
    assert parse_host(host, DOMAINS) == expected
    assert _parse_stepwise(host, DOMAINS) == expected


@given(port=st.integers(min_value=0, max_value=10**12), label=_labels)
def test_out_of_range_ports_are_invalid_port(port: int, label: str) -> None:
    """Every canonical number outside 1024-65535 is invalid_port, inside it routes."""
    host = f"{port}-{label}.box.runra.dev"
    if 1024 <= port <= 65535:
        assert parse_host(host, DOMAINS).port == port
    else:
        assert code_of(host) == "invalid_port"


# --------------------------------------------------------------------------------------
# Absolute-form request targets.
# --------------------------------------------------------------------------------------

HOST = "3000-abc123.box.runra.dev"


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("/", HOST),
        ("/a/..%2F..%2Fadmin?x=1", HOST),
        ("//evil.test/x", HOST),
        ("*", HOST),
        ("/", None),
        (f"http://{HOST}/p", HOST),
        (f"http://{HOST}", HOST),
        (f"http://{HOST}?q", HOST),
        (f"HTTP://{HOST.upper()}/p", HOST),
        (f"http://{HOST}/p", HOST.upper()),
        (f"http://{HOST}:80/p", HOST),
        (f"http://{HOST}/p", f"{HOST}:80"),
        (f"https://{HOST}:443/p", HOST),
        (f"https://{HOST}/p", f"{HOST}:443"),
        (f"http://{HOST}:8080/p", f"{HOST}:8080"),
    ],
    ids=[
        "root",
        "raw-path",
        "double-slash-path",
        "asterisk",
        "origin-form-without-host",
        "absolute-matching",
        "absolute-no-path",
        "absolute-query-only",
        "absolute-uppercase",
        "host-uppercase",
        "absolute-default-port",
        "host-default-port",
        "https-default-port",
        "https-host-default-port",
        "same-explicit-port",
    ],
)
def test_acceptable_targets(target: str, host: str | None) -> None:
    """Origin-form, '*' and absolute-form agreeing with Host pass."""
    check_absolute_target(target, host)


@pytest.mark.parametrize(
    ("target", "host", "fragment"),
    [
        ("http://3000-victim.box.runra.dev/p", HOST, "disagrees with Host"),
        (f"http://{HOST}/p", None, "disagrees with Host"),
        (f"http://{HOST}:8080/p", HOST, "disagrees with Host"),
        (f"http://{HOST}/p", f"{HOST}:8080", "disagrees with Host"),
        (f"https://{HOST}:80/p", HOST, "disagrees with Host"),
        (f"http://{HOST}:443/p", HOST, "disagrees with Host"),
        (f"http://{HOST}./p", HOST, "disagrees with Host"),
        (f"http://user@{HOST}/p", HOST, "userinfo"),
        (f"http://user:pw@{HOST}/p", f"user:pw@{HOST}", "userinfo"),
        ("http:///p", "", "no host"),
        (f"ftp://{HOST}/p", HOST, "scheme"),
        ("10.0.0.1:22", HOST, "neither"),
        (f"{HOST}:80", HOST, "neither"),
        ("admin", HOST, "neither"),
        ("*/x", HOST, "neither"),
        ("", HOST, "neither"),
        (f"http:{HOST}/p", HOST, "neither"),
    ],
    ids=[
        "other-tenant",
        "no-host-header",
        "extra-port-in-target",
        "extra-port-in-host",
        "https-with-http-default-port",
        "http-with-https-default-port",
        "trailing-dot-differs",
        "userinfo",
        "userinfo-even-if-host-agrees",
        "empty-authority",
        "other-scheme",
        "authority-form",
        "authority-form-sandbox",
        "bare-word",
        "asterisk-path",
        "empty",
        "scheme-without-slashes",
    ],
)
def test_refused_targets(target: str, host: str | None, fragment: str) -> None:
    """Absolute-form disagreeing with Host, with userinfo, and other forms are invalid_host."""
    with pytest.raises(InvalidHost, match=fragment):
        check_absolute_target(target, host)


# --------------------------------------------------------------------------------------
# The fast path agrees with the reference grammar.
# --------------------------------------------------------------------------------------

_near_valid_hosts = st.builds(
    lambda port, label, domain, suffix: f"{port}-{label}.{domain}{suffix}",
    port=st.one_of(
        _ports.map(str),
        st.integers(min_value=0, max_value=10**6).map(str),
        st.text("0123456789+", max_size=7),
    ),
    label=st.one_of(_labels, st.text(alphabet="abcXYZ019-_.\u212a\u0131", max_size=60)),
    domain=st.sampled_from([*DOMAINS, "runra.dev", "BOX.RUNRA.DEV", "box.runra.dev."]),
    suffix=st.sampled_from(["", ".", "..", ":", ":80", ":65536", ":99999", ":1:2", ".:0"]),
)


@pytest.mark.parametrize(
    "domains",
    [DOMAINS, ("runra.dev", "box.runra.dev"), ("", "box.runra.dev."), ("BOX.RUNRA.DEV",), ()],
    ids=["default", "nested-domains", "empty-and-dotted-domain", "uppercase-domain", "none"],
)
@given(host=st.one_of(_near_valid_hosts, st.text(max_size=70)))
def test_fast_path_is_a_subset_of_the_reference_grammar(
    domains: tuple[str, ...], host: str
) -> None:
    """Whatever the fast path accepts, the step-by-step parser accepts with the same result."""
    fast = _parse_common(host, domains)
    if fast is not None:
        assert _parse_stepwise(host, domains) == fast


@pytest.mark.parametrize(
    "host",
    [
        "3000-abc123.box.runra.dev",
        "3000-ABC123.BOX.RUNRA.DEV.:8080",
        "65535-" + "z" * 57 + ".box.localhost",
    ],
    ids=["plain", "upper-dot-port", "longest"],
)
def test_fast_path_takes_the_common_case(host: str) -> None:
    """Ordinary valid hosts are answered by the fast path itself."""
    assert _parse_common(host, DOMAINS) == _parse_stepwise(host, DOMAINS)


def test_module_is_pure() -> None:
    """Importing the module loads neither aiohttp nor redis."""
    probe = "import sys, gateway.hostnames; print(sorted({'aiohttp', 'redis'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
