"""What the front's request-line check leaves to llhttp (gateway/proxy/front.py)."""

from __future__ import annotations

import httptools

_LINES = (b"GET / HTTP/1.1", b"GET /a/b?c=d HTTP/1.1", b"POST http://x/y HTTP/1.0",
          b"OPTIONS * HTTP/1.1", b"GET /%20x#f HTTP/1.1")  # fmt: skip
_BREAKS = (b"\r", b"\n", b"\r\r", b"\n\r")


class _Message:
    def __init__(self) -> None:
        self.complete = False

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
