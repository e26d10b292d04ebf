"""The gateway's one exception tree. Pure: imports neither aiohttp nor redis.

Every error the gateway or its control plane raises on purpose is a ``GatewayError``.
Each class knows its HTTP status and a stable machine-readable ``code`` (the value of
the ``X-Gateway-Error`` header and of ``error.code`` in JSON bodies). Foreign errors
(aiohttp, redis, OS) are translated into this tree at exactly one boundary each:
``proxy.upstream`` for the upstream client, ``routing.store`` for Redis and
``EdgeHandler.refused_head`` for aiohttp's request parser.

    GatewayError
    ├── EdgeError                    answers the public listener gives itself
    │   ├── UnknownHost              404 unknown_host
    │   ├── InvalidHost              400 invalid_host
    │   ├── InvalidPort              400 invalid_port
    │   ├── SandboxNotFound          404 sandbox_not_found
    │   ├── PortNotExposed           404 port_not_exposed
    │   ├── PortNotAllowed           403 port_not_allowed
    │   ├── SandboxPaused            503 sandbox_paused (+ Retry-After)
    │   ├── SandboxTerminated        410 sandbox_terminated
    │   ├── UpstreamRefused          502 upstream_refused
    │   ├── UpstreamTimeout          504 upstream_timeout
    │   ├── UpstreamProtocolError    502 upstream_error
    │   ├── RouteStoreUnavailable    503 route_store_unavailable
    │   ├── RateLimited              429 rate_limited
    │   ├── UnsupportedUpgrade       400 unsupported_upgrade
    │   ├── UnsupportedHttpVersion   505 unsupported_http_version
    │   ├── UnparsableRequest        400 malformed_request
    │   └── HeadFieldsTooLarge       431 header_fields_too_large
    └── ControlError                 answers of the writer (library, CLI, admin API)
        ├── MalformedRequest         400 malformed_request
        ├── Unauthorized             401 unauthorized
        ├── UnknownSandbox           404 sandbox_not_found
        ├── RuleViolation            422 (code names the rule: invalid_port, reserved_port, ...)
        ├── LifecycleConflict        409 (code names the conflict: sandbox_exists, ...)
        ├── SchemaMismatch           503 schema_mismatch
        ├── TableNotInitialised      503 table_not_initialised
        └── StoreUnavailable         503 route_store_unavailable
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every deliberate gateway error.

    Attributes:
        status: the HTTP status this error is answered with.
        code: a stable snake_case identifier; never changes once shipped.
        message: one human sentence naming the problem (safe to show to anyone).
    """

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


# ---------------------------------------------------------------------------------------
# Edge errors: the public listener's own answers (DESIGN.md section 5).
# ---------------------------------------------------------------------------------------


class EdgeError(GatewayError):
    """An answer of the public listener. May name the sandbox label and port it concerns."""

    def __init__(self, message: str, *, label: str | None = None, port: int | None = None) -> None:
        super().__init__(message)
        self.label = label
        self.port = port


class UnknownHost(EdgeError):
    status, code = 404, "unknown_host"


class InvalidHost(EdgeError):
    status, code = 400, "invalid_host"


class InvalidPort(EdgeError):
    status, code = 400, "invalid_port"


class SandboxNotFound(EdgeError):
    status, code = 404, "sandbox_not_found"


class PortNotExposed(EdgeError):
    status, code = 404, "port_not_exposed"


class PortNotAllowed(EdgeError):
    status, code = 403, "port_not_allowed"


class SandboxPaused(EdgeError):
    """The sandbox is paused; clients should retry after ``RETRY_AFTER_SECONDS``."""

    status, code = 503, "sandbox_paused"
    RETRY_AFTER_SECONDS = 5


class SandboxTerminated(EdgeError):
    status, code = 410, "sandbox_terminated"


class UpstreamRefused(EdgeError):
    status, code = 502, "upstream_refused"


class UpstreamTimeout(EdgeError):
    status, code = 504, "upstream_timeout"


class UpstreamProtocolError(EdgeError):
    status, code = 502, "upstream_error"


class RouteStoreUnavailable(EdgeError):
    status, code = 503, "route_store_unavailable"


class RateLimited(EdgeError):
    status, code = 429, "rate_limited"


class UnsupportedUpgrade(EdgeError):
    status, code = 400, "unsupported_upgrade"


class UnsupportedHttpVersion(EdgeError):
    """A request line naming a protocol other than HTTP/1.0 or HTTP/1.1 (RFC 9110
    section 15.6.6): answered, never served, so no version is echoed back."""

    status, code = 505, "unsupported_http_version"

    @classmethod
    def naming(cls, protocol: str) -> UnsupportedHttpVersion:
        """The error for a request that says ``protocol`` (``HTTP/2.0``, say)."""
        return cls(f"the gateway speaks HTTP/1.1 and HTTP/1.0; this request is {protocol}")


class UnparsableRequest(EdgeError):
    """A request the strict HTTP/1.1 parser refused: ambiguous framing, bad bytes, broken
    chunks (the control plane's ``MalformedRequest`` shares the code)."""

    status, code = 400, "malformed_request"


class HeadFieldsTooLarge(EdgeError):
    """A header line over the field limit, or more header fields than allowed (RFC 6585
    section 5)."""

    status, code = 431, "header_fields_too_large"


# ---------------------------------------------------------------------------------------
# Control errors: the writer's answers (library, CLI, admin API).
# ---------------------------------------------------------------------------------------


class ControlError(GatewayError):
    """An answer of the route-table writer."""


class MalformedRequest(ControlError):
    status, code = 400, "malformed_request"


class Unauthorized(ControlError):
    status, code = 401, "unauthorized"


class UnknownSandbox(ControlError):
    status, code = 404, "sandbox_not_found"


class RuleViolation(ControlError):
    """A well-formed request that breaks a rule; ``code`` names the rule."""

    status, code = 422, "rule_violation"


class LifecycleConflict(ControlError):
    """The operation is not allowed in the sandbox's current state; ``code`` names why."""

    status, code = 409, "lifecycle_conflict"


class SchemaMismatch(ControlError):
    status, code = 503, "schema_mismatch"


class TableNotInitialised(ControlError):
    status, code = 503, "table_not_initialised"


class StoreUnavailable(ControlError):
    status, code = 503, "route_store_unavailable"
