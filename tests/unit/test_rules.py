"""gateway.routing.rules: ids, ports, addresses and the listener-loop check. Pure."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.errors import RuleViolation
from gateway.routing import rules

LOCAL = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
PRODUCTION = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]

# ---------------------------------------------------------------------------------------
# Ports
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1024, 1024), (65535, 65535), (3000, 3000), ("3000", 3000), ("1024", 1024)],
    ids=["1024", "65535", "3000", "text-3000", "text-1024"],
)
def test_parse_port_accepts_the_range(value: object, expected: int) -> None:
    """1024-65535, as an int or decimal text, is a port that may be exposed."""
    assert rules.parse_port(value) == expected


@pytest.mark.parametrize(
    ("value", "code", "words"),
    [
        (80, "reserved_port", "port 80 is reserved"),
        (1023, "reserved_port", "port 1023 is reserved"),
        (0, "reserved_port", "port 0 is reserved"),
        ("80", "reserved_port", "port 80 is reserved"),
        (-1, "invalid_port", "port -1 is invalid"),
        ("-1", "invalid_port", "port '-1' is invalid"),
        (65536, "invalid_port", "port 65536 is invalid"),
        ("abc", "invalid_port", "port 'abc' is invalid"),
        ("03000", "invalid_port", "leading zero"),
        ("", "invalid_port", "not a number"),
        (" 3000", "invalid_port", "not a number"),
        ("\uff13\uff10\uff10\uff10", "invalid_port", "not a number"),
        (True, "invalid_port", "port True is invalid"),
        (3000.0, "invalid_port", "not a number"),
        (None, "invalid_port", "not a number"),
    ],
    ids=[
        "80", "1023", "0", "text-80", "-1", "text-minus-1", "65536", "abc", "03000", "empty",
        "space", "fullwidth", "true", "float", "none",
    ],
)  # fmt: skip
def test_parse_port_refusals_name_the_problem(value: object, code: str, words: str) -> None:
    """Below 1024 is reserved, everything else outside 1024-65535 invalid; the message says so."""
    with pytest.raises(RuleViolation) as caught:
        rules.parse_port(value)
    assert caught.value.code == code
    assert caught.value.status == 422
    assert words in caught.value.message
    assert "1024-65535" in caught.value.message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3000,5173", frozenset({3000, 5173})),
        (" 3000 , 5173 ,", frozenset({3000, 5173})),
        ([3000, "5173"], frozenset({3000, 5173})),
        ([], frozenset()),
    ],
    ids=["text", "spaces", "list", "empty"],
)
def test_parse_port_list(value: object, expected: frozenset[int]) -> None:
    """allowPorts is a list of ports or the CLI's comma-separated text."""
    assert rules.parse_port_list(value) == expected


@pytest.mark.parametrize("value", ["3000,80", [3000, 70000], 3000, {"a": 1}], ids=str)
def test_parse_port_list_refuses_bad_items(value: object) -> None:
    """A bad port inside allowPorts, or not a list at all, is refused."""
    with pytest.raises(RuleViolation):
        rules.parse_port_list(value)


# ---------------------------------------------------------------------------------------
# Ids and labels
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sandbox_id", ["abc123", "a", "0", "x" * 64], ids=["typical", "a", "0", "64"]
)
def test_check_sandbox_id_accepts(sandbox_id: str) -> None:
    """Lowercase letters and digits, 1-64 characters, are an id."""
    assert rules.check_sandbox_id(sandbox_id, label_length=6) == sandbox_id


@pytest.mark.parametrize(
    ("sandbox_id", "label_length", "words"),
    [
        ("ABC123", 6, "lowercase"),
        ("abC123", 6, "lowercase"),
        ("abc.123", 6, "lowercase"),
        ("abc-123", 6, "lowercase"),
        ("abc_123", 6, "lowercase"),
        ("", 6, "lowercase"),
        ("abc 123", 6, "lowercase"),
        ("äbc123", 6, "lowercase"),
        (123, 6, "lowercase"),
        (None, 6, "lowercase"),
        ("x" * 65, 6, "longer than 64"),
        ("x" * 58, 0, "longer than 57"),
    ],
    ids=[
        "upper", "mixed", "dots", "dash", "underscore", "empty", "space", "non-ascii", "int",
        "none", "65", "58-whole-id",
    ],
)  # fmt: skip
def test_check_sandbox_id_refusals(sandbox_id: object, label_length: int, words: str) -> None:
    """Ids with uppercase, dots or other characters, or too long, are 422 invalid_id."""
    with pytest.raises(RuleViolation) as caught:
        rules.check_sandbox_id(sandbox_id, label_length=label_length)
    assert caught.value.code == "invalid_id"
    assert words in caught.value.message
    assert repr(sandbox_id)[:20] in caught.value.message


def test_whole_id_labels_allow_57_characters() -> None:
    """With url_id_length 0 the label is the id, so 57 characters is the limit."""
    assert rules.check_sandbox_id("x" * 57, label_length=0) == "x" * 57


@pytest.mark.parametrize(
    ("sandbox_id", "label_length", "label"),
    [("abc123xyz", 6, "abc123"), ("abc", 6, "abc"), ("abc123xyz", 0, "abc123xyz")],
    ids=["prefix", "shorter-than-length", "whole-id"],
)
def test_label_of(sandbox_id: str, label_length: int, label: str) -> None:
    """The label is the first url_id_length characters (0: the whole id)."""
    assert rules.label_of(sandbox_id, label_length=label_length) == label


# ---------------------------------------------------------------------------------------
# Addresses
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "networks", "canonical"),
    [
        ("127.0.0.2", LOCAL, "127.0.0.2"),
        ("::1", LOCAL, "::1"),
        ("0:0:0:0:0:0:0:1", LOCAL, "::1"),
        ("10.1.2.3", PRODUCTION, "10.1.2.3"),
        ("fd00::1", PRODUCTION, "fd00::1"),
        ("FD12:0::AB", PRODUCTION, "fd12::ab"),
    ],
    ids=["loopback", "v6-loopback", "v6-long", "private", "ula", "ula-upper"],
)
def test_check_address_accepts_and_canonicalises(
    address: str, networks: list[rules.IPNetwork], canonical: str
) -> None:
    """An IP literal inside the sandbox networks is accepted in its canonical text."""
    assert rules.check_address(address, networks=networks) == canonical


@pytest.mark.parametrize(
    ("address", "networks", "code"),
    [
        ("sandbox.internal", PRODUCTION, "invalid_address"),
        ("10.0.0.1:3000", PRODUCTION, "invalid_address"),
        ("010.000.000.001", PRODUCTION, "invalid_address"),
        ("", PRODUCTION, "invalid_address"),
        (167772161, PRODUCTION, "invalid_address"),
        (None, PRODUCTION, "invalid_address"),
        ("192.168.1.1", PRODUCTION, "address_not_allowed"),
        ("169.254.169.254", PRODUCTION, "address_not_allowed"),
        ("127.0.0.1", PRODUCTION, "address_not_allowed"),
        ("10.0.0.1", LOCAL, "address_not_allowed"),
        ("0.0.0.0", [ipaddress.ip_network("0.0.0.0/0")], "address_not_allowed"),
        ("::", [ipaddress.ip_network("::/0")], "address_not_allowed"),
        ("224.0.0.1", [ipaddress.ip_network("0.0.0.0/0")], "address_not_allowed"),
        ("ff02::1", [ipaddress.ip_network("::/0")], "address_not_allowed"),
        ("::1", PRODUCTION, "address_not_allowed"),
        ("fe80::1", PRODUCTION, "address_not_allowed"),
        ("::ffff:10.0.0.1", PRODUCTION, "address_not_allowed"),
        ("fc00::1", PRODUCTION, "address_not_allowed"),
        ("127.0.0.1", [], "address_not_allowed"),
    ],
    ids=[
        "hostname", "with-port", "leading-zeros", "empty", "int", "none", "outside",
        "metadata", "loopback-in-production", "private-in-local", "unspecified-v4",
        "unspecified-v6", "multicast-v4", "multicast-v6", "v6-loopback-in-production",
        "link-local-v6", "v4-mapped", "fc00-outside-fd00", "no-networks",
    ],
)  # fmt: skip
def test_check_address_refusals(
    address: object, networks: list[rules.IPNetwork], code: str
) -> None:
    """Not an IP, outside the networks, unspecified or multicast: refused, naming the address."""
    with pytest.raises(RuleViolation) as caught:
        rules.check_address(address, networks=networks)
    assert caught.value.code == code
    assert str(address) in caught.value.message or repr(address) in caught.value.message


def test_outside_networks_message_lists_the_networks() -> None:
    """The refusal names the configured sandbox networks."""
    with pytest.raises(RuleViolation, match=r"10\.0\.0\.0/8, fd00::/8"):
        rules.check_address("192.168.0.1", networks=PRODUCTION)


# ---------------------------------------------------------------------------------------
# The gateway's own listeners
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "port", "listeners", "expected"),
    [
        ("127.0.0.1", 8080, [("0.0.0.0", 8080)], True),
        ("127.0.0.9", 8080, [("0.0.0.0", 8080)], True),
        ("::1", 8080, [("0.0.0.0", 8080)], True),
        ("::1", 8080, [("::", 8080)], True),
        ("127.0.0.1", 8080, [("::", 8080)], True),
        ("127.0.0.1", 8081, [("0.0.0.0", 8080)], False),
        ("10.0.0.5", 8080, [("0.0.0.0", 8080)], False),
        ("127.0.0.1", 8081, [("127.0.0.1", 8081)], True),
        ("127.0.0.2", 8081, [("127.0.0.1", 8081)], False),
        ("127.0.0.1", 3000, [("127.0.0.1", 8081)], False),
        ("::1", 8081, [("::1", 8081)], True),
        ("127.0.0.1", 8080, [("localhost", 8080)], True),
        ("127.0.0.1", 8081, [("0.0.0.0", 8080), ("127.0.0.1", 8081)], True),
        ("127.0.0.1", 8080, [], False),
    ],
    ids=[
        "wildcard-v4-loopback", "wildcard-v4-other-loopback", "wildcard-v4-v6-loopback",
        "wildcard-v6", "wildcard-v6-v4-loopback", "wildcard-other-port",
        "wildcard-non-loopback", "specific", "specific-other-address", "specific-other-port",
        "specific-v6", "hostname-listener", "second-listener", "no-listeners",
    ],
)  # fmt: skip
def test_is_gateway_listener(
    address: str, port: int, listeners: list[rules.Endpoint], expected: bool
) -> None:
    """A route to a listener's own address:port (any loopback for a wildcard) is a loop."""
    assert rules.is_gateway_listener(address, port, listeners) is expected


def test_check_not_listener_refuses_a_loop() -> None:
    """check_not_listener raises address_not_allowed naming the address and port."""
    with pytest.raises(RuleViolation) as caught:
        rules.check_not_listener("127.0.0.1", 8080, [("0.0.0.0", 8080)])
    assert caught.value.code == "address_not_allowed"
    assert "127.0.0.1:8080" in caught.value.message
    rules.check_not_listener("127.0.0.2", 3000, [("0.0.0.0", 8080)])
