"""The ``connserver`` command. Only this module configures logging and signals."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any, Sequence

from . import __version__
from .config import Config, config_fields, parse_address
from .listeners import systemd_listen_fds
from .logsetup import configure_logging
from .errors import ConfigError
from .handler import Handler
from .soak import add_soak_parser, run_from_args as soak

__all__ = ["main", "build_parser", "load_handler", "BUILTIN_APPS", "DEFAULT_PORT"]

DEFAULT_PORT = 7070
DEFAULT_APP = "chat"
BUILTIN_APPS = {
    "chat": "connserver.apps.chat:ChatHandler",
    "echo": "connserver.apps.echo:EchoHandler",
    "framed-echo": "connserver.apps.echo:FramedEchoHandler",
    "leaky-echo": "connserver.apps.leaky:LeakyEchoHandler",   # a deliberate leak, for demos
}

log = logging.getLogger("connserver.cli")


class UsageError(Exception):
    """A command-line or configuration mistake: one line, exit code 2."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_value(kind: type, nullable: bool):
    def parse(text: str) -> Any:
        if nullable and text.lower() in ("none", "off", "unlimited"):
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
    parse.__name__ = kind.__name__
    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field, generated from the field declarations."""
    group = parser.add_argument_group("server settings (also keys of the --config TOML file)")
    for field, spec in config_fields():
        default = field.default
        shown = ("none" if default is None else str(default).lower() if spec.kind is bool
                 else ", ".join(default) or "none" if spec.kind is tuple else default)
        help_text = f"{spec.help} (default: {shown})"
        if spec.kind is bool:
            group.add_argument(_flag(field.name), dest=field.name, default=argparse.SUPPRESS,
                               action=argparse.BooleanOptionalAction, help=help_text)
        elif spec.kind is tuple:
            group.add_argument(_flag(field.name), *spec.aliases, dest=field.name,
                               default=argparse.SUPPRESS, action="append",
                               metavar=spec.metavar or "VALUE", help=help_text.replace("%", "%%"))
        else:
            group.add_argument(_flag(field.name), *spec.aliases, dest=field.name,
                               default=argparse.SUPPRESS,
                               metavar=None if spec.choices else spec.metavar or spec.kind.__name__.upper(),
                               choices=spec.choices, type=_parse_value(spec.kind, spec.nullable),
                               help=help_text.replace("%", "%%"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="connserver",
        description="Serve long-lived TCP connections, one thread each, without leaks.")
    parser.add_argument("--version", action="version", version=f"connserver {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run a server",
        description="Run a connserver server until SIGTERM/SIGINT (drain, then exit 0; a "
                    "second signal forces the rest shut). SIGUSR1 logs a census and thread "
                    "dump; SIGHUP reopens the log file.")
    serve.add_argument("app", nargs="?", default=DEFAULT_APP,
                       help="module:HandlerClass (the current directory is importable), or a "
                            f"built-in: {', '.join(BUILTIN_APPS)} (default: {DEFAULT_APP})")
    where = serve.add_argument_group("where to listen")
    where.add_argument("--bind", metavar="ADDRESS", action="append", default=None,
                       help="HOST:PORT, [IPv6]:PORT or unix:/path (created with mode 0600); "
                            f"repeatable (default: 127.0.0.1:{DEFAULT_PORT}; all interfaces "
                            "only with an explicit --bind 0.0.0.0:PORT)")
    where.add_argument("--fd", metavar="N", type=int, action="append", default=[],
                       help="serve on an inherited listening socket; repeatable (systemd "
                            "socket activation via LISTEN_FDS is picked up by itself)")
    process = serve.add_argument_group("process")
    process.add_argument("--config", metavar="FILE", help="TOML file of settings; flags override it")
    process.add_argument("--workers", metavar="N", type=int, default=None,
                         help="pre-fork N worker processes sharing the port (SO_REUSEPORT), "
                              "to use every core (default: one process, no supervisor)")
    process.add_argument("--worker-max-connections", metavar="N", type=int, default=None,
                         help="recycle a worker after about N connections (±10%% jitter); "
                              "a last line of defence against slow leaks in handler code")
    process.add_argument("--log-level", default="info",
                         choices=("debug", "info", "warning", "error"), help="(default: info)")
    process.add_argument("--log-format", default="text", choices=("text", "json"),
                         help="(default: text)")
    process.add_argument("--log-file", metavar="FILE",
                         help="log to FILE instead of stderr; SIGHUP reopens it")
    process.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                         help="one line per closed connection on connserver.access (default: on)")
    add_config_arguments(serve)
    add_soak_parser(commands)
    return parser


def parse_bind(text: str) -> tuple[str, int]:
    try:
        return parse_address(text, "--bind")
    except ConfigError as exc:
        raise UsageError(f"--bind {text!r}: expected HOST:PORT (or [IPv6]:PORT)") from exc


def load_handler(spec: str) -> type[Handler]:
    """Import ``module:Class`` (the current directory is importable) or a built-in name."""
    target = BUILTIN_APPS.get(spec, spec)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"app {spec!r}: expected module:HandlerClass or one of {', '.join(BUILTIN_APPS)}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"app {spec!r}: cannot import {module_name!r}: {exc}") from exc
    handler = module
    for part in attr.split("."):
        handler = getattr(handler, part, None)
        if handler is None:
            raise UsageError(f"app {spec!r}: {module_name!r} has no attribute {attr!r}")
    if not (isinstance(handler, type) and issubclass(handler, Handler)):
        raise UsageError(f"app {spec!r}: {attr} is not a connserver.Handler subclass")
    return handler


def build_config(args: argparse.Namespace) -> Config:
    config = Config.from_toml(args.config) if args.config else Config()
    # Flags not given are absent from args (SUPPRESS), so "none" can mean None.
    overrides = {field.name: getattr(args, field.name) for field, _ in config_fields()
                 if hasattr(args, field.name)}
    return config.replace(**overrides)


def serve(args: argparse.Namespace) -> int:
    from .daemon import DaemonOptions, make_listeners, run_daemon

    configure_logging(args.log_level, args.log_format, args.log_file, args.access_log)
    try:
        config = build_config(args)
        handler = load_handler(args.app)
        if args.workers is not None and args.workers < 1:
            raise UsageError("--workers must be at least 1")
        if args.worker_max_connections is not None and args.worker_max_connections < 1:
            raise UsageError("--worker-max-connections must be at least 1")
        binds = args.bind or ([] if args.fd or systemd_listen_fds()
                              else [f"127.0.0.1:{DEFAULT_PORT}"])
        for bind in binds:
            if not bind.startswith("unix:"):
                parse_bind(bind)
    except (ConfigError, UsageError) as exc:
        print(f"connserver: error: {exc}", file=sys.stderr)
        return 2
    options = DaemonOptions(handler=handler, config=config, binds=binds, fds=args.fd,
                            worker_max_connections=args.worker_max_connections)
    try:
        if args.workers is not None:
            from .supervisor import run_supervisor

            return run_supervisor(options, args.workers)
        listeners = make_listeners(binds, args.fd, config.backlog)
        return run_daemon(options, listeners)
    except ConfigError as exc:
        print(f"connserver: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"connserver: error: cannot listen on {', '.join(binds) or 'the given fds'}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "soak":
        return soak(args)
    parser.print_help()
    return 2
