"""A minimal RFC 6455 frame codec, shared by the upstream's echo and the bench's client.

No extensions, no fragmentation logic beyond passing ``fin`` through: the echo server
answers each frame with the same opcode and ``fin``, and the clients only send single
frame messages. ``FrameParser`` unmasks masked frames.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import NamedTuple

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_LEN16 = struct.Struct("!H")
_LEN64 = struct.Struct("!Q")


class Frame(NamedTuple):
    fin: bool
    opcode: int
    payload: bytes


def new_key() -> bytes:
    """A fresh ``Sec-WebSocket-Key``."""
    return base64.b64encode(os.urandom(16))


def accept_key(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` answer to ``key``."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (masking and unmasking alike)."""
    size = len(data)
    if not size:
        return data
    repeated = (mask * (size // 4 + 1))[:size]
    value = int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")
    return value.to_bytes(size, "little")


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = False) -> bytes:
    """One frame; clients must set ``mask`` (a random key is drawn)."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    mask_bit = 0x80 if mask else 0
    if size < 126:
        head = bytes((first, mask_bit | size))
    elif size < 65536:
        head = bytes((first, mask_bit | 126)) + _LEN16.pack(size)
    else:
        head = bytes((first, mask_bit | 127)) + _LEN64.pack(size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + apply_mask(payload, key)


class FrameParser:
    """Incremental parser: ``feed`` bytes as they arrive, get the complete frames back.

    Raises ``ValueError`` from ``feed`` for a frame longer than ``max_payload``.
    """

    __slots__ = ("_buffer", "_max_payload")

    def __init__(self, *, max_payload: int = 64 * 1024 * 1024) -> None:
        self._buffer = bytearray()
        self._max_payload = max_payload

    def feed(self, data: bytes) -> list[Frame]:
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        offset = 0
        end = len(buffer)
        while end - offset >= 2:
            first, second = buffer[offset], buffer[offset + 1]
            size = second & 0x7F
            head = 2
            if size == 126:
                if end - offset < 4:
                    break
                (size,) = _LEN16.unpack_from(buffer, offset + 2)
                head = 4
            elif size == 127:
                if end - offset < 10:
                    break
                (size,) = _LEN64.unpack_from(buffer, offset + 2)
                head = 10
            if size > self._max_payload:
                raise ValueError(f"frame of {size} bytes is over the limit")
            masked = second & 0x80
            start = offset + head + (4 if masked else 0)
            if end - start < size:
                break
            payload = bytes(buffer[start : start + size])
            if masked:
                payload = apply_mask(payload, bytes(buffer[start - 4 : start]))
            frames.append(Frame(bool(first & 0x80), first & 0x0F, payload))
            offset = start + size
        if offset:
            del buffer[:offset]
        return frames
