"""Unit tests for the WebSocket relay's pure helpers: close codes, reasons, size limits."""

from __future__ import annotations

import pytest

from gateway.proxy.websocket import aiohttp_message_limit
from gateway.proxy.wsframes import close_reason, wire_code


@pytest.mark.parametrize(
    ("received", "sent"),
    [
        (None, 1000),  # no code at all
        (0, 1000),  # aiohttp's value for an empty close frame
        (1005, 1000),  # "no status received" must not go on the wire
        (1006, 1011),  # "abnormal closure": the peer vanished
        (1015, 1011),  # "TLS handshake failure"
        (1000, 1000),
        (1001, 1001),
        (1009, 1009),
        (1011, 1011),
        (3000, 3000),
        (4001, 4001),
        (4999, 4999),
    ],
)
def test_wire_code(received: int | None, sent: int) -> None:
    assert wire_code(received) == sent


def test_wire_code_never_sends_reserved_codes() -> None:
    for code in [None, 0, *range(1000, 5000)]:
        assert wire_code(code) not in (1005, 1006, 1015)


@pytest.mark.parametrize(("configured", "aiohttp_value"), [(0, 0), (1, 2), (65536, 65537)])
def test_message_limit_allows_exactly_the_configured_size(
    configured: int, aiohttp_value: int
) -> None:
    """aiohttp refuses a message whose size reaches max_msg_size; 0 stays unlimited."""
    assert aiohttp_message_limit(configured) == aiohttp_value


def test_close_reason_fits_a_control_frame() -> None:
    assert close_reason("sandbox abc123 was paused") == b"sandbox abc123 was paused"
    long = close_reason("x" * 500)
    assert len(long) == 123  # 125 bytes of payload, 2 of them the code
    # Cut on a character boundary: still valid UTF-8.
    multibyte = close_reason("é" * 100)
    assert len(multibyte) <= 123
    multibyte.decode("utf-8")
