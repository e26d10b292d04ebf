"""A bounded fuzz of the whole request path (issue 9, point 5): raw bytes to a real gateway.

Hypothesis builds requests from valid parts (methods, targets, versions, header names
and values with odd bytes, Content-Length / Transfer-Encoding framing, bare LF line
ends) and then mutates bytes. Each is sent on its own TCP connection to a gateway in
front of a recording upstream (httptools, strict). Properties: the gateway answers a
well-formed HTTP/1.x status line or just closes, within a bound; never a 500; /healthz
keeps answering; the upstream never gets bytes it cannot parse.

Bounded in CI: ``GATEWAY_TEST_FUZZ_EXAMPLES`` (default 200) examples and at most
``GATEWAY_TEST_FUZZ_SECONDS`` (default 60) seconds; raise both for a longer run.

The gateway runs in a thread with its own event loop, because hypothesis drives plain
(sync) test functions; the test talks to it with blocking sockets.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faults.figures import record
from tests.support.gateway import route_writer, running_gateway
from tests.support.recording import RecordingUpstream

EXAMPLES = int(os.environ.get("GATEWAY_TEST_FUZZ_EXAMPLES", "200"))
TIME_BUDGET_SECONDS = float(os.environ.get("GATEWAY_TEST_FUZZ_SECONDS", "60"))
# Longest a single exchange may take: the 2 s header timeout below plus slack.
EXCHANGE_BOUND_SECONDS = 6.0
# Every reply is HTTP/1.0 or 1.1, whatever version the request named (a 505 for others).
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-5][0-9][0-9][ \r\n]")


@dataclass
class _Target:
    port: int
    admin_url: str
    host: str
    mirror: RecordingUpstream


@pytest.fixture(scope="module")
def target(redis_url: str) -> Iterator[_Target]:
    """A gateway and recording upstream served by a loop in a background thread."""
    ready: dict[str, _Target] = {}
    started, stop = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    async def serve() -> None:
        # A client that half-closes inside a body is only dropped after the read idle
        # timeout (900 s by default; reported in docs/resilience.md), so it is 2 s here.
        overrides = {
            "server": {"header_timeout_seconds": 2.0},
            "upstream": {"read_idle_timeout_seconds": 2.0},
        }
        async with (
            RecordingUpstream.start("127.0.0.2") as mirror,
            running_gateway(redis_url, overrides) as gateway,
            route_writer(redis_url) as writer,
        ):
            await writer.create("fuzz0001", address="127.0.0.2")
            await writer.expose("fuzz0001", mirror.port)
            ready["t"] = _Target(
                gateway.port, gateway.admin_url, gateway.host(mirror.port, "fuzz00"), mirror
            )
            started.set()
            await asyncio.to_thread(stop.wait)

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # reported to the test thread
            failure.append(exc)
            started.set()

    thread = threading.Thread(target=run, name="fuzz-gateway", daemon=True)
    thread.start()
    assert started.wait(30), "the fuzz gateway did not start"
    if failure:
        raise failure[0]
    try:
        yield ready["t"]
    finally:
        stop.set()
        thread.join(15)


odd_text = st.binary(max_size=24).map(lambda b: b.decode("latin-1"))
_TCHAR = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-!#$%&'*+.^_`|~"
token = st.text(alphabet=_TCHAR, min_size=1, max_size=12)
methods = st.one_of(
    st.sampled_from(
        [
            "GET",
            "HEAD",
            "POST",
            "PUT",
            "DELETE",
            "OPTIONS",
            "PATCH",
            "CONNECT",
            "TRACE",
            "get",
            "G ET",
            "",
        ]
    ),
    token,
)
targets = st.one_of(
    st.sampled_from(["/", "/a?b=c", "*", "http://x/", "//", "/%00", "/../..", "/a b", "/\x7f"]),
    odd_text.map(lambda t: "/" + t),
)
versions = st.sampled_from(
    ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.10", "http/1.1", "HTTP/1", ""]
)
header_names = st.one_of(
    st.sampled_from(
        [
            "Content-Length",
            "Transfer-Encoding",
            "Connection",
            "Upgrade",
            "Expect",
            "Host",
            "Cookie",
            "X-Forwarded-For",
            "Te",
            "Trailer",
            " Host",
            "Host ",
        ]
    ),
    token,
    token,
    odd_text,
)
header_values = st.one_of(
    st.sampled_from(
        [
            "0",
            "5",
            "-1",
            "chunked",
            "gzip, chunked",
            "chunked, identity",
            "close",
            "keep-alive",
            "websocket",
            "100-continue",
            "1e3",
            "0x10",
            "  7  ",
        ]
    ),
    odd_text,
)
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=64),
    st.sampled_from([b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n"]),
)


@st.composite
def raw_requests(draw: st.DrawFn, host: str) -> bytes:
    """A request from valid and odd parts, then possibly mutated byte by byte."""
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    lines = [f"{draw(methods)} {draw(targets)} {draw(versions)}".encode("latin-1")]
    lines.append(b"Host: " + host.encode())
    for name, value in draw(st.lists(st.tuples(header_names, header_values), max_size=6)):
        lines.append(f"{name}: {value}".encode("latin-1"))
    data = bytearray(eol.join(lines) + eol + eol + draw(bodies))
    # Most requests unmutated, so many get through to the upstream.
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        where = draw(st.integers(0, max(len(data) - 1, 0)))
        kind = draw(st.sampled_from(["flip", "insert", "delete"]))
        byte = draw(st.integers(0, 255))
        if kind == "flip" and data:
            data[where] = byte
        elif kind == "insert":
            data[where:where] = bytes([byte])
        elif data:
            del data[where]
    return bytes(data)


def _exchange(port: int, data: bytes) -> tuple[bytes, float]:
    """Send ``data``, half-close, read until the gateway closes; (reply, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=EXCHANGE_BOUND_SECONDS) as sock:
        reply = bytearray()
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while len(reply) < 1_000_000:  # bounded: 1 MB
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(
                f"no close within {EXCHANGE_BOUND_SECONDS} s for {data!r}"
            ) from None
    return bytes(reply), time.monotonic() - started


def _healthy(admin_url: str) -> bool:
    with urllib.request.urlopen(admin_url + "/healthz", timeout=5) as response:
        return bool(response.status == 200)


_COUNTS: dict[str, int] = {"examples": 0, "answered": 0, "closed": 0}


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_raw_requests_get_an_answer_or_a_close(target: _Target, data: st.DataObject) -> None:
    """Any mutated request: a well-formed status line (never 500) or a close, in bounded
    time; the gateway stays healthy; the upstream parses everything it gets."""
    if time.monotonic() - _START[0] > TIME_BUDGET_SECONDS:
        return  # the time bound of a CI run: later examples do nothing
    raw = data.draw(raw_requests(target.host))
    reply, seconds = _exchange(target.port, raw)
    _COUNTS["examples"] += 1
    assert seconds < EXCHANGE_BOUND_SECONDS
    if reply:
        _COUNTS["answered"] += 1
        assert _STATUS_LINE.match(reply), f"malformed reply {reply[:80]!r} to {raw!r}"
        assert reply[8:13] != b" 500 ", f"500 for {raw!r}"
    else:
        _COUNTS["closed"] += 1
    # "upgrade": httptools parsed a complete, valid upgrade request (a WebSocket handshake
    # the gateway passed on) and stops there; that is no parse failure.
    errors = [
        c.parse_error for c in target.mirror.connections if c.parse_error not in (None, "upgrade")
    ]
    assert not errors, f"the upstream could not parse what it got after {raw!r}: {errors}"


_START = [time.monotonic()]


def test_fuzz_run_left_the_gateway_healthy(target: _Target) -> None:
    """After the fuzz run (same module, so same gateway) /healthz answers; figures recorded."""
    assert _healthy(target.admin_url)
    record(
        "fuzz_request_path",
        examples=_COUNTS["examples"],
        answered=_COUNTS["answered"],
        closed_without_answer=_COUNTS["closed"],
        upstream_requests=len(target.mirror.requests),
        upstream_parse_errors=0,
    )
