"""What the front's request-line check leaves to llhttp (gateway/proxy/front.py)."""

from __future__ import annotations

import random

import httptools

from gateway.proxy import front

_LINES = (b"GET / HTTP/1.1", b"GET /a/b?c=d HTTP/1.1", b"POST http://x/y HTTP/1.0",
          b"OPTIONS * HTTP/1.1", b"GET /%20x#f HTTP/1.1")  # fmt: skip
_BREAKS = (b"\r", b"\n", b"\r\r", b"\n\r")


class _Message:
    def __init__(self) -> None:
        self.complete = False
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.complete = True


def _served_by_llhttp(head: bytes, *, after_a_request: bool) -> bool:
    message = _Message()
    parser = httptools.HttpRequestParser(message)
    if after_a_request:  # the front reuses a parser for heads with a known block
        parser.feed_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        message.complete = False
    try:
        parser.feed_data(head)
    except httptools.HttpParserError:
        return False
    return message.complete


def test_llhttp_refuses_a_cr_or_lf_anywhere_in_a_request_line_but_its_start() -> None:
    """A CR or LF inserted in or replacing any byte of a request line, but the first, is
    refused; so for a known header block the front only checks a head's first byte."""
    checked = 0
    for line in _LINES:
        for at in range(1, len(line) + 1):
            for cut in _BREAKS:
                for bad in (line[:at] + cut + line[at:], line[:at] + cut + line[at + 1 :]):
                    head = bad + b"\r\nHost: x\r\n\r\n"
                    for after in (False, True):
                        checked += 1
                        assert not _served_by_llhttp(head, after_a_request=after), head
    assert checked > 1000


def test_llhttp_skips_a_cr_or_lf_before_a_request_line() -> None:
    """Why the front looks at the first byte itself: llhttp serves such a head."""
    for lead in (b"\r", b"\n"):
        assert _served_by_llhttp(lead + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", after_a_request=False)


def _llhttp_line(line: bytes) -> tuple[str, str] | None:
    """The method and target llhttp reads from ``line`` in a complete HTTP/1.1 head."""
    message = _Message()
    parser = httptools.HttpRequestParser(message)
    try:
        parser.feed_data(line + b"Host: x\r\n\r\n")
    except httptools.HttpParserError:
        return None
    if not message.complete or parser.get_http_version() != "1.1":
        return None
    return parser.get_method().decode("ascii"), message.url.decode("ascii")


def _mutations(line: bytes) -> list[bytes]:
    """``line`` with each byte replaced by, and with each byte inserted before, every
    byte value."""
    return [
        line[:at] + bytes([value]) + line[at + skip :]
        for at in range(len(line))
        for value in range(256)
        for skip in (0, 1)
    ]


def test_a_plain_line_is_taken_by_llhttp_as_it_is() -> None:
    """Whatever ``_plain_line`` takes (method and target), llhttp parses from that line the
    same way: every method, printable targets, and every one-byte change of a few lines."""
    rng = random.Random(5)
    printable = bytes(range(0x21, 0x7F))
    lines = [f"{method} /a/b?c=d#e HTTP/1.1\r\n".encode() for _, method in front._PLAIN_STARTS]
    lines += [
        b"GET /" + bytes(rng.choices(printable, k=rng.randint(0, 40))) + b" HTTP/1.1\r\n"
        for _ in range(3000)
    ]
    for base in (b"GET /x?y HTTP/1.1\r\n", b"DELETE / HTTP/1.1\r\n"):
        lines += _mutations(base)
    taken = 0
    for line in lines:
        plain = front._plain_line(line)
        if plain is not None:
            taken += 1
            assert plain == _llhttp_line(line), line
    assert 3000 < taken < len(lines) - 3000


def test_other_lines_are_left_to_llhttp() -> None:
    """Lines that are not plain HTTP/1.1 origin-form ones get no answer from
    ``_plain_line``, whether llhttp takes them or not."""
    for line in (b"GET http://x/ HTTP/1.1\r\n", b"OPTIONS * HTTP/1.1\r\n",
                 b"GET / HTTP/1.0\r\n", b"GET  / HTTP/1.1\r\n", b"GET / HTTP/1.1 \r\n",
                 b"GET /a b HTTP/1.1\r\n", b"GET /a\tb HTTP/1.1\r\n",
                 b"GET /\x7f HTTP/1.1\r\n", b"GET /\xc3\xa9 HTTP/1.1\r\n",
                 b"CONNECT / HTTP/1.1\r\n", b"get / HTTP/1.1\r\n", b"GET /\r\n",
                 b"GET / HTTP/1.1\n", b"GET\r\n"):  # fmt: skip
        assert front._plain_line(line) is None, line


def test_other_protocols_are_named_from_the_request_line() -> None:
    """``_other_protocol`` names the version a line asks for when it is not HTTP/1.x,
    and HTTP/0.9 for a line with none."""
    cases = {
        b"GET /a\r\n": ("GET", "/a", "HTTP/0.9"),
        b"GET /x HTTP/0.9\r\n": ("GET", "/x", "HTTP/0.9"),
        b"GET /x HTTP/2.0\r\n": ("GET", "/x", "HTTP/2.0"),
        b"PRI * HTTP/2.0\r\n": ("PRI", "*", "HTTP/2.0"),
        b"GET /x HTTP/1.2\r\n": ("GET", "/x", "HTTP/1.2"),
        b"DESCRIBE rtsp://x/ RTSP/1.0\r\n": ("DESCRIBE", "rtsp://x/", "RTSP/1.0"),
    }
    for line, named in cases.items():
        assert front._other_protocol(line) == named, line
    for line in (b"GET /x HTTP/1.1\r\n", b"GET /x HTTP/1.0\r\n", b"GET /x HTTP/1.10\r\n",
                 b"GET /x HTTP/2\r\n", b"GET  /x HTTP/2.0\r\n", b"GET /x HTTP/2.0 \r\n",
                 b"get /x HTTP/2.0\r\n", b"GET /a\tb HTTP/2.0\r\n", b"GET /x http/2.0\r\n",
                 b"GET\r\n", b"GET /x HTTP/2.0\n", b"GET /x HTTP/2.0\r\nX: y\r\n"):  # fmt: skip
        assert front._other_protocol(line) is None, line


def test_no_line_llhttp_serves_as_http1x_is_taken_for_another_protocol() -> None:
    """Every one-byte change of a few lines: where llhttp parses the line and it ends in
    HTTP/1.0 or HTTP/1.1 (what the front serves), ``_other_protocol`` leaves it alone."""
    served = 0
    for base in (b"GET /x?y HTTP/1.1\r\n", b"OPTIONS * HTTP/1.0\r\n", b"GET /x HTTP/2.0\r\n"):
        for line in _mutations(base):
            head = line + b"Host: x\r\n\r\n"
            served_here = line.endswith((b" HTTP/1.0\r\n", b" HTTP/1.1\r\n"))
            if served_here and _served_by_llhttp(head, after_a_request=False):
                served += 1
                assert front._other_protocol(line) is None, line
    assert served > 500
