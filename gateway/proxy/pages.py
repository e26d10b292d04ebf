"""The gateway's own answers: an HTML page for people, JSON for programs. Pure.

``render`` turns an ``EdgeError`` into status, headers and body. A browser navigation
gets a page that says what happened and what to do about it; everything else gets
``{"error": {"code", "message", "sandboxId", "port", "requestId"}}``. Both carry the code
in ``X-Gateway-Error`` and the request id in ``X-Request-Id``.
"""

from __future__ import annotations

import html
import http
import json
from dataclasses import dataclass

from gateway import errors
from gateway.headers import GATEWAY_ERROR, REQUEST_ID


@dataclass(frozen=True, slots=True)
class Page:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


# Title and advice per code; {port} and {label} are filled in where known.
_ADVICE: dict[str, tuple[str, str]] = {
    "unknown_host": (
        "Unknown host",
        "This address is not a sandbox URL. Sandbox URLs look like "
        "<code>https://3000-abc123.box.runra.dev</code>.",
    ),
    "invalid_host": (
        "Not a valid sandbox address",
        "Sandbox URLs start with the port, a dash and the sandbox label, "
        "for example <code>3000-abc123</code>.",
    ),
    "invalid_port": (
        "Port out of range",
        "Sandboxes expose ports 1024 to 65535.",
    ),
    "sandbox_not_found": (
        "No such sandbox",
        "No sandbox has the label <b>{label}</b>. Check the URL, or create the sandbox first.",
    ),
    "port_not_exposed": (
        "Port {port} is not exposed",
        "Sandbox <b>{label}</b> is running, but port {port} is not exposed. "
        "Expose it with <code>gateway ports expose &lt;sandbox-id&gt; {port}</code>.",
    ),
    "port_not_allowed": (
        "Port {port} is not allowed",
        "The network policy of sandbox <b>{label}</b> does not allow port {port}.",
    ),
    "sandbox_paused": (
        "Sandbox paused",
        "Sandbox <b>{label}</b> is paused. Resume it and this page will work again; "
        "the URL stays the same.",
    ),
    "sandbox_terminated": (
        "Sandbox terminated",
        "Sandbox <b>{label}</b> was terminated and its URLs no longer work.",
    ),
    "upstream_refused": (
        "Nothing is listening on port {port}",
        "Sandbox <b>{label}</b> is running, but no server answers on port {port}. "
        "Start your server bound to <code>0.0.0.0</code> (not only <code>127.0.0.1</code>), "
        "then reload this page.",
    ),
    "upstream_timeout": (
        "The sandbox did not answer in time",
        "The server on port {port} in sandbox <b>{label}</b> is taking too long to answer. "
        "Check that it isn't stuck, then reload.",
    ),
    "upstream_error": (
        "The sandbox sent a broken answer",
        "The server on port {port} in sandbox <b>{label}</b> broke the HTTP protocol "
        "or closed the connection early.",
    ),
    "route_store_unavailable": (
        "Temporarily unavailable",
        "The gateway cannot reach its route table right now. Try again in a few seconds.",
    ),
    "rate_limited": (
        "Too many requests",
        "Slow down a little and try again in a moment.",
    ),
    "unsupported_upgrade": (
        "Unsupported upgrade",
        "Only WebSocket upgrades are supported through the gateway.",
    ),
    "malformed_request": (
        "Malformed request",
        "The gateway could not read this request: it is not well-formed HTTP/1.1, or its "
        "framing is ambiguous, so it was not passed on.",
    ),
    "header_fields_too_large": (
        "Request headers too large",
        "A header of this request is too long, or it has too many headers. Large cookies "
        "are the usual cause: clear this site's cookies and reload.",
    ),
    "unsupported_http_version": (
        "HTTP version not supported",
        "The gateway speaks HTTP/1.1 and HTTP/1.0 to clients; this request named another "
        "protocol version.",
    ),
}

_STYLE = (
    "body{margin:0;font:16px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;"
    "background:#0f172a;color:#e2e8f0;display:flex;min-height:100vh;align-items:center;"
    "justify-content:center}main{width:100%;max-width:36rem;box-sizing:border-box;"
    "padding:2.5rem;margin:1rem;background:#1e293b;border-radius:14px;"
    "box-shadow:0 10px 40px #0006}.brand{font-weight:600;font-size:.8rem;color:#38bdf8;"
    "margin-bottom:1.2rem}.status{font-size:.85rem;letter-spacing:.06em;"
    "text-transform:uppercase;color:#94a3b8}h1{margin:.3rem 0 1rem;font-size:1.6rem;"
    "color:#f8fafc}p{margin:0 0 1rem}code{background:#0f172a;padding:.1rem .35rem;"
    "border-radius:5px;font-size:.9em}b{color:#fbbf24}footer{margin-top:1.5rem;"
    "font-size:.8rem;color:#94a3b8}footer code{font-size:.95em}"
    "@media (prefers-color-scheme:light){body{background:#f1f5f9;color:#1e293b}"
    "main{background:#fff;box-shadow:0 10px 40px #0f172a22}h1{color:#0f172a}"
    "code{background:#e2e8f0}b{color:#b45309}footer,.status{color:#475569}.brand{color:#0369a1}}"
)


def render(error: errors.EdgeError, *, request_id: str, html_wanted: bool) -> Page:
    """The gateway's answer for ``error``."""
    headers = [(GATEWAY_ERROR, error.code), (REQUEST_ID, request_id)]
    if isinstance(error, errors.SandboxPaused):
        headers.append(("Retry-After", str(error.RETRY_AFTER_SECONDS)))
    headers.append(("Cache-Control", "no-store"))
    if html_wanted:
        headers.append(("Content-Type", "text/html; charset=utf-8"))
        return Page(error.status, headers, _html(error, request_id))
    headers.append(("Content-Type", "application/json"))
    body = {
        "error": {
            "code": error.code,
            "message": error.message,
            "sandboxId": error.label,
            "port": error.port,
            "requestId": request_id,
        }
    }
    return Page(error.status, headers, json.dumps(body).encode())


def _html(error: errors.EdgeError, request_id: str) -> bytes:
    title, advice = _ADVICE.get(error.code, ("Gateway error", html.escape(error.message)))
    fill = {
        "port": html.escape(str(error.port if error.port is not None else "")),
        "label": html.escape(error.label or ""),
    }
    title = title.format(**fill)
    advice = advice.format(**fill)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{title}</title><style>{_STYLE}</style></head><body><main>"
        "<div class=brand>Sandbox gateway</div>"
        f"<div class=status>{error.status} · {_phrase(error.status)}</div><h1>{title}</h1>"
        f"<p>{advice}</p><footer>Error <code>{error.code}</code> · request id "
        f"<code>{html.escape(request_id)}</code></footer>"
        "</main></body></html>"
    ).encode()


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"
