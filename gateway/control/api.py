"""The admin HTTP API (``/v1``) and the health endpoints, on the admin listener.

Statuses (DESIGN.md section 5): malformed JSON 400; a well-formed request that breaks a
rule 422; lifecycle conflicts 409; unknown sandbox 404; missing or wrong token 401; the
first expose of a port 201, a repeat 200. Errors are ``{"error": {"code", "message"}}``
and never carry a stack trace: ``errors.GatewayError`` is rendered by one middleware,
anything else is logged and answered 500 ``internal_error``.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway import errors
from gateway.metrics import Metrics
from gateway.routing.model import Sandbox
from gateway.routing.schema import TableSettings
from gateway.routing.store import RouteWriter, exposures

log = logging.getLogger("gateway.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class Health:
    """This replica's own state; /readyz never looks at the shared Redis."""

    started: bool = True
    draining: bool = False


WRITER = web.AppKey("writer", RouteWriter)
HEALTH = web.AppKey("health", Health)
METRICS = web.AppKey("metrics", Metrics)
_OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def create_app(
    writer: RouteWriter, *, token: str | None, health: Health, metrics: Metrics | None = None
) -> web.Application:
    app = web.Application(middlewares=[_errors_middleware, _auth_middleware(token)])
    app[WRITER] = writer
    app[HEALTH] = health
    if metrics is not None:
        app[METRICS] = metrics
    app.router.add_post("/v1/sandboxes", create_sandbox)
    app.router.add_get("/v1/sandboxes/{id}", show_sandbox)
    app.router.add_delete("/v1/sandboxes/{id}", terminate_sandbox)
    app.router.add_post("/v1/sandboxes/{id}/ports", expose_port)
    app.router.add_get("/v1/sandboxes/{id}/ports", list_ports)
    app.router.add_delete("/v1/sandboxes/{id}/ports/{port}", close_port)
    app.router.add_post("/v1/sandboxes/{id}/pause", pause_sandbox)
    app.router.add_post("/v1/sandboxes/{id}/resume", resume_sandbox)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_text)
    return app


# ---------------------------------------------------------------------------------------
# Middlewares
# ---------------------------------------------------------------------------------------


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.GatewayError as exc:
        return web.json_response(error_body(exc.code, exc.message), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        return web.json_response(error_body(code, exc.reason), status=exc.status)
    except Exception:
        log.exception("admin API request failed: %s %s", request.method, request.path)
        return web.json_response(
            error_body("internal_error", "internal error; see the gateway's log"), status=500
        )


def _auth_middleware(token: str | None) -> Middleware:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and request.path not in _OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise errors.Unauthorized("a valid bearer token is required")
        return await handler(request)

    return check_token


# ---------------------------------------------------------------------------------------
# /v1
# ---------------------------------------------------------------------------------------


async def create_sandbox(request: web.Request) -> web.Response:
    body = await _json_object(request, allowed={"id", "address", "allowPorts"})
    writer = request.app[WRITER]
    record = await writer.create(
        _required(body, "id"), address=_required(body, "address"),
        allow_ports=body.get("allowPorts"),
    )  # fmt: skip
    return web.json_response(sandbox_json(record, await writer.settings()), status=201)


async def show_sandbox(request: web.Request) -> web.Response:
    writer = request.app[WRITER]
    record = await writer.show(request.match_info["id"])
    return web.json_response(sandbox_json(record, await writer.settings()))


async def terminate_sandbox(request: web.Request) -> web.Response:
    writer = request.app[WRITER]
    record = await writer.terminate(request.match_info["id"])
    return web.json_response(sandbox_json(record, await writer.settings()))


async def expose_port(request: web.Request) -> web.Response:
    body = await _json_object(request, allowed={"port", "hostRewrite"})
    host_rewrite = body.get("hostRewrite", False)
    if not isinstance(host_rewrite, bool):
        raise errors.RuleViolation("hostRewrite must be true or false", code="invalid_option")
    exposure, created = await request.app[WRITER].expose(
        request.match_info["id"], _required(body, "port"), host_rewrite=host_rewrite
    )
    return web.json_response(exposure.as_json(), status=201 if created else 200)


async def list_ports(request: web.Request) -> web.Response:
    found = await request.app[WRITER].list_ports(request.match_info["id"])
    return web.json_response([e.as_json() for e in found])


async def close_port(request: web.Request) -> web.Response:
    writer = request.app[WRITER]
    record = await writer.close(request.match_info["id"], request.match_info["port"])
    return web.json_response(sandbox_json(record, await writer.settings()))


async def pause_sandbox(request: web.Request) -> web.Response:
    writer = request.app[WRITER]
    record = await writer.pause(request.match_info["id"])
    return web.json_response(sandbox_json(record, await writer.settings()))


async def resume_sandbox(request: web.Request) -> web.Response:
    body = await _json_object(request, allowed={"address"}, empty_ok=True)
    writer = request.app[WRITER]
    record = await writer.resume(request.match_info["id"], address=body.get("address"))
    return web.json_response(sandbox_json(record, await writer.settings()))


# ---------------------------------------------------------------------------------------
# Health and metrics
# ---------------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    health = request.app[HEALTH]
    ready = health.started and not health.draining
    state = "ready" if ready else "draining" if health.draining else "starting"
    return web.json_response({"status": state}, status=200 if ready else 503)


async def metrics_text(request: web.Request) -> web.Response:
    registry = request.app.get(METRICS)
    body = registry.render() if registry is not None else b""
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


# ---------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------


def sandbox_json(record: Sandbox, settings: TableSettings) -> dict[str, Any]:
    """A sandbox as every interface shows it (the CLI prints the same)."""
    return {
        "id": record.id,
        "label": record.label,
        "state": record.state.value,
        "address": record.address or None,
        "allowPorts": None if record.allow_ports is None else sorted(record.allow_ports),
        "ports": [e.as_json() for e in exposures(record, settings)],
        "gen": record.gen,
    }


async def _json_object(
    request: web.Request, *, allowed: set[str], empty_ok: bool = False
) -> dict[str, Any]:
    # Bytes, not request.text(): a body that is not UTF-8 is malformed JSON (400), not an
    # UnicodeDecodeError escaping as a 500.
    data = await request.read()
    if not data.strip() and empty_ok:
        return {}
    try:
        body = json.loads(data)
    except UnicodeDecodeError:
        raise errors.MalformedRequest("the request body is not valid JSON: not UTF-8") from None
    except ValueError as exc:
        raise errors.MalformedRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise errors.MalformedRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise errors.RuleViolation(
            f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}",
            code="unknown_field",
        )
    return body


def _required(body: dict[str, Any], name: str) -> Any:
    if name not in body:
        raise errors.RuleViolation(f"the field {name!r} is required", code="missing_field")
    return body[name]
