"""The public listener's connection setup: one place that wraps every accepted socket.

aiohttp's server has no header-read timeout, no connection cap and no PROXY protocol.
``Listener`` is the protocol factory handed to ``loop.create_server``; each connection
gets a ``_Connection`` that sits in front of aiohttp's ``RequestHandler`` and

- closes connections over ``max_connections`` at once (the process stays responsive);
- with PROXY protocol on, requires the header on every connection, believes it only from
  trusted peers, waits for it a bounded time, and then presents the client's address to
  aiohttp as the peer (``request.remote`` and the access log become right);
- closes a connection whose request head has not fully arrived ``header_timeout_seconds``
  after the connection opened (after the PROXY header, when there is one), or after the
  first byte of a later request on a kept-alive connection (slowloris, and connections
  that never send anything: aiohttp would hold those for ever). The handler tells the
  listener when a request's head is in (``request_started``) and when it is done
  (``request_finished``); idle keep-alive time between requests is aiohttp's own
  ``keepalive_timeout``, not this timer.
"""

from __future__ import annotations

import abc
import asyncio
import ipaddress
import logging
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mypy_extensions import trait

from gateway import proxyproto

log = logging.getLogger("gateway.listener")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ListenerPolicy:
    header_timeout_seconds: float
    max_connections: int
    proxy_protocol: bool = False
    proxy_header_timeout_seconds: float = 5.0
    trusted_networks: Sequence[IPNetwork] = ()


class _PeerTransport(asyncio.Transport):
    """A transport as seen through a PROXY header: the client's address as the peer."""

    def __init__(self, inner: asyncio.Transport, peername: tuple[str, int]) -> None:
        super().__init__()
        self._inner = inner
        self._peername = peername

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peername
        return self._inner.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._inner.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._inner.writelines(list_of_data)

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def write_eof(self) -> None:
        self._inner.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()


class Listener:
    """Protocol factory for the public listener; see the module docstring."""

    def __init__(self, inner_factory: Callable[[], asyncio.Protocol], policy: ListenerPolicy):
        self._inner_factory = inner_factory
        self.policy = policy
        self.active = 0
        self.refused = 0
        self.header_timeouts = 0
        self._by_transport: dict[asyncio.BaseTransport, _Connection] = {}

    def __call__(self) -> asyncio.Protocol:
        return _Connection(self)

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        connection = self._by_transport.get(transport) if transport is not None else None
        if connection is not None:
            connection.in_request = True
            connection._started += 1
            connection.disarm()

    def request_finished(
        self, transport: asyncio.BaseTransport | None, *, head_begun: bool = False
    ) -> None:
        """The request on ``transport`` is answered; ``head_begun``: the start of the next
        one is buffered already, so the header timeout runs from now."""
        connection = self._by_transport.get(transport) if transport is not None else None
        if connection is not None:
            connection.in_request = False
            if head_begun:
                connection.arm_header_timeout()


@trait
class Reader:
    """An inner protocol whose reads the listener passes on by a C call
    (``front.FrontProtocol``); through ``asyncio.Protocol`` each is a generic call."""

    @abc.abstractmethod
    def data_received(self, data: bytes) -> None: ...


class _Connection(asyncio.Protocol):
    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._inner: asyncio.Protocol | None = None
        self._reader: Reader | None = None  # the inner protocol, when it is a Reader
        self._transport: asyncio.Transport | None = None
        self._seen: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._proxy_buffer: bytes | None = None
        self._counted = False
        self.in_request = False
        self._started = 0  # requests whose head was complete (request_started)

    # asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = typing.cast(asyncio.Transport, transport)
        listener = self._listener
        if listener.active >= listener.policy.max_connections:
            listener.refused += 1
            self._transport.abort()
            return
        listener.active += 1
        self._counted = True
        if listener.policy.proxy_protocol:
            if not self._peer_trusted():
                log.warning("refused a PROXY protocol connection from an untrusted peer")
                self._transport.abort()
                return
            self._proxy_buffer = b""
            self._arm(listener.policy.proxy_header_timeout_seconds)
            return
        self._start_inner(self._transport)

    def data_received(self, data: bytes) -> None:
        if self._proxy_buffer is not None:
            self._read_proxy_header(data)
            return
        if self._inner is None:
            return
        if self.in_request or self._timer is not None:
            self._pass_on(data)
            return
        # The first bytes of a request. The timer is armed after they are handled, and
        # only if no request started meanwhile: a whole head in one read (the common
        # case) then costs no timer at all.
        started = self._started
        self._pass_on(data)
        if self._started == started and not self.in_request and self._timer is None:
            self.arm_header_timeout()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        if self._counted:
            self._counted = False
            self._listener.active -= 1
        if self._seen is not None:
            self._listener._by_transport.pop(self._seen, None)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # Private methods ------------------------------------------------------------------

    def _pass_on(self, data: bytes) -> None:
        if self._reader is not None:
            self._reader.data_received(data)
        elif self._inner is not None:
            self._inner.data_received(data)

    def _start_inner(self, transport: asyncio.Transport) -> None:
        self._inner = inner = self._listener._inner_factory()
        self._reader = inner if isinstance(inner, Reader) else None
        self._seen = transport
        self._listener._by_transport[transport] = self
        # The first request head is due within the header timeout of the connection itself.
        self.arm_header_timeout()
        self._inner.connection_made(transport)

    def _read_proxy_header(self, data: bytes) -> None:
        assert self._transport is not None and self._proxy_buffer is not None
        buffer = self._proxy_buffer + data
        try:
            parsed = proxyproto.parse(buffer)
        except proxyproto.ProxyProtocolError as exc:
            log.warning("closed a connection: %s", exc)
            self._transport.abort()
            return
        if isinstance(parsed, proxyproto.NeedMore):
            self._proxy_buffer = buffer
            return
        header, used = parsed
        self._proxy_buffer = None
        self.disarm()
        seen: asyncio.Transport = self._transport
        if header.source is not None:
            seen = _PeerTransport(self._transport, header.source)
        self._start_inner(seen)
        if rest := buffer[used:]:
            self.data_received(rest)

    def _peer_trusted(self) -> bool:
        assert self._transport is not None
        peer = self._transport.get_extra_info("peername")
        try:
            ip = ipaddress.ip_address(peer[0])
        except (TypeError, ValueError, IndexError):
            return False
        return any(ip in net for net in self._listener.policy.trusted_networks)

    def arm_header_timeout(self) -> None:
        self._arm(self._listener.policy.header_timeout_seconds)

    def _arm(self, seconds: float) -> None:
        self.disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        self._listener.header_timeouts += 1
        if self._transport is not None:
            self._transport.abort()
