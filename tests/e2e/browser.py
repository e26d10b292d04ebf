"""Browser-side helpers: a WebSocket recorder injected into pages, polling navigations.

``SOCKET_RECORDER`` runs before any page script (``page.add_init_script``) and wraps
``window.WebSocket`` so a test can read, from the page itself, every socket the page
opened: its URL, the subprotocols it asked for, the one the server chose, and how it
closed. Playwright's ``page.on("websocket")`` sees the same sockets from the outside but
not their subprotocol.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Page, Response, WebSocket

__all__ = [
    "SOCKET_RECORDER",
    "RecordedSocket",
    "SocketLog",
    "open_until",
    "recorded_sockets",
]

SOCKET_RECORDER = """
(() => {
  const Native = window.WebSocket;
  const sockets = [];
  Object.defineProperty(window, "__sockets", { value: sockets });
  window.WebSocket = class extends Native {
    constructor(url, protocols) {
      super(url, protocols);
      const entry = {
        url: String(url), requested: protocols ?? null, protocol: null,
        opened: false, closeCode: null, closeReason: null,
      };
      sockets.push(entry);
      this.addEventListener("open", () => { entry.opened = true; entry.protocol = this.protocol; });
      this.addEventListener("close", (event) => {
        entry.closeCode = event.code; entry.closeReason = event.reason;
      });
    }
  };
})();
"""


class RecordedSocket(TypedDict):
    url: str
    requested: str | list[str] | None
    protocol: str | None
    opened: bool
    closeCode: int | None
    closeReason: str | None


async def recorded_sockets(page: Page) -> list[RecordedSocket]:
    """The sockets the page opened so far (needs ``SOCKET_RECORDER``)."""
    sockets: list[RecordedSocket] = await page.evaluate("() => window.__sockets")
    return sockets


@dataclass
class SocketLog:
    """What Playwright saw of a page's WebSockets, from outside the page."""

    sockets: list[WebSocket] = field(default_factory=list)
    frames: list[tuple[str, str | bytes]] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("websocket", self._on_socket)

    def _on_socket(self, socket: WebSocket) -> None:
        self.sockets.append(socket)
        url = socket.url
        socket.on("framereceived", lambda payload: self.frames.append((url, payload)))

    def received_text(self, url_prefix: str) -> list[str]:
        return [
            payload
            for url, payload in self.frames
            if url.startswith(url_prefix) and isinstance(payload, str)
        ]


async def open_until(
    page: Page,
    url: str,
    check: Callable[[Response], bool],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 (a deadline between polls)
    what: str = "",
) -> Response:
    """Navigate to ``url`` until the response passes ``check``; return it.

    A route change (close, pause, resume) reaches the gateway a few milliseconds after the
    CLI returns, so the first reload may still see the old route: poll, bounded. A
    navigation the page's own script interrupted (Vite reloads itself when its server comes
    back) counts as a miss.

    Raises:
        AssertionError: no response passed ``check`` within ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        try:
            response = await page.goto(url, wait_until="load")
        except PlaywrightError as exc:
            last = exc
        else:
            if response is not None and check(response):
                return response
            last = None if response is None else (response.status, response.headers)
        if loop.time() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what or 'the page'} at {url}; "
                f"last answer: {last}"
            )
        await asyncio.sleep(0.1)


async def wait_for_sockets(
    page: Page,
    check: Callable[[list[RecordedSocket]], bool],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 (a deadline between polls)
    what: str = "",
) -> list[RecordedSocket]:
    """Poll the page's recorded sockets until ``check`` holds; the failure shows them all.

    Raises:
        AssertionError: ``check`` never held within ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        sockets: list[RecordedSocket] = []
        with contextlib.suppress(PlaywrightError):  # the page may be between documents
            sockets = await recorded_sockets(page)
            if check(sockets):
                return sockets
        if loop.time() >= deadline:
            raise AssertionError(f"timed out waiting for {what or check}; sockets: {sockets}")
        await asyncio.sleep(0.1)
