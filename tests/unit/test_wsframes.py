"""gateway/proxy/wsframes.py: frame boundaries, limits and close frames, without sockets."""

from __future__ import annotations

import os

from gateway.proxy import wsframes
from gateway.proxy.wsframes import Boundary, Broken, Close, FrameReader, TooBig


def _frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        head = bytes((first, (0x80 if masked else 0) | size))
    elif size < 65536:
        head = bytes((first, (0x80 if masked else 0) | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, (0x80 if masked else 0) | 127)) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + wsframes.unmask(payload, key)


def test_data_frames_pass_unchanged_and_are_counted() -> None:
    """Whole frames come back byte for byte, with their payload sizes counted."""
    wire = _frame(0x1, b"hello") + _frame(0x2, bytes(300)) + _frame(0x2, bytes(70000))
    reader = FrameReader(masked=True, max_message_bytes=0)
    assert reader.feed(wire) == (wire, None)
    assert reader.payload_bytes == 5 + 300 + 70000


def test_a_header_split_across_reads_is_held_back_until_complete() -> None:
    """Fed one byte at a time, the output is the input, and never half a header."""
    wire = _frame(0x2, bytes(200)) + _frame(0x1, b"x")
    reader = FrameReader(masked=True, max_message_bytes=0)
    out = b""
    for i in range(len(wire)):
        passed, event = reader.feed(wire[i : i + 1])
        assert event is None
        out += passed
    assert out == wire


def test_a_message_over_the_limit_is_refused_before_any_of_its_bytes() -> None:
    """Fragments summing past the limit: TooBig, and the offending frame is not passed."""
    first = _frame(0x2, bytes(60), fin=False)
    reader = FrameReader(masked=True, max_message_bytes=100)
    passed, event = reader.feed(first + _frame(0x0, bytes(41)))
    assert (passed, event) == (first, TooBig())


def test_a_message_at_the_limit_passes() -> None:
    """Exactly max_message_bytes: forwarded."""
    wire = _frame(0x2, bytes(100))
    assert FrameReader(masked=True, max_message_bytes=100).feed(wire) == (wire, None)


def test_a_close_frame_is_returned_whole_with_code_and_reason() -> None:
    """Data before a close passes; the close comes back unmasked, even when split."""
    data = _frame(0x1, b"last")
    close = _frame(0x8, (4000).to_bytes(2, "big") + b"bye")
    reader = FrameReader(masked=True, max_message_bytes=0)
    assert reader.feed(data + close[:3]) == (data, None)
    assert reader.feed(close[3:]) == (b"", Close(4000, b"bye"))


def test_an_empty_close_has_no_code() -> None:
    """A close frame without a payload: Close(None)."""
    close = _frame(0x8, b"", masked=False)
    assert FrameReader(masked=False, max_message_bytes=0).feed(close) == (b"", Close(None, b""))


def test_protocol_breaks_are_named() -> None:
    """Wrong-side masking, reserved bits, unknown opcodes, big or fragmented control
    frames and a stray continuation: Broken, nothing passed."""
    cases = [
        (True, _frame(0x1, b"x", masked=False)),
        (True, bytes((0xC1, 0x81)) + os.urandom(4) + b"x"),
        (True, _frame(0x3, b"x")),
        (True, _frame(0x9, bytes(126))),
        (True, _frame(0x9, b"x", fin=False)),
        (True, _frame(0x0, b"x")),
    ]
    for masked, wire in cases:
        passed, event = FrameReader(masked=masked, max_message_bytes=0).feed(wire)
        assert passed == b"" and isinstance(event, Broken), wire


def test_stop_at_boundary_ends_after_the_frame_in_progress() -> None:
    """Asked mid-frame: the rest of that frame passes, then Boundary; the next does not."""
    frame = _frame(0x2, bytes(1000))
    reader = FrameReader(masked=True, max_message_bytes=0)
    reader.feed(frame[:500])
    assert not reader.at_boundary
    reader.stop_at_boundary()
    assert reader.feed(frame[500:] + _frame(0x1, b"later")) == (frame[500:], Boundary())


def test_close_frames_built_for_each_side() -> None:
    """A server's close is unmasked, a client's masked; both read back the same."""
    for masked in (False, True):
        wire = wsframes.close_frame(1001, b"going away", masked=masked)
        event = FrameReader(masked=masked, max_message_bytes=0).feed(wire)[1]
        assert event == Close(1001, b"going away")


def test_handshake_keys() -> None:
    """The RFC 6455 example key gives its example accept; only 16-byte keys are keys."""
    assert wsframes.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert wsframes.is_valid_key("dGhlIHNhbXBsZSBub25jZQ==")
    assert not wsframes.is_valid_key("c2hvcnQ=")
    assert not wsframes.is_valid_key("not base64!")
