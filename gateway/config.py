"""Static configuration: YAML, environment and flags into frozen dataclasses. Pure.

Precedence (DESIGN.md section 4): flags > environment > the YAML file > defaults.
Environment keys are ``GATEWAY_`` + the key path in upper case with ``__`` between
levels (``GATEWAY_REDIS__URL``, ``GATEWAY_CACHE__MAX_ENTRIES``); values are read as YAML
scalars, so ``GATEWAY_DOMAINS='[a.test, b.test]'`` works. ``GATEWAY_REDIS_URL`` and
``GATEWAY_ADMIN_TOKEN`` are accepted as the documented shorthands.

Unknown keys and bad values are errors that name the key: a typo must never become a
silent default. Units are in the key names (``*_seconds``, ``*_bytes``). Dynamic routes
never live here; they live in Redis.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

ENV_PREFIX = "GATEWAY_"
# Environment names under the prefix that are not config keys (shorthands handled
# explicitly, or settings of other tools such as the test suite).
_ENV_NOT_KEYS = frozenset({"REDIS_URL", "ADMIN_TOKEN", "REDIS_SERVER"})
_ENV_IGNORED_PREFIXES = ("TEST_",)

# redis+cluster://host:port[,host:port...] (rediss+cluster:// with TLS): Redis Cluster.
# redis+sentinel://host:port[,host:port...]/SERVICE: the primary Sentinel names.
_REDIS_SCHEMES = (
    "redis:", "rediss:", "unix:", "redis+cluster:", "rediss+cluster:", "redis+sentinel:",
    "rediss+sentinel:",
)  # fmt: skip

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_T = typing.TypeVar("_T")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A listener address: ``host`` (IP literal or name) and ``port`` (0 = pick one)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str, *, key: str = "listen") -> Endpoint:
    """Parse ``HOST:PORT`` or ``[V6]:PORT``.

    Raises:
        ConfigError: naming ``key`` when the text is not an endpoint.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"{key}: {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Endpoint(host, int(port_text))


@dataclass(frozen=True, slots=True)
class RedisConfig:
    # None: start the embedded redis-server (local development only). A Redis Cluster:
    # redis+cluster://host:port[,host:port...], the nodes being seeds. Sentinel:
    # redis+sentinel://host:port[,host:port...]/SERVICE, the hosts being sentinels.
    url: str | None = None
    # One route lookup on a cache miss; a hot path, so short.
    lookup_timeout_seconds: float = 0.25
    # Control-plane writes (scripts, events).
    write_timeout_seconds: float = 2.0
    # While Redis is unreachable, cached routes are served this long; then 503.
    stale_budget_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    # The label is the first N characters of the sandbox id (0: the whole id; <= 57 so
    # that "{port}-{label}" fits one 63-octet DNS label).
    url_id_length: int = 6
    # Public URL of an exposed port; None: http://{port}-{label}.{first domain}:{listen port}.
    public_url_template: str | None = None
    # Sandbox addresses must lie inside these networks. The no-config default is loopback,
    # for local development; production lists its private sandbox networks only.
    sandbox_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # A terminated sandbox's label answers 410 and cannot be reused for this long.
    quarantine_seconds: int = 86_400
    # Approximate bound of the event stream (XADD MAXLEN ~).
    events_max_length: int = 100_000


@dataclass(frozen=True, slots=True)
class CacheConfig:
    max_entries: int = 100_000
    # Backstop only: invalidations normally evict entries within milliseconds.
    positive_ttl_seconds: float = 30.0
    # "No such sandbox" answers are cached briefly so a label scan cannot hammer Redis;
    # an expose or create invalidates them at once.
    negative_ttl_seconds: float = 1.0
    # The watcher publishes a heartbeat to itself this often; four missed beats mean the
    # subscription is black-holed and the cache is flushed.
    heartbeat_interval_seconds: float = 0.5


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    # A new TCP connect to a sandbox.
    connect_timeout_seconds: float = 5.0
    # A server that binds a moment after its port is exposed: refused connects are
    # retried for this long, before any byte is sent.
    connect_retry_window_seconds: float = 1.0
    # Longest wait for the response head once the request is sent (504 after it). Dev
    # servers compiling a first page can take a while.
    response_timeout_seconds: float = 120.0
    # Longest silence between body bytes, either way. Not a total timeout: streams may
    # run for ever while bytes flow.
    read_idle_timeout_seconds: float = 900.0
    # Idle pooled connections are dropped after this; below the 5 s idle timeout of Node
    # and uvicorn dev servers, so a request never lands on a connection they are closing.
    pool_idle_seconds: float = 3.0
    websocket_max_message_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How the public listener treats connections (docs/operations.md)."""

    # A request head must arrive within this after its first byte (aiohttp has no such
    # timeout of its own: without it, slowloris holds connections for ever).
    header_timeout_seconds: float = 10.0
    # Idle keep-alive connections are closed after this. Set it ABOVE the load
    # balancer's idle timeout (AWS ALB 60 s, GCP 600 s), so the balancer closes first.
    keepalive_idle_seconds: float = 620.0
    # Connections over this, per process, are closed at once.
    max_connections: int = 20_000
    # Require a PROXY protocol v1/v2 header on every connection (from trusted_proxies
    # only). Turn on only behind a balancer that sends it.
    proxy_protocol: bool = False
    proxy_header_timeout_seconds: float = 5.0
    # On SIGTERM: /readyz fails at once, then the gateway keeps serving this long (with
    # Connection: close) so the balancer deregisters it; match the deregistration delay.
    drain_delay_seconds: float = 5.0
    # Then in-flight requests and streams get this long to finish; WebSockets are closed
    # with 1012 (service restart). Keep drain_delay + drain_grace below the platform's
    # termination grace period (Kubernetes terminationGracePeriodSeconds).
    drain_grace_seconds: float = 20.0
    # Bind with SO_REUSEPORT so several processes share the listeners (``--workers``
    # sets it for its workers; the kernel spreads connections over them).
    reuse_port: bool = False
    # Answer GET/HEAD on this path on the public listener (for balancers that can only
    # probe the serving port), for Hosts outside the sandbox domains only; None: off.
    health_path: str | None = None


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Abuse limits (docs/security.md). A value of 0 turns that limit off."""

    # Misses (sandbox_not_found, port_not_exposed) one client IP may cause per window
    # before its requests to sandbox hosts get 429 rate_limited: labels are short, so
    # without this a stranger can scan them (gateway/missbudget.py).
    misses_per_window: int = 100
    miss_window_seconds: float = 60.0
    # Requests being forwarded plus WebSockets relayed to one sandbox at once (all its
    # ports), per process; over it, 429 rate_limited. A route record's
    # limits.connections overrides it (gateway/proxy/connlimit.py).
    connections_per_sandbox: int = 1000


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    # One JSON line per request or WebSocket session on stdout.
    enabled: bool = True
    # Query strings often carry tokens (Jupyter's ?token=); off by default.
    include_query: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    listen: str = "0.0.0.0:8080"
    admin_listen: str = "127.0.0.1:8081"
    domains: tuple[str, ...] = ("box.localhost", "box.runra.dev")
    # Peers whose X-Forwarded-* headers are believed. None by default, loopback included.
    trusted_proxies: tuple[str, ...] = ()
    # Where the embedded Redis keeps its socket and data; None: $XDG_STATE_HOME/gateway
    # or ~/.local/state/gateway.
    state_dir: str | None = None
    # Worker processes sharing the listeners (SO_REUSEPORT), each with its own cache and
    # subscription; about one per core.
    workers: int = 1
    # Where workers of one process group publish their metrics, so /metrics on any of
    # them reports the whole group; set by ``--workers``. None: this process alone.
    metrics_dir: str | None = None
    redis: RedisConfig = field(default_factory=RedisConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    # Secret: from GATEWAY_ADMIN_TOKEN only, never from the file.
    admin_token: str | None = field(default=None, repr=False)

    @property
    def listen_endpoint(self) -> Endpoint:
        return parse_endpoint(self.listen, key="listen")

    @property
    def admin_endpoint(self) -> Endpoint:
        return parse_endpoint(self.admin_listen, key="admin_listen")

    @property
    def sandbox_networks(self) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(n) for n in self.routing.sandbox_networks)

    @property
    def trusted_networks(self) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(n) for n in self.trusted_proxies)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def load_config(
    *,
    yaml_text: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration from its three sources.

    Args:
        yaml_text: the YAML file's contents, or None for none.
        environ: the process environment (only ``GATEWAY_*`` names are read).
        overrides: command-line flags as a nested mapping of key paths to values.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a value out of range;
            the message names the key.
    """
    tree: dict[str, Any] = {}
    if yaml_text:
        try:
            from_file = yaml.safe_load(yaml_text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file is not valid YAML: {exc}") from None
        if from_file is not None:
            if not isinstance(from_file, dict):
                raise ConfigError("config file: the top level must be a mapping")
            if "admin_token" in from_file:
                raise ConfigError("admin_token: a secret; set GATEWAY_ADMIN_TOKEN instead")
            _merge(tree, from_file)
    _merge(tree, _tree_from_environ(environ or {}))
    _merge(tree, dict(overrides or {}))
    config = _build(Config, tree, "")
    _validate(config)
    return config


def _tree_from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        if rest in _ENV_NOT_KEYS or rest.startswith(_ENV_IGNORED_PREFIXES):
            continue
        path = [part.lower() for part in rest.split("__")]
        _merge(tree, _nest(path, _env_value(name, raw, _is_text_key(path))))
    if url := environ.get(ENV_PREFIX + "REDIS_URL"):
        _merge(tree, {"redis": {"url": url}})
    if token := environ.get(ENV_PREFIX + "ADMIN_TOKEN"):
        tree["admin_token"] = token
    return tree


def _env_value(name: str, raw: str, text_key: bool) -> Any:
    if not raw.strip():
        return None
    if text_key:
        # Taken as written: YAML would turn "1:20" into 80 and "a: b" into a mapping.
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"{name}: {raw!r} is not a valid value") from None


def _is_text_key(path: list[str]) -> bool:
    """Whether ``path`` names a text-valued key (unknown paths: no; _build reports them)."""
    cls: Any = Config
    for i, part in enumerate(path):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return False
        hint = hints[part]
        if i == len(path) - 1:
            return hint in (str, str | None)
        cls = hint
    return False


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    node: Any = value
    for part in reversed(path):
        node = {part: node}
    return typing.cast(dict[str, Any], node)


def _merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def _build(cls: type[_T], tree: Any, prefix: str) -> _T:
    """Turn a nested mapping into dataclass ``cls``, checking keys and types."""
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in tree:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key")
    values: dict[str, Any] = {}
    for name, value in tree.items():
        values[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:  # noqa: PLR0912 (a branch per type)
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), value, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{key}: expected a list")
        return tuple(_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(items))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected text, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type")  # pragma: no cover (a programming error)


def _validate(config: Config) -> None:
    """Range and format checks that the types alone don't express."""
    config.listen_endpoint  # noqa: B018 (parses, raising ConfigError naming the key)
    config.admin_endpoint  # noqa: B018
    if not config.domains:
        raise ConfigError("domains: at least one domain is needed")
    for i, domain in enumerate(config.domains):
        if not _is_domain(domain):
            raise ConfigError(f"domains[{i}]: {domain!r} is not a lowercase domain name")
    _check_networks("routing.sandbox_networks", config.routing.sandbox_networks)
    _check_networks("trusted_proxies", config.trusted_proxies)
    if not 0 <= config.routing.url_id_length <= 57:
        raise ConfigError("routing.url_id_length: must be 0 (whole id) to 57")
    template = config.routing.public_url_template
    if template is not None and ("{port}" not in template or "{label}" not in template):
        raise ConfigError("routing.public_url_template: must contain {port} and {label}")
    if config.redis.url is not None and not config.redis.url.startswith(_REDIS_SCHEMES):
        raise ConfigError(
            f"redis.url: {config.redis.url!r} is not a Redis URL "
            f"({', '.join(s + '//' for s in _REDIS_SCHEMES)})"
        )
    if config.workers < 1:
        raise ConfigError("workers: must be at least 1")
    _check_positive(config)


def _check_positive(config: Config) -> None:
    may_be_zero = {"url_id_length", "drain_delay_seconds"}
    for section in ("redis", "routing", "cache", "upstream", "server"):
        for f in dataclasses.fields(getattr(config, section)):
            value = getattr(getattr(config, section), f.name)
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            if is_number and not (value > 0 or (value == 0 and f.name in may_be_zero)):
                raise ConfigError(f"{section}.{f.name}: must be greater than 0")
    for f in dataclasses.fields(config.limits):
        value = getattr(config.limits, f.name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"limits.{f.name}: must be 0 (off) or greater")
    path = config.server.health_path
    if path is not None and not path.startswith("/"):
        raise ConfigError("server.health_path: must start with /")


def _check_networks(key: str, networks: tuple[str, ...]) -> None:
    for i, text in enumerate(networks):
        try:
            ipaddress.ip_network(text)
        except ValueError:
            raise ConfigError(f"{key}[{i}]: {text!r} is not a CIDR network") from None


def _is_domain(text: str) -> bool:
    labels = text.split(".")
    return (
        text == text.lower()
        and len(labels) >= 2
        and all(
            0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
            for label in labels
        )
    )
