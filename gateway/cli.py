"""The ``gateway`` command: serve, sandbox ..., ports ..., events.

Output is JSON on stdout; an error is one clear line on stderr and a non-zero exit
(1 for a refused operation, 2 for bad usage). Every command but ``serve`` finds Redis
from ``--redis-url``, then ``GATEWAY_REDIS_URL``, then the embedded Redis a local
``gateway serve`` recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import uvloop

from gateway import embedded, errors
from gateway.config import Config, ConfigError, load_config
from gateway.control.api import sandbox_json
from gateway.routing import store

Command = Callable[[store.RouteWriter, argparse.Namespace], Awaitable[Any]]


# How long one blocking read of `gateway events --follow` waits; the events client's
# socket timeout is longer, so a quiet stream never looks like a dead Redis.
EVENTS_BLOCK_SECONDS = 5.0
STATE_DIR_SOURCE = "the embedded Redis recorded in the state dir"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 refused, 2 bad usage, 130 ^C)."""
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    try:
        if args.command == "serve":
            return _serve(args, raw[raw.index("serve") + 1 :])
        return asyncio.run(_run_writer_command(args))
    except (errors.GatewayError, ConfigError) as exc:
        _fail(exc.message if isinstance(exc, errors.GatewayError) else str(exc))
        return 1
    except OSError as exc:
        # E.g. a listener address already in use: the operator needs the reason, not a trace.
        _fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        return 1
    except KeyboardInterrupt:
        return 130


def _fail(message: str) -> None:
    """The one line on stderr every failure gets (messages may quote multi-line text)."""
    print(f"gateway: {' '.join(message.split())}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (its default prints the whole usage first)."""

    def error(self, message: str) -> typing.NoReturn:
        _fail(f"{self.prog}: {message} (see {self.prog} --help)")
        sys.exit(2)


# ---------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace, serve_argv: list[str]) -> int:
    # The writer commands need none of the proxy: import it only here.
    from gateway import server, workers  # noqa: PLC0415

    config = load_serve_config(args, os.environ)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if config.workers > 1:
        return uvloop.run(workers.serve_workers(config, serve_argv, on_ready=server.print_ready))
    uvloop.run(server.serve(config, on_ready=server.print_ready))
    return 0


def load_serve_config(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Flags over environment over file over defaults."""
    yaml_text = None
    if args.config:
        try:
            yaml_text = Path(args.config).read_text()
        except OSError as exc:
            raise ConfigError(f"--config: cannot read {args.config}: {exc.strerror}") from None
    overrides: dict[str, Any] = {}
    if args.redis_url:
        overrides["redis"] = {"url": args.redis_url}
    if args.listen:
        overrides["listen"] = args.listen
    if args.admin_listen:
        overrides["admin_listen"] = args.admin_listen
    if args.domain:
        overrides["domains"] = [d.lower() for d in args.domain]
    if args.workers is not None:
        overrides["workers"] = args.workers
    config = load_config(yaml_text=yaml_text, environ=environ, overrides=overrides)
    return config


# ---------------------------------------------------------------------------------------
# Writer commands
# ---------------------------------------------------------------------------------------


async def _run_writer_command(args: argparse.Namespace) -> int:
    url, source = _redis_url(args)
    timeout = EVENTS_BLOCK_SECONDS + 2.0 if args.command == "events" else 2.0
    try:
        client = store.open_client(url, timeout_seconds=timeout)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    try:
        if source == STATE_DIR_SOURCE:
            await _check_embedded_answers(client, url)
        return await _run_on(client, args)
    finally:
        await client.aclose()


async def _check_embedded_answers(client: store.Client, url: str) -> None:
    """A URL left behind by a serve that crashed names a socket nobody answers on."""
    try:
        with store.redis_errors("a ping"):
            async with asyncio.timeout(2.0):
                await client.ping()
    except errors.StoreUnavailable:
        raise errors.StoreUnavailable(
            f"no gateway serve is running on this machine (the embedded Redis it recorded, "
            f"{url}, does not answer); start `gateway serve` or pass --redis-url"
        ) from None


async def _run_on(client: store.Client, args: argparse.Namespace) -> int:
    try:
        if args.command == "events":
            async for event in store.read_events(
                client, follow=args.follow, block_seconds=EVENTS_BLOCK_SECONDS
            ):
                print(json.dumps(event), flush=True)
            return 0
        result = await args.handler(store.RouteWriter(client), args)
        print(json.dumps(result), flush=True)
    except BrokenPipeError:
        # `gateway events | head`: the reader is gone, which is not an error of ours.
        # Point stdout at /dev/null so the interpreter's flush at exit fails quietly too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _redis_url(args: argparse.Namespace) -> tuple[str, str]:
    """The Redis URL and where it came from (for error messages)."""
    if args.redis_url:
        return str(args.redis_url), "--redis-url"
    url = os.environ.get("GATEWAY_REDIS_URL")
    if url:
        return url, "GATEWAY_REDIS_URL"
    state_dir = embedded.default_state_dir()
    recorded = embedded.recorded_url(state_dir)
    if recorded is None:
        raise errors.TableNotInitialised(
            f"no gateway serve is running on this machine (no embedded Redis found in "
            f"{state_dir}); start `gateway serve` or pass --redis-url"
        )
    return recorded, STATE_DIR_SOURCE


async def _sandbox_create(writer: store.RouteWriter, args: argparse.Namespace) -> Any:
    record = await writer.create(args.id, address=args.address, allow_ports=args.allow_ports)
    return sandbox_json(record, await writer.settings())


async def _sandbox_show(writer: store.RouteWriter, args: argparse.Namespace) -> Any:
    return sandbox_json(await writer.show(args.id), await writer.settings())


async def _sandbox_pause(writer: store.RouteWriter, args: argparse.Namespace) -> Any:
    return sandbox_json(await writer.pause(args.id), await writer.settings())


async def _sandbox_resume(writer: store.RouteWriter, args: argparse.Namespace) -> Any:
    return sandbox_json(await writer.resume(args.id, address=args.address), await writer.settings())


async def _sandbox_terminate(writer: store.RouteWriter, args: argparse.Namespace) -> Any:
    return sandbox_json(await writer.terminate(args.id), await writer.settings())


async def _ports_expose(writer: store.RouteWriter, args: argparse.Namespace) -> Any:
    exposure, _ = await writer.expose(args.id, args.port, host_rewrite=args.host_rewrite)
    return exposure.as_json()


async def _ports_list(writer: store.RouteWriter, args: argparse.Namespace) -> Any:
    return [e.as_json() for e in await writer.list_ports(args.id)]


async def _ports_close(writer: store.RouteWriter, args: argparse.Namespace) -> Any:
    return sandbox_json(await writer.close(args.id, args.port), await writer.settings())


# ---------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``gateway`` argument parser (every subcommand takes ``--redis-url``)."""
    common = _Parser(add_help=False)
    common.add_argument("--redis-url", help="Redis URL (default: $GATEWAY_REDIS_URL, then "
                        "the embedded Redis of a local `gateway serve`)")  # fmt: skip
    parser = _Parser(prog="gateway", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=[common], help="run the gateway")
    serve.add_argument("--config", help="YAML config file (see config/gateway.yaml)")
    serve.add_argument("--listen", help="public listener HOST:PORT (default 0.0.0.0:8080)")
    serve.add_argument("--admin-listen", help="admin listener HOST:PORT (default 127.0.0.1:8081)")
    serve.add_argument("--domain", action="append", help="sandbox domain (repeatable)")
    serve.add_argument("--workers", type=int, help="worker processes")

    sandbox = commands.add_parser("sandbox", help="create, show, pause, resume, terminate")
    sandbox_commands = sandbox.add_subparsers(dest="action", required=True)
    create = sandbox_commands.add_parser("create", parents=[common])
    create.add_argument("id")
    create.add_argument("--address", required=True, help="the sandbox's internal IP")
    create.add_argument("--allow-ports", help="comma-separated ports that may be exposed")
    create.set_defaults(handler=_sandbox_create)
    for name, handler in (
        ("show", _sandbox_show), ("pause", _sandbox_pause), ("terminate", _sandbox_terminate),
    ):  # fmt: skip
        sub = sandbox_commands.add_parser(name, parents=[common])
        sub.add_argument("id")
        sub.set_defaults(handler=handler)
    resume = sandbox_commands.add_parser("resume", parents=[common])
    resume.add_argument("id")
    resume.add_argument("--address", help="a new internal IP")
    resume.set_defaults(handler=_sandbox_resume)

    ports = commands.add_parser("ports", help="expose, list, close")
    port_commands = ports.add_subparsers(dest="action", required=True)
    expose = port_commands.add_parser("expose", parents=[common])
    expose.add_argument("id")
    expose.add_argument("port")
    expose.add_argument("--host-rewrite", action="store_true",
                        help="send Host: localhost:PORT to the sandbox")  # fmt: skip
    expose.set_defaults(handler=_ports_expose)
    listing = port_commands.add_parser("list", parents=[common])
    listing.add_argument("id")
    listing.set_defaults(handler=_ports_list)
    close = port_commands.add_parser("close", parents=[common])
    close.add_argument("id")
    close.add_argument("port")
    close.set_defaults(handler=_ports_close)

    events = commands.add_parser("events", parents=[common], help="print route-table events")
    events.add_argument("--follow", action="store_true", help="keep printing new events")
    return parser
