"""Public host names -> ``(port, label)``, or the precise reason a host is refused.

Pure: imports neither aiohttp nor redis. Runs on every request before anything else, so
the host is judged without touching Redis (DESIGN.md section 5):

- ``UnknownHost`` (404): well-formed, but not ``{port}-{label}`` one label under a
  configured domain (another site, an IP address, the bare domain, a suffix trick).
- ``InvalidHost`` (400): not a valid host at all, or a malformed sandbox label or port text
  (including a leading zero, so every port has exactly one origin).
- ``InvalidPort`` (400): a well-formed number outside 1024-65535.

Messages are one sentence and may quote (a truncated part of) the client's Host value,
which is printable ASCII by then: renderers must escape them like any other text.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from gateway.errors import InvalidHost, InvalidPort, UnknownHost

__all__ = [
    "MAX_LABEL_LENGTH",
    "MAX_PORT",
    "MIN_PORT",
    "HostTarget",
    "check_absolute_target",
    "parse_host",
]

MIN_PORT = 1024
MAX_PORT = 65535
MAX_LABEL_LENGTH = 57  # "65535-" + 57 characters = 63, one DNS label
_MAX_DNS_LABEL = 63
_MAX_SHOWN = 80  # how much of a client-supplied value an error message quotes

# Anything but printable ASCII (this includes every whitespace character), plus the
# characters that make a Host value carry more than a host: userinfo, a path, a query, a
# fragment or a list (RFC 9112 section 3.2 says 400). Checked before lowercasing, because
# str.lower() maps some non-ASCII characters to ASCII (KELVIN SIGN -> "k").
_FORBIDDEN_CHAR = re.compile(r"[^!-~]|[@/\\?#,]")
_PORT_SUFFIX = re.compile(r"[0-9]{1,5}")
_SANDBOX_LABEL = re.compile(rf"[a-z0-9]{{1,{MAX_LABEL_LENGTH}}}")
_ABSOLUTE_FORM = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(?:[/?#].*)?", re.DOTALL)
_DEFAULT_PORT_SUFFIX = {"http": ":80", "https": ":443"}
# A configured domain the fast path may embed; anything else is left to the slow path.
_PLAIN_DOMAIN = re.compile(r"[a-z0-9-]+(?:\.[a-z0-9-]+)*")


@dataclass(frozen=True, slots=True)
class HostTarget:
    """Where a public host routes to: ``port`` inside the sandbox labelled ``label``."""

    port: int
    label: str


def parse_host(host: str | None, domains: Sequence[str]) -> HostTarget:
    """Parse a Host header value ``{port}-{label}.{domain}[.][:port]`` into a target.

    ``domains`` are the configured base domains, lowercase, without a trailing dot; the
    host must be exactly one label under one of them (the longest match wins). The
    ``:port`` suffix (the listener's port) is validated and ignored, as is one trailing
    dot. Case does not matter.

    Raises:
        InvalidHost: no Host; a character that cannot be in a host; a bad ``:port``
            suffix; an empty label; more than one label before the domain; a first
            label over 63 characters; no ``-``; port text that is not plain digits or
            has a leading zero; a label that is not 1-57 of ``[a-z0-9]``.
        InvalidPort: port text that is a number outside 1024-65535.
        UnknownHost: anything else not under a configured domain, including IP
            literals and the bare domain itself.

    Errors carry ``port`` and ``label`` when those parts were valid. Pass ``domains`` as
    a tuple: the fast path caches one compiled pattern per tuple.
    """
    if host is not None:
        target = _parse_common(host, tuple(domains))
        if target is not None:
            return target
    return _parse_stepwise(host, domains)


def check_absolute_target(target: str, host: str | None) -> None:
    """Refuse a request-target whose form or authority could route elsewhere than Host.

    Origin-form (``/path``) and ``*`` pass. Absolute-form (``http://authority/...`` or
    ``https://...``, scheme in any case) passes only if its authority equals the Host
    header, both lowercased and with the scheme's default port (``:80``/``:443``)
    removed, because routing uses Host and the sandbox must not see a different one.

    Raises:
        InvalidHost: absolute-form with userinfo, no authority, another scheme, or an
            authority that disagrees with Host; any other form (authority-form for
            CONNECT, garbage).
    """
    if target.startswith("/") or target == "*":
        return
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None:
        raise InvalidHost(
            f"request-target {_shown(target)} is neither origin-form nor absolute-form"
        )
    scheme = match.group(1).lower()
    suffix = _DEFAULT_PORT_SUFFIX.get(scheme)
    if suffix is None:
        raise InvalidHost(f"absolute-form target has unsupported scheme {_shown(scheme)}")
    authority = match.group(2).lower()
    if "@" in authority:
        raise InvalidHost("absolute-form target carries userinfo, which is not allowed")
    if not authority:
        raise InvalidHost("absolute-form target has no host")
    expected = _without_suffix(authority, suffix)
    actual = _without_suffix((host or "").lower(), suffix)
    if expected != actual:
        raise InvalidHost(
            f"absolute-form target {_shown(authority)} disagrees with Host {_shown(host or '')}"
        )


# --------------------------------------------------------------------------------------
# parse_host's fast path: one match for the common, valid case. It must accept a strict
# subset of what the step-by-step path accepts, with the same result (a property test
# checks this); anything it does not take, valid or not, goes the slow way.
# --------------------------------------------------------------------------------------


def _parse_common(host: str, domains: tuple[str, ...]) -> HostTarget | None:
    """The target of an ordinary valid host, or None to let the full parser judge it."""
    # isascii() first: str.lower() maps some non-ASCII characters to ASCII ones.
    if not host.isascii():
        return None
    pattern = _common_pattern(domains)
    match = pattern.fullmatch(host.lower()) if pattern is not None else None
    if match is None:
        return None
    port_text, label, listener_port = match.groups()
    port = int(port_text)
    if not MIN_PORT <= port <= MAX_PORT:
        return None
    if listener_port is not None and int(listener_port) > MAX_PORT:
        return None
    return HostTarget(port, label)


@functools.lru_cache(maxsize=16)
def _common_pattern(domains: tuple[str, ...]) -> re.Pattern[str] | None:
    """``{port}-{label}.{domain}[.][:port]`` for the plain domains of ``domains``."""
    plain = [re.escape(d) for d in domains if _PLAIN_DOMAIN.fullmatch(d)]
    if not plain:
        return None
    # A label has no dot, so at most one alternative can match: no longest-first ordering.
    return re.compile(
        rf"([1-9][0-9]{{3,4}})-([a-z0-9]{{1,{MAX_LABEL_LENGTH}}})\.(?:{'|'.join(plain)})"
        r"\.?(?::([0-9]{1,5}))?"
    )


# --------------------------------------------------------------------------------------
# parse_host, step by step (each step raises or hands a narrower string to the next).
# --------------------------------------------------------------------------------------


def _parse_stepwise(host: str | None, domains: Sequence[str]) -> HostTarget:
    """parse_host without the fast path: the reference grammar, with precise errors."""
    name = _host_name(host)
    domain = _matching_domain(name, domains)
    if domain is None:
        raise _unknown_host(name, domains)
    return _parse_first_label(name[: len(name) - len(domain) - 1], domain)


def _host_name(host: str | None) -> str:
    """The host without ``:port`` and one trailing dot, lowercased; raises if malformed."""
    if not host or host.isspace():
        raise InvalidHost("request has no Host header")
    if _FORBIDDEN_CHAR.search(host) is not None:
        raise InvalidHost("Host header contains a character that cannot be in a host name")
    host = host.lower()
    if host.startswith("["):
        _refuse_ip_literal(host)
    name, colon, port_text = host.partition(":")
    if colon:
        _check_port_suffix(port_text)
    if name.endswith("."):
        name = name[:-1]
    if not name or name.startswith(".") or name.endswith(".") or ".." in name:
        raise InvalidHost("Host header has an empty label")
    return name


def _check_port_suffix(port_text: str) -> None:
    """Accept the ``:port`` part of a Host value: 1-5 ASCII digits, at most 65535."""
    if ":" in port_text:
        raise InvalidHost("Host header has more than one port")
    if _PORT_SUFFIX.fullmatch(port_text) is None or int(port_text) > MAX_PORT:
        raise InvalidHost(f"Host header port {_shown(port_text)} is not a valid TCP port")


def _refuse_ip_literal(host: str) -> NoReturn:
    """Raise for a bracketed host: UnknownHost if it is a sound IPv6 literal, else invalid."""
    end = host.find("]")
    rest = host[end + 1 :]
    if end < 0 or (rest and not rest.startswith(":")):
        raise InvalidHost("Host header has a malformed IPv6 literal")
    if rest:
        _check_port_suffix(rest[1:])
    try:
        ipaddress.IPv6Address(host[1:end])
    except ValueError:
        raise InvalidHost("Host header has a malformed IPv6 literal") from None
    raise UnknownHost("an IP address is not a sandbox URL: use {port}-{label}.{domain}")


def _matching_domain(name: str, domains: Sequence[str]) -> str | None:
    """The longest of ``domains`` that ``name`` ends with on a label boundary, if any."""
    best: str | None = None
    for domain in domains:
        # endswith + one index instead of building "." + domain on every request.
        cut = len(name) - len(domain) - 1
        if (
            cut > 0
            and name.endswith(domain)
            and name[cut] == "."
            and (best is None or len(domain) > len(best))
        ):
            best = domain
    return best


def _unknown_host(name: str, domains: Sequence[str]) -> UnknownHost:
    """The UnknownHost for a name under no domain (the bare domain gets its own words)."""
    if name in domains:
        return UnknownHost(
            f"{_shown(name)} is the base domain itself; sandbox URLs look like "
            f"{{port}}-{{label}}.{name}"
        )
    return UnknownHost(f"host {_shown(name)} is not under a configured domain")


def _parse_first_label(prefix: str, domain: str) -> HostTarget:
    """Split the part before the domain, ``{port}-{label}``, into a validated target."""
    if "." in prefix:
        raise InvalidHost(
            f"host has more than one label before {domain}; sandbox URLs look like "
            f"{{port}}-{{label}}.{domain}"
        )
    if len(prefix) > _MAX_DNS_LABEL:
        raise InvalidHost(f"the host's first label is longer than {_MAX_DNS_LABEL} characters")
    port_text, hyphen, label = prefix.partition("-")
    if not hyphen:
        raise InvalidHost(
            f"the host's first label {_shown(prefix)} is not {{port}}-{{label}}, e.g. 3000-abc123"
        )
    label_ok = _SANDBOX_LABEL.fullmatch(label) is not None
    port = _parse_port(port_text, label if label_ok else None)
    if not label_ok:
        raise InvalidHost(
            f"sandbox label {_shown(label)} is invalid: it must be 1-{MAX_LABEL_LENGTH} "
            "lowercase letters or digits",
            port=port,
        )
    return HostTarget(port=port, label=label)


def _parse_port(text: str, label: str | None) -> int:
    """The port in the host's first label: canonical decimal digits within 1024-65535."""
    # After the ASCII check, str.isdigit() is true exactly for [0-9]+ (no superscripts).
    if not text.isdigit():
        raise InvalidHost(f"port {_shown(text)} is not a number", label=label)
    if len(text) > 1 and text.startswith("0"):
        raise InvalidHost(f"port {_shown(text)} has a leading zero", label=label)
    # The first label is at most 63 characters, so int() is cheap even for junk.
    port = int(text)
    if port < MIN_PORT:
        raise InvalidPort(
            f"port {port} is reserved: sandboxes expose ports {MIN_PORT}-{MAX_PORT}",
            label=label,
            port=port,
        )
    # No leading zero, so more than five digits is always above 65535.
    if port > MAX_PORT:
        raise InvalidPort(
            f"port {port} is out of range: sandboxes expose ports {MIN_PORT}-{MAX_PORT}",
            label=label,
            port=port,
        )
    return port


# --------------------------------------------------------------------------------------
# Small helpers.
# --------------------------------------------------------------------------------------


def _without_suffix(authority: str, suffix: str) -> str:
    """``authority`` without ``suffix`` (a default port) at its end."""
    return authority[: -len(suffix)] if authority.endswith(suffix) else authority


def _shown(text: str) -> str:
    """A client-supplied value quoted for an error message, cut to a readable length."""
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return repr(text)
