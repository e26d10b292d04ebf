"""Properties of the header filters (hypothesis): hop-by-hop and Connection-listed never pass."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import headers

names = st.one_of(
    st.sampled_from(sorted(headers.HOP_BY_HOP)),
    st.sampled_from(["Accept", "X-Custom", "Cookie", "Content-Type", "X-Forwarded-For"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_", min_size=1,
            max_size=12),
).map(lambda n: n.upper() if len(n) % 2 else n)  # fmt: skip
values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
pairs = st.lists(st.tuples(names, values), max_size=20)


# What the gateway itself sends upstream (headers.upstream_request_headers): a client's
# Connection may name them, and the client's copies go, but the gateway's own follow.
_SET_BY_THE_GATEWAY = {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                       "x-forwarded-port", "forwarded", "x-request-id"}  # fmt: skip


def _connection_listed(pairs: list[tuple[str, str]]) -> set[str]:
    return {
        token.strip().lower()
        for name, value in pairs
        if name.lower() in ("connection", "proxy-connection")
        for token in value.split(",")
        if token.strip()
    }


@settings(max_examples=300)
@given(pairs, st.lists(names, max_size=4))
def test_hop_by_hop_and_connection_listed_never_reach_the_sandbox(
    pairs: list[tuple[str, str]], listed: list[str]
) -> None:
    """No hop-by-hop header nor one the Connection header names is sent upstream."""
    pairs = [*pairs, ("Connection", ", ".join(listed))]
    out = headers.upstream_request_headers(
        pairs, client=headers.ClientInfo(ip="127.0.0.1", proto="http", trusted_peer=False),
        public_host="3000-abc.box.test", request_id="req-1",
    )  # fmt: skip
    out_names = {name.lower() for name, _ in out}
    assert not out_names & headers.HOP_BY_HOP
    assert not out_names & (_connection_listed(pairs) - _SET_BY_THE_GATEWAY)


@settings(max_examples=300)
@given(pairs, st.lists(names, max_size=4))
def test_hop_by_hop_never_reaches_the_client(
    pairs: list[tuple[str, str]], listed: list[str]
) -> None:
    """strip_hop_by_hop drops hop-by-hop and Connection-listed headers, keeps the rest in order."""
    pairs = [*pairs, ("Connection", ", ".join(listed))]
    out = headers.strip_hop_by_hop(pairs)
    dropped = headers.HOP_BY_HOP | _connection_listed(pairs)
    assert not {name.lower() for name, _ in out} & dropped
    assert out == [(n, v) for n, v in pairs if n.lower() not in dropped]
