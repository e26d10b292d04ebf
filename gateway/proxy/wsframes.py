"""WebSocket frames as the splice sees them (RFC 6455 section 5): pure, no I/O.

The splice (``gateway.proxy.wssplice``) copies frames from one side to the other as
bytes, unparsed and unmasked-or-not as they came; ``FrameReader`` only follows the
frame boundaries so that the gateway can

- enforce the message size limit (a data frame that takes its message past
  ``max_message_bytes`` is not forwarded at all: its header says its length);
- see close frames whole, to pass their code on, answer them, or rewrite them;
- put a frame of its own (a 1001 or 1012 close) between two frames, never inside one;
- refuse what no extension was negotiated for (RSV bits), unknown opcodes, control
  frames over 125 bytes or fragmented, and masking on the wrong side.

Contract of ``FrameReader.feed``: it returns the bytes that may be forwarded unchanged
(always whole frame headers, and payload bytes of frames already judged) and at most
one ``Event``; after an event the reader is finished and the rest of the input is not
looked at. Frame headers split across reads are held back until complete.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass

from gateway import headers
from gateway.headers import HeaderPairs

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_CONTROL = frozenset((OP_CLOSE, OP_PING, OP_PONG))
_KNOWN = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY)) | _CONTROL
MAX_CONTROL_PAYLOAD = 125
NORMAL, GOING_AWAY, PROTOCOL_ERROR, TOO_BIG, INTERNAL_ERROR = 1000, 1001, 1002, 1009, 1011
SERVICE_RESTART = 1012


@dataclass(frozen=True, slots=True)
class Close:
    """A whole close frame arrived: its code (None: the frame had none) and reason."""

    code: int | None
    reason: bytes


@dataclass(frozen=True, slots=True)
class TooBig:
    """A data frame would take its message past the limit (not forwarded)."""


@dataclass(frozen=True, slots=True)
class Broken:
    """The peer broke the protocol; ``why`` says how."""

    why: str


@dataclass(frozen=True, slots=True)
class Boundary:
    """The frame in progress when ``stop_at_boundary`` was asked for has ended."""


Event = Close | TooBig | Broken | Boundary


class FrameReader:
    """Follows the frames of one direction; see the module docstring."""

    __slots__ = (
        "_close", "_close_need", "_head", "_in_message", "_masked", "_max", "_message_bytes",
        "_skip", "_stopping", "done", "payload_bytes",
    )  # fmt: skip

    def __init__(self, *, masked: bool, max_message_bytes: int) -> None:
        """``masked``: frames from this side must be masked (a client's) or must not be
        (a server's). ``max_message_bytes``: the largest message allowed; 0, no limit."""
        self._masked = masked
        self._max = max_message_bytes
        self._head = b""  # the start of a frame header split across reads
        self._skip = 0  # payload bytes of the current frame still to pass
        self._close: bytearray | None = None  # a close frame being collected
        self._close_need = 0  # its whole size, header included
        self._in_message = False
        self._message_bytes = 0
        self._stopping = False
        self.done = False
        self.payload_bytes = 0  # data payload bytes seen (for accounting)

    @property
    def frame_remaining(self) -> int:
        """Payload bytes of the current frame still to come."""
        return self._skip

    @property
    def at_boundary(self) -> bool:
        return not self._skip and not self._head and self._close is None

    def stop_at_boundary(self) -> None:
        """From now on, ``feed`` ends with ``Boundary`` at the end of the current frame."""
        self._stopping = True

    def feed(self, data: bytes) -> tuple[bytes, Event | None]:
        if self.done:
            return b"", None
        if self._head:
            data, self._head = self._head + data, b""
        size = len(data)
        position = 0
        while position < size:
            if self._skip:
                step = min(self._skip, size - position)
                position += step
                self._skip -= step
                continue
            if self._close is not None:
                return self._collect_close(data, position)
            if self._stopping:
                self.done = True
                return data[:position], Boundary()
            parsed = _parse_header(data, position)
            if parsed is None:
                self._head = data[position:]
                return data[:position], None
            opcode, first, masked, length, header_end = parsed
            event = self._judge(opcode, first, masked, length)
            if event is not None:
                self.done = True
                return data[:position], event
            if opcode == OP_CLOSE:
                self._close = bytearray()
                self._close_need = header_end - position + length
                return self._collect_close(data, position)
            self._skip = length
            position = header_end
        if self._stopping and self.at_boundary:
            self.done = True
            return data, Boundary()
        return data, None

    def _judge(self, opcode: int, first: int, masked: bool, length: int) -> Event | None:
        """None if the frame may pass; else why not. Counts the message size."""
        if masked != self._masked:
            return Broken("a frame masked on the wrong side")
        if first & 0x70:
            return Broken("a frame with reserved bits set (no extension was negotiated)")
        if opcode not in _KNOWN:
            return Broken(f"a frame with the unknown opcode {opcode:#x}")
        if opcode in _CONTROL:
            if length > MAX_CONTROL_PAYLOAD or not first & 0x80:
                return Broken("a control frame over 125 bytes or fragmented")
            return None
        if (opcode == OP_CONTINUATION) != self._in_message:
            return Broken("a continuation frame outside a message, or a message inside one")
        self._message_bytes = length if opcode != OP_CONTINUATION else self._message_bytes + length
        if self._max and self._message_bytes > self._max:
            return TooBig()
        self._in_message = not first & 0x80
        self.payload_bytes += length
        return None

    def _collect_close(self, data: bytes, position: int) -> tuple[bytes, Event | None]:
        """Gather the close frame starting at ``position`` (bytes before it pass)."""
        assert self._close is not None
        passed = data[:position]
        self._close += data[position : position + self._close_need - len(self._close)]
        if len(self._close) < self._close_need:
            return passed, None
        frame = bytes(self._close)
        self.done = True
        self._close = None
        return passed, _close_event(frame, masked=self._masked)


def _parse_header(data: bytes, position: int) -> tuple[int, int, bool, int, int] | None:
    """(opcode, first byte, masked, payload length, end of header) of the frame at
    ``position``, or None if its header is not complete yet."""
    available = len(data) - position
    if available < 2:
        return None
    first, second = data[position], data[position + 1]
    length = second & 0x7F
    end = position + 2
    if length == 126:
        if available < 4:
            return None
        length = int.from_bytes(data[end : end + 2], "big")
        end += 2
    elif length == 127:
        if available < 10:
            return None
        length = int.from_bytes(data[end : end + 8], "big")
        end += 8
    masked = bool(second & 0x80)
    if masked:
        end += 4
        if len(data) < end:
            return None
    return first & 0x0F, first, masked, length, end


def _close_event(frame: bytes, *, masked: bool) -> Event:
    """The event of a whole close frame (its mask side already judged)."""
    header = 2 + (4 if masked else 0)
    payload = frame[header:]
    if masked:
        payload = unmask(payload, frame[2:6])
    if not payload:
        return Close(None, b"")
    if len(payload) == 1:
        return Broken("a close frame with a one-byte payload")
    return Close(int.from_bytes(payload[:2], "big"), payload[2:])


def unmask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte masking ``key`` (RFC 6455 section 5.3)."""
    if not payload:
        return payload
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )


def close_frame(code: int, reason: bytes, *, masked: bool) -> bytes:
    """A close frame with ``code`` and ``reason`` (cut to fit), masked for a server."""
    payload = code.to_bytes(2, "big") + reason[: MAX_CONTROL_PAYLOAD - 2]
    if not masked:
        return bytes((0x80 | OP_CLOSE, len(payload))) + payload
    key = os.urandom(4)
    return bytes((0x80 | OP_CLOSE, 0x80 | len(payload))) + key + unmask(payload, key)


def wire_code(code: int | None) -> int:
    """A close code that may be sent: absent -> 1000; 1005/1006/1015 -> 1011 or 1000."""
    if code is None or code in (0, 1005):
        return NORMAL
    if code in (1006, 1015):
        return INTERNAL_ERROR
    return code


def close_reason(reason: str) -> bytes:
    """``reason`` cut to fit a close frame (125 bytes with the code), on a UTF-8 boundary."""
    return reason.encode()[:123].decode("utf-8", "ignore").encode()


# Headers describing a sandbox's refusal body, which is replaced by the gateway's text.
_BODY_HEADERS = frozenset(
    {"content-length", "content-type", "content-encoding", "transfer-encoding"}
)


def refusal(
    status: int, sandbox_headers: HeaderPairs, *, public_host: str
) -> tuple[list[tuple[str, str]], str]:
    """The fields and text of the answer to a client whose upgrade the sandbox refused
    with ``status`` (a 403 from a dev server's host check, a redirect to a login page):
    the sandbox's fields as relayed, without those describing its body."""
    fields = [
        (name, value)
        for name, value in headers.downstream_response_headers(
            sandbox_headers, public_host=public_host
        )
        if name.lower() not in _BODY_HEADERS
    ]
    return fields, f"the sandbox refused the WebSocket upgrade ({status})\n"


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept answering Sec-WebSocket-Key ``key`` (section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def is_valid_key(key: str) -> bool:
    """Whether ``key`` is a Sec-WebSocket-Key: base64 of 16 bytes."""
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (ValueError, UnicodeEncodeError):
        return False
