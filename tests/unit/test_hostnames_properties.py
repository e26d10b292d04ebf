"""Properties of the host parser (hypothesis): only EdgeErrors, round trips, no suffix tricks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import errors, hostnames

DOMAINS = ("box.test", "box.runra.dev")
labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=57)
ports = st.integers(min_value=hostnames.MIN_PORT, max_value=hostnames.MAX_PORT)


@settings(max_examples=500)
@given(st.one_of(st.none(), st.text(max_size=300), st.binary(max_size=300).map(
    lambda b: b.decode("latin-1"))))  # fmt: skip
def test_any_host_parses_or_raises_an_edge_error(host: str | None) -> None:
    """Whatever the Host, the parser returns a target or raises an EdgeError, nothing else."""
    try:
        target = hostnames.parse_host(host, DOMAINS)
    except errors.EdgeError:
        return
    assert hostnames.MIN_PORT <= target.port <= hostnames.MAX_PORT
    assert target.label.isalnum() and target.label == target.label.lower()


@given(ports, labels, st.sampled_from(DOMAINS), st.booleans())
def test_valid_hosts_round_trip(port: int, label: str, domain: str, upper: bool) -> None:
    """{port}-{label}.{domain} parses back to (port, label), in any letter case."""
    host = f"{port}-{label}.{domain}"
    target = hostnames.parse_host(host.upper() if upper else host, DOMAINS)
    assert (target.port, target.label) == (port, label)


@given(ports, labels, st.sampled_from(DOMAINS),
       st.sampled_from([".evil.test", "evil.test", "-x", ".", "..", "@evil.test", "/x",
                        ".box.test.evil.test"]))  # fmt: skip
def test_suffix_tricks_are_refused(port: int, label: str, domain: str, trick: str) -> None:
    """Anything appended after the domain (another domain, separators) never routes."""
    host = f"{port}-{label}.{domain}{trick}"
    try:
        target = hostnames.parse_host(host, DOMAINS)
    except errors.EdgeError:
        return
    # Only a trailing dot (the absolute DNS form) may still name the same target.
    assert trick == "." and (target.port, target.label) == (port, label)


@given(ports, labels, st.text(alphabet="abcdefghijklmnopqrstuvwxyz.-", min_size=1, max_size=20))
def test_lookalike_domains_are_unknown(port: int, label: str, prefix: str) -> None:
    """A domain that merely ends in the same letters (evilbox.test) is not ours."""
    host = f"{port}-{label}.{prefix}box.test"
    if prefix.endswith("."):
        return  # a real subdomain level; another property covers those
    try:
        hostnames.parse_host(host, DOMAINS)
    except errors.EdgeError:
        return
    raise AssertionError(f"{host!r} routed")
