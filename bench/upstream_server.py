"""The benchmark's upstream: a small HTTP/1.1 + WebSocket server on uvloop and httptools.

Run as ``python -m bench.upstream_server --host 127.0.0.2 --port 0``. It prints one JSON
line ``{"event": "ready", "port": N}`` on stdout once it listens, and runs until SIGTERM
or SIGINT. Routes (any method):

    /                -> 200 "hello world!\\n"
    /bytes?size=N    -> 200 with N zero bytes (Content-Length), streamed with flow control
    /upload          -> the request body is read and discarded; 200 with its size as text
    /ws              -> WebSocket echo: text/binary frames back as sent, ping -> pong,
                        close -> close
    anything else    -> 404

Connections are kept alive unless the client asks to close. Pipelined requests are
answered in order: reading pauses while a streamed body is being sent. Reads go into one
preallocated buffer (``asyncio.BufferedProtocol``), and once the head of an ``/upload``
with a Content-Length has been parsed the rest of its body is only counted, not parsed,
so the direct baseline of the bulk upload is not limited by this server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import typing

import httptools
import uvloop

from bench import wsproto

HELLO = b"hello world!\n"
_HELLO_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
_KEEP = _HELLO_HEAD + b"\r\n" + HELLO
_CLOSE = _HELLO_HEAD + b"Connection: close\r\n\r\n" + HELLO
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n"
_BAD_UPGRADE = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_CHUNK = 1024 * 1024
_ZEROS = memoryview(bytes(_CHUNK))
_WS_KEY = b"sec-websocket-key"
_READ_BYTES = 256 * 1024


class UpstreamProtocol(asyncio.BufferedProtocol):
    """One client connection; see the module docstring for what it answers."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.buffer = bytearray(_READ_BYTES)
        self.view = memoryview(self.buffer)
        self.url = b""
        self.ws_key: bytes | None = None
        self.body_bytes = 0
        self.content_length: int | None = None
        self.counting = 0  # upload body bytes still to count without parsing
        self.counting_keep_alive = True
        self.upload_pending = False  # an /upload whose body outlived the parsed chunk
        self.frames: wsproto.FrameParser | None = None
        self.remaining = 0  # bytes of a /bytes body still to send
        self.streaming = False
        self.close_after = False
        self.can_write = True

    # asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=4 * _CHUNK, low=_CHUNK)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        start = 0
        if self.counting:
            start = min(nbytes, self.counting)
            self.counting -= start
            self.body_bytes += start
            if self.counting:
                return
            self._answer_upload(self.counting_keep_alive)
            if start == nbytes:
                return
        self.data_received(bytes(self.view[start:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self.frames is not None:
            self._ws_received(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(data[int(exc.args[0]) :])
            return
        except httptools.HttpParserError:
            self._transport().close()
            return
        if self.upload_pending:
            # The rest of this body is only counted; a fresh parser takes the next request.
            self.upload_pending = False
            self.counting = (self.content_length or 0) - self.body_bytes
            self.counting_keep_alive = self.parser.should_keep_alive()
            self.parser = httptools.HttpRequestParser(self)

    def pause_writing(self) -> None:
        self.can_write = False

    def resume_writing(self) -> None:
        self.can_write = True
        self._pump()

    # httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.ws_key = None
        self.body_bytes = 0
        self.content_length = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == len(_WS_KEY) and name.lower() == _WS_KEY:
            self.ws_key = value
        elif len(name) == 14 and name.lower() == b"content-length" and value.isdigit():
            self.content_length = int(value)

    def on_headers_complete(self) -> None:
        if self.content_length and self.url.partition(b"?")[0] == b"/upload":
            self.upload_pending = True

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        self.upload_pending = False  # the whole body was in the parsed bytes after all
        if self.parser.should_upgrade():
            return  # answered by _upgrade once the parser hands over the connection
        keep_alive = self.parser.should_keep_alive()
        transport = self._transport()
        path, _, query = self.url.partition(b"?")
        if path == b"/":
            transport.write(_KEEP if keep_alive else _CLOSE)
        elif path == b"/bytes":
            self._start_stream(_size_of(query), keep_alive)
            return
        elif path == b"/upload":
            self._answer_upload(keep_alive)
            return
        else:
            transport.write(_NOT_FOUND)
        if not keep_alive:
            transport.close()

    # Private methods ------------------------------------------------------------------

    def _transport(self) -> asyncio.Transport:
        assert self.transport is not None
        return self.transport

    def _answer_upload(self, keep_alive: bool) -> None:
        transport = self._transport()
        text = b"%d\n" % self.body_bytes
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))
        if not keep_alive:
            transport.close()

    def _start_stream(self, size: int, keep_alive: bool) -> None:
        transport = self._transport()
        transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % size
        )
        self.remaining = size
        self.streaming = True
        self.close_after = not keep_alive
        transport.pause_reading()
        self._pump()

    def _pump(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        while self.remaining and self.can_write:
            size = min(self.remaining, _CHUNK)
            transport.write(_ZEROS if size == _CHUNK else _ZEROS[:size])
            self.remaining -= size
        if self.remaining == 0 and self.streaming:
            self.streaming = False
            if self.close_after:
                transport.close()
            else:
                transport.resume_reading()

    def _upgrade(self, rest: bytes) -> None:
        transport = self._transport()
        if self.url.partition(b"?")[0] != b"/ws" or self.ws_key is None:
            transport.write(_BAD_UPGRADE)
            transport.close()
            return
        transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
            + wsproto.accept_key(self.ws_key)
            + b"\r\n\r\n"
        )
        self.frames = wsproto.FrameParser()
        if rest:
            self._ws_received(rest)

    def _ws_received(self, data: bytes) -> None:
        assert self.frames is not None
        transport = self._transport()
        try:
            frames = self.frames.feed(data)
        except ValueError:
            transport.close()
            return
        out: list[bytes] = []
        for frame in frames:
            if frame.opcode == wsproto.OP_PING:
                out.append(wsproto.encode_frame(wsproto.OP_PONG, frame.payload))
            elif frame.opcode == wsproto.OP_CLOSE:
                out.append(wsproto.encode_frame(wsproto.OP_CLOSE, frame.payload[:125]))
                transport.write(b"".join(out))
                transport.close()
                return
            elif frame.opcode != wsproto.OP_PONG:
                out.append(wsproto.encode_frame(frame.opcode, frame.payload, fin=frame.fin))
        if out:
            transport.write(b"".join(out))


def _size_of(query: bytes) -> int:
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if name == b"size" and value.isdigit():
            return int(value)
    return 0


async def serve(host: str, port: int) -> None:
    """Listen on ``host:port``, print the ready line, run until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(json.dumps({"event": "ready", "port": bound}) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="the benchmark's upstream server")
    parser.add_argument("--host", default="127.0.0.2")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
