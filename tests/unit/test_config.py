"""gateway.config (and the serve flags of gateway.cli): sources, precedence, errors. Pure."""

from __future__ import annotations

import dataclasses
import ipaddress
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import cli
from gateway.config import Config, ConfigError, Endpoint, load_config, parse_endpoint

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "gateway.yaml"


def leaf_keys(cls: type[Any], prefix: str = "") -> set[str]:
    """Every key path of a config dataclass, e.g. {"listen", "redis.url", ...}."""
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys |= leaf_keys(typing.cast(type[Any], hint), f"{prefix}{f.name}.")
        else:
            keys.add(f"{prefix}{f.name}")
    return keys


def yaml_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            keys |= yaml_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


# ---------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------


def test_defaults_are_design_no_config_defaults() -> None:
    """With no file, env or flags the config is DESIGN.md section 4's local default."""
    config = load_config(environ={})
    assert config.listen_endpoint == Endpoint("0.0.0.0", 8080)
    assert config.admin_endpoint == Endpoint("127.0.0.1", 8081)
    assert config.domains == ("box.localhost", "box.runra.dev")
    assert config.redis.url is None  # the embedded Redis
    assert ipaddress.ip_address("127.0.0.1") in config.sandbox_networks[0]
    assert any(ipaddress.ip_address("::1") in net for net in config.sandbox_networks)
    assert config.trusted_proxies == ()
    assert config.admin_token is None
    assert config.workers == 1
    assert config.routing.url_id_length == 6
    assert config.routing.public_url_template is None
    assert config.routing.quarantine_seconds == 86_400
    assert config == Config()


def test_admin_token_is_not_in_repr() -> None:
    """The admin token never shows up in a logged config."""
    config = load_config(environ={"GATEWAY_ADMIN_TOKEN": "s3cret"})
    assert config.admin_token == "s3cret"
    assert "s3cret" not in repr(config)


# ---------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "read"),
    [
        ({"GATEWAY_REDIS__URL": "redis://r:6379/1"}, lambda c: c.redis.url == "redis://r:6379/1"),
        ({"GATEWAY_REDIS_URL": "unix:///tmp/r.sock"}, lambda c: c.redis.url == "unix:///tmp/r.sock"),
        ({"GATEWAY_ADMIN_TOKEN": "t0k3n"}, lambda c: c.admin_token == "t0k3n"),
        ({"GATEWAY_CACHE__MAX_ENTRIES": "500"}, lambda c: c.cache.max_entries == 500),
        ({"GATEWAY_LISTEN": "127.0.0.1:9000"}, lambda c: c.listen == "127.0.0.1:9000"),
        ({"GATEWAY_DOMAINS": "[a.test, b.test]"}, lambda c: c.domains == ("a.test", "b.test")),
        ({"GATEWAY_DOMAINS": "a.test"}, lambda c: c.domains == ("a.test",)),
        ({"GATEWAY_REDIS__STALE_BUDGET_SECONDS": "2.5"},
         lambda c: c.redis.stale_budget_seconds == 2.5),
        ({"GATEWAY_ROUTING__URL_ID_LENGTH": "0"}, lambda c: c.routing.url_id_length == 0),
        ({"GATEWAY_STATE_DIR": "~"}, lambda c: c.state_dir == "~"),
        ({"GATEWAY_STATE_DIR": "/tmp/a: b"}, lambda c: c.state_dir == "/tmp/a: b"),
        ({"GATEWAY_REDIS__URL": ""}, lambda c: c.redis.url is None),
        ({"GATEWAY_TEST_REDIS_URL": "x", "GATEWAY_REDIS_SERVER": "/bin/x",
          "GATEWAY_TEST_TIME_SCALE": "3"}, lambda c: c == Config()),
    ],
    ids=[
        "redis-url-path", "redis-url-shorthand", "admin-token", "cache-max-entries", "listen",
        "domains-list", "domains-one", "float", "int-zero", "text-kept-as-written",
        "text-with-colon", "empty-is-unset", "not-config-names",
    ],
)  # fmt: skip
def test_environment_keys(environ: dict[str, str], read: typing.Callable[[Config], bool]) -> None:
    """GATEWAY_ + the key path (with __ between levels) and the two shorthands set keys."""
    assert read(load_config(environ=environ))


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"GATEWAY_LISTN": "x"}, "listn"),
        ({"GATEWAY_CACHE__MAX_ENTRIEZ": "5"}, "cache.max_entriez"),
        ({"GATEWAY_REDIS__URL__HOST": "x"}, "redis.url"),
        ({"GATEWAY_NOPE__DEEP": "1"}, "nope"),
    ],
    ids=["top", "nested", "too-deep", "unknown-section"],
)
def test_unknown_environment_keys_are_errors(environ: dict[str, str], key: str) -> None:
    """An unknown GATEWAY_ name is an error naming the key, never ignored."""
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(environ=environ)


def test_environment_value_that_is_not_yaml() -> None:
    """A non-text key whose environment value isn't readable names the variable."""
    with pytest.raises(ConfigError, match="GATEWAY_DOMAINS"):
        load_config(environ={"GATEWAY_DOMAINS": "[unclosed"})


# ---------------------------------------------------------------------------------------
# Precedence
# ---------------------------------------------------------------------------------------

FILE = """
listen: "127.0.0.1:1111"
admin_listen: "127.0.0.1:1112"
domains: [file.test]
cache: {max_entries: 11, negative_ttl_seconds: 7}
redis: {url: "redis://file:6379"}
"""


def test_flags_beat_env_beat_file() -> None:
    """Each key takes the highest source that sets it; the rest fall through."""
    environ = {
        "GATEWAY_LISTEN": "127.0.0.1:2221",
        "GATEWAY_CACHE__MAX_ENTRIES": "22",
        "GATEWAY_REDIS_URL": "redis://env:6379",
    }
    overrides = {"listen": "127.0.0.1:3331", "redis": {"url": "redis://flag:6379"}}
    config = load_config(yaml_text=FILE, environ=environ, overrides=overrides)
    assert config.listen == "127.0.0.1:3331"  # flag over env over file
    assert config.redis.url == "redis://flag:6379"  # flag over env shorthand over file
    assert config.cache.max_entries == 22  # env over file
    assert config.cache.negative_ttl_seconds == 7.0  # file only
    assert config.admin_listen == "127.0.0.1:1112"  # file only
    assert config.domains == ("file.test",)
    assert config.cache.positive_ttl_seconds == 30.0  # default


def test_serve_flags_beat_env_beat_file(tmp_path: Path) -> None:
    """gateway serve's flags, env and --config file combine in that order."""
    path = tmp_path / "gateway.yaml"
    path.write_text(FILE)
    args = cli.build_parser().parse_args(
        ["serve", "--config", str(path), "--listen", "127.0.0.1:3331",
         "--domain", "One.Test", "--domain", "two.test"]
    )  # fmt: skip
    environ = {"GATEWAY_LISTEN": "127.0.0.1:2221", "GATEWAY_ADMIN_LISTEN": "127.0.0.1:2222"}
    config = cli.load_serve_config(args, environ)
    assert config.listen == "127.0.0.1:3331"
    assert config.admin_listen == "127.0.0.1:2222"
    assert config.domains == ("one.test", "two.test")
    assert config.cache.max_entries == 11
    assert config.redis.url == "redis://file:6379"


def test_serve_redis_url_flag_and_admin_listen_flag() -> None:
    """--redis-url and --admin-listen set their keys over the environment."""
    args = cli.build_parser().parse_args(
        ["serve", "--redis-url", "redis://flag:1", "--admin-listen", "127.0.0.1:9"]
    )
    config = cli.load_serve_config(args, {"GATEWAY_REDIS_URL": "redis://env:1"})
    assert (config.redis.url, config.admin_listen) == ("redis://flag:1", "127.0.0.1:9")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["serve", "--workers", "0"], "workers"),
        (["serve", "--workers", "-1"], "workers"),
        (["serve", "--config", "/nonexistent/gateway.yaml"], "--config"),
    ],
    ids=["zero-workers", "negative-workers", "missing-file"],
)
def test_serve_config_refusals(argv: list[str], words: str) -> None:
    """Worker counts below 1 and an unreadable --config are errors naming the flag."""
    with pytest.raises(ConfigError, match=words):
        cli.load_serve_config(cli.build_parser().parse_args(argv), {})


# ---------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("lissten: 0.0.0.0:1", "lissten"),
        ("redis: {uri: redis://x}", "redis.uri"),
        ("cache: {max_entries: 5, ttl: 3}", "cache.ttl"),
        ("upstream: {connect_timeout: 5}", "upstream.connect_timeout"),
    ],
    ids=["top", "nested", "nested-second", "unit-missing"],
)
def test_unknown_file_keys_are_errors(text: str, key: str) -> None:
    """An unknown key in the file is an error naming its path."""
    with pytest.raises(ConfigError, match=f"^{key}: unknown key"):
        load_config(yaml_text=text, environ={})


def test_limits_zero_turns_the_miss_budget_off_and_defaults_are_on() -> None:
    """limits.* accept 0 (off); by default the miss budget is 100 misses per 60 s."""
    config = load_config(yaml_text="limits: {misses_per_window: 0, miss_window_seconds: 0}",
                         environ={})  # fmt: skip
    assert config.limits.misses_per_window == 0
    assert config.limits.miss_window_seconds == 0
    default = load_config(environ={}).limits
    assert (default.misses_per_window, default.miss_window_seconds) == (100, 60.0)
    with pytest.raises(ConfigError, match=r"^limits\.budget: unknown key"):
        load_config(yaml_text="limits: {budget: 1}", environ={})


def test_connections_per_sandbox_defaults_to_1000_and_0_turns_it_off() -> None:
    """limits.connections_per_sandbox: 1000 by default, 0 (off) accepted, negatives refused."""
    assert load_config(environ={}).limits.connections_per_sandbox == 1000
    off = load_config(yaml_text="limits: {connections_per_sandbox: 0}", environ={})
    assert off.limits.connections_per_sandbox == 0
    env = load_config(environ={"GATEWAY_LIMITS__CONNECTIONS_PER_SANDBOX": "5"})
    assert env.limits.connections_per_sandbox == 5
    with pytest.raises(ConfigError, match=r"limits\.connections_per_sandbox"):
        load_config(yaml_text="limits: {connections_per_sandbox: -1}", environ={})


def test_admin_token_in_the_file_is_refused() -> None:
    """The token is a secret: the file may not carry it, and the error says where it goes."""
    with pytest.raises(ConfigError, match=r"admin_token.*GATEWAY_ADMIN_TOKEN"):
        load_config(yaml_text="admin_token: s3cret", environ={})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("listen: 8080", "listen"),
        ("listen: [a]", "listen"),
        ("admin_listen: 'localhost'", "admin_listen"),
        ("workers: two", "workers"),
        ("workers: true", "workers"),
        ("workers: 1.5", "workers"),
        ("cache: {max_entries: '5'}", "cache.max_entries"),
        ("cache: {positive_ttl_seconds: fast}", "cache.positive_ttl_seconds"),
        ("cache: {positive_ttl_seconds: true}", "cache.positive_ttl_seconds"),
        ("cache: {negative_ttl_seconds: 0}", "cache.negative_ttl_seconds"),
        ("redis: {lookup_timeout_seconds: -1}", "redis.lookup_timeout_seconds"),
        ("redis: nope", "redis"),
        ("redis: {url: 'localhost:6379'}", "redis.url"),
        ("domains: 5", "domains"),
        ("domains: []", "domains"),
        ("domains: [Box.Test]", "domains[0]"),
        ("domains: [localhost]", "domains[0]"),
        ("domains: [[a]]", "domains[0]"),
        ("trusted_proxies: [10.0.0.0/33]", "trusted_proxies[0]"),
        ("routing: {sandbox_networks: [not-a-cidr]}", "routing.sandbox_networks[0]"),
        ("routing: {sandbox_networks: [10.0.0.1/8]}", "routing.sandbox_networks[0]"),
        ("routing: {url_id_length: 58}", "routing.url_id_length"),
        ("routing: {url_id_length: -1}", "routing.url_id_length"),
        ("routing: {public_url_template: 'https://x.test'}", "routing.public_url_template"),
        ("routing: {quarantine_seconds: 1.5}", "routing.quarantine_seconds"),
        ("upstream: {websocket_max_message_bytes: 0}", "upstream.websocket_max_message_bytes"),
        ("limits: {misses_per_window: -1}", "limits.misses_per_window"),
        ("limits: {miss_window_seconds: -0.5}", "limits.miss_window_seconds"),
        ("limits: {misses_per_window: 1.5}", "limits.misses_per_window"),
    ],
    ids=lambda v: v if ":" not in v else None,
)  # fmt: skip
def test_bad_values_name_the_key(text: str, key: str) -> None:
    """A value of the wrong type or out of range is an error whose message starts with the key."""
    with pytest.raises(ConfigError) as caught:
        load_config(yaml_text=text, environ={})
    assert str(caught.value).startswith(f"{key}:")


@pytest.mark.parametrize(
    "text", ["listen: [", "- a list\n- at the top"], ids=["not-yaml", "not-a-mapping"]
)
def test_unreadable_files(text: str) -> None:
    """A file that is not YAML, or not a mapping, is a clear error."""
    with pytest.raises(ConfigError, match="config file"):
        load_config(yaml_text=text, environ={})


def test_empty_file_is_the_defaults() -> None:
    """An empty (or comments-only) file changes nothing."""
    assert load_config(yaml_text="# nothing\n", environ={}) == Config()


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [("0.0.0.0:8080", Endpoint("0.0.0.0", 8080)), ("[::1]:0", Endpoint("::1", 0))],
    ids=["v4", "v6"],
)
def test_parse_endpoint(text: str, endpoint: Endpoint) -> None:
    """HOST:PORT and [V6]:PORT parse; str() gives the same text back."""
    assert parse_endpoint(text) == endpoint
    assert str(endpoint) == text


# ---------------------------------------------------------------------------------------
# config/gateway.yaml
# ---------------------------------------------------------------------------------------


def test_example_config_loads() -> None:
    """config/gateway.yaml loads (every key in it is a real key with a good value)."""
    config = load_config(yaml_text=EXAMPLE.read_text(), environ={})
    assert config.domains == ("box.runra.dev",)
    assert config.routing.public_url_template == "https://{port}-{label}.box.runra.dev"
    assert config.workers == 2
    assert config.redis.url is not None


def test_example_config_has_every_key() -> None:
    """config/gateway.yaml sets every key of gateway/config.py except the secret token."""
    tree = yaml.safe_load(EXAMPLE.read_text())
    assert yaml_keys(tree) == leaf_keys(Config) - {"admin_token"}


def test_example_config_allows_private_sandbox_networks_only() -> None:
    """The production example lists private sandbox networks: no loopback, no metadata."""
    config = load_config(yaml_text=EXAMPLE.read_text(), environ={})
    for network in config.sandbox_networks:
        assert network.is_private and not network.is_loopback and not network.is_link_local
    for forbidden in ("127.0.0.1", "::1", "169.254.169.254", "0.0.0.0"):
        ip = ipaddress.ip_address(forbidden)
        assert not any(ip in net for net in config.sandbox_networks)
    trusted = config.trusted_networks
    assert not any(
        t.overlaps(s) for t in trusted for s in config.sandbox_networks if t.version == s.version
    )
