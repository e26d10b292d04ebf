"""The upstream pool's table of known answer heads (gateway/proxy/upstream.py)."""

from __future__ import annotations

from gateway.proxy.upstream import MAX_KNOWN_HEADS, UpstreamPool, UpstreamResponse, UpstreamTimeouts
from gateway.routing.model import Upstream

_TARGET = Upstream(address="127.0.0.2", port=3000, incarnation="i1", host_rewrite=False)


def _pool() -> UpstreamPool:
    return UpstreamPool(UpstreamTimeouts(1.0, 1.0, 1.0, 1.0, 1.0))


def _answered(pool: UpstreamPool) -> UpstreamResponse:
    response = UpstreamResponse(pool, _TARGET, head_only=False)
    response.status, response.body_received = 200, 2  # a 2-byte body
    return response


async def test_connections_repeating_one_head_share_one_known_answer() -> None:
    """The same head from two answers is one known answer; another head is another."""
    pool = _pool()
    first = pool._known_answer(b"HTTP/1.1 200 OK\r\n\r\n", _answered(pool))
    again = pool._known_answer(b"HTTP/1.1 200 OK\r\n\r\n", _answered(pool))
    other = pool._known_answer(b"HTTP/1.1 200 Fine\r\n\r\n", _answered(pool))
    assert first is again and other is not first
    assert first.size == len(b"HTTP/1.1 200 OK\r\n\r\n") + 2


async def test_the_table_of_known_heads_stays_bounded() -> None:
    """More distinct heads than MAX_KNOWN_HEADS empty the table; each head's answer
    stays its own."""
    pool = _pool()
    for n in range(MAX_KNOWN_HEADS + 10):
        head = b"HTTP/1.1 200 OK\r\nX-N: %d\r\n\r\n" % n
        assert pool._known_answer(head, _answered(pool)).head == head
        assert len(pool._known_heads) <= MAX_KNOWN_HEADS
