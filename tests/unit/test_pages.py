"""Unit tests for gateway.proxy.pages: the gateway's own answers, HTML and JSON."""

from __future__ import annotations

import http
import json

import pytest

from gateway import errors
from gateway.proxy import pages

EDGE_ERRORS: list[type[errors.EdgeError]] = [
    errors.UnknownHost,
    errors.InvalidHost,
    errors.InvalidPort,
    errors.SandboxNotFound,
    errors.PortNotExposed,
    errors.PortNotAllowed,
    errors.SandboxPaused,
    errors.SandboxTerminated,
    errors.UpstreamRefused,
    errors.UpstreamTimeout,
    errors.UpstreamProtocolError,
    errors.RouteStoreUnavailable,
    errors.RateLimited,
    errors.UnsupportedUpgrade,
    errors.UnsupportedHttpVersion,
    errors.UnparsableRequest,
    errors.HeadFieldsTooLarge,
]


def _headers(page: pages.Page) -> dict[str, str]:
    return dict(page.headers)


def test_every_edge_error_class_is_listed_here() -> None:
    """A new EdgeError must get a page (and a line above)."""
    assert set(errors.EdgeError.__subclasses__()) == set(EDGE_ERRORS)


@pytest.mark.parametrize("kind", EDGE_ERRORS, ids=lambda k: k.code)
def test_json_answer(kind: type[errors.EdgeError]) -> None:
    error = kind("what happened", label="abc123", port=3000)
    page = pages.render(error, request_id="rid-1", html_wanted=False)
    assert page.status == kind.status
    headers = _headers(page)
    assert headers["X-Gateway-Error"] == kind.code
    assert headers["X-Request-Id"] == "rid-1"
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert json.loads(page.body) == {
        "error": {
            "code": kind.code,
            "message": "what happened",
            "sandboxId": "abc123",
            "port": 3000,
            "requestId": "rid-1",
        }
    }


@pytest.mark.parametrize("kind", EDGE_ERRORS, ids=lambda k: k.code)
def test_html_answer(kind: type[errors.EdgeError]) -> None:
    error = kind("what happened", label="abc123", port=3000)
    page = pages.render(error, request_id="rid-2", html_wanted=True)
    headers = _headers(page)
    assert page.status == kind.status
    assert headers["X-Gateway-Error"] == kind.code
    assert headers["X-Request-Id"] == "rid-2"
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    text = page.body.decode()
    assert text.startswith("<!doctype html>")
    assert f"{kind.status} · {http.HTTPStatus(kind.status).phrase}" in text
    assert f"<code>{kind.code}</code>" in text
    assert "rid-2" in text
    # Every code has its own words (not the generic fallback).
    assert "<title>Gateway error</title>" not in text
    assert "{port}" not in text and "{label}" not in text


def test_retry_after_only_when_paused() -> None:
    for html_wanted in (False, True):
        paused = pages.render(
            errors.SandboxPaused("paused", label="abc123", port=3000),
            request_id="r",
            html_wanted=html_wanted,
        )
        assert _headers(paused)["Retry-After"] == str(errors.SandboxPaused.RETRY_AFTER_SECONDS)
        other = pages.render(
            errors.SandboxTerminated("gone", label="abc123", port=3000),
            request_id="r",
            html_wanted=html_wanted,
        )
        assert "Retry-After" not in _headers(other)


def test_upstream_refused_page_tells_what_to_do() -> None:
    page = pages.render(
        errors.UpstreamRefused("nothing listening", label="abc123", port=3000),
        request_id="r",
        html_wanted=True,
    )
    text = page.body.decode()
    assert "port 3000" in text
    assert "abc123" in text
    assert "0.0.0.0" in text
    assert "Start your server" in text


def test_labels_and_messages_are_escaped() -> None:
    """Whatever reaches a page is escaped: labels, request ids, fallback messages."""
    nasty = "<script>alert(1)</script>"
    page = pages.render(
        errors.SandboxNotFound("m", label=nasty, port=3000), request_id=nasty, html_wanted=True
    )
    text = page.body.decode()
    assert "<script>" not in text
    assert "&lt;script&gt;" in text

    class Odd(errors.EdgeError):
        status, code = 500, "odd_case"

    odd = pages.render(Odd(f"broken {nasty}"), request_id="r", html_wanted=True)
    odd_text = odd.body.decode()
    assert "<script>" not in odd_text
    assert "broken &lt;script&gt;" in odd_text
    assert "<title>Gateway error</title>" in odd_text


def test_json_escapes_by_construction() -> None:
    page = pages.render(
        errors.InvalidHost('bad "host"\n', label=None, port=None),
        request_id="r",
        html_wanted=False,
    )
    error = json.loads(page.body)["error"]
    assert error["message"] == 'bad "host"\n'
    assert error["sandboxId"] is None
    assert error["port"] is None


def test_unknown_port_and_label_render_empty() -> None:
    page = pages.render(errors.UnknownHost("not ours"), request_id="r", html_wanted=True)
    text = page.body.decode()
    assert "None" not in text
