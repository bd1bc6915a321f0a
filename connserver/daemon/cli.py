"""The ``connserver`` command. Only this module configures logging and signals."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any, NoReturn, Sequence

from .. import __version__
from ..config import Config, config_fields, parse_address
from .listeners import check_inherited_fd, systemd_listen_fds
from .logging_setup import configure_logging
from ..errors import ConfigError
from ..broadcast.backplane import require_redis_client
from ..core.handler import Handler
from ..soak.runner import add_soak_parser, run_from_args as soak
from ..lab.cli import add_lab_parser, run_from_args as lab

__all__ = ["main", "build_parser", "load_handler", "BUILTIN_APPS", "DEFAULT_PORT"]

DEFAULT_PORT = 7070
#: More worker processes than this is a typo, not a plan: each is a whole server.
MAX_WORKERS = 1024
DEFAULT_APP = "chat"
BUILTIN_APPS = {
    "chat": "connserver.apps.chat:ChatHandler",
    "echo": "connserver.apps.echo:EchoHandler",
    "framed-echo": "connserver.apps.echo:FramedEchoHandler",
    "leaky-echo": "connserver.apps.leaky:LeakyEchoHandler",   # a deliberate leak, for demos
    "ws-echo": "connserver.apps.ws_echo:WebSocketEchoHandler",   # needs connserver[websocket]
    "ws-chat": "connserver.apps.ws_chat:WebSocketChatHandler",   # the chat, for browsers
}

log = logging.getLogger("connserver.cli")


class UsageError(Exception):
    """A command-line or configuration mistake: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line: the usage of ``serve`` runs to 30 lines."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_KIND_NAMES = {int: "a whole number", float: "a number"}


def _parse_value(kind: type, nullable: bool):
    def parse(text: str) -> Any:
        if nullable and text.lower() in ("none", "off", "unlimited"):
            return None
        try:
            return kind(text)
        except ValueError:
            expected = _KIND_NAMES.get(kind, f"a {kind.__name__}")
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    parse.__name__ = kind.__name__
    return parse


def _help_text(field: Any, spec: Any) -> str:
    default = field.default
    shown = ("none" if default is None else str(default).lower() if spec.kind is bool
             else ", ".join(default) or "none" if spec.kind is tuple else default)
    bounds = ""
    if spec.minimum and not spec.exclusive_minimum:
        bounds += f"; at least {spec.quantity(spec.minimum)}"
    if spec.maximum is not None:
        bounds += f"; at most {spec.quantity(spec.maximum)}"
    return f"{spec.help} (default: {shown}{bounds})"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field, generated from the field declarations."""
    group = parser.add_argument_group("server settings (also keys of the --config TOML file)")
    for field, spec in config_fields():
        help_text = _help_text(field, spec)
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
    parser = _Parser(
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
                              f"to use every core; at most {MAX_WORKERS} (default: one "
                              "process, no supervisor)")
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
    add_lab_parser(commands)
    return parser


def parse_bind(text: str) -> tuple[str, int]:
    try:
        return parse_address(text, "--bind")
    except ConfigError as exc:
        raise UsageError(f"--bind {text!r}: expected HOST:PORT (or [IPv6]:PORT)") from exc


def check_bind(text: str) -> None:
    """Refuse a ``--bind`` that could not be what was meant, before anything starts."""
    if text.startswith("unix:"):
        if not text[len("unix:"):]:
            # An empty path would make the kernel bind a random abstract name.
            raise UsageError(f"--bind {text!r}: expected unix:/path/to/socket")
    else:
        parse_bind(text)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def load_handler(spec: str) -> type[Handler]:
    """Import ``module:Class`` (the current directory is importable) or a built-in name."""
    target = BUILTIN_APPS.get(spec, spec)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr or module_name.startswith("."):
        raise UsageError(f"app {spec!r}: expected module:HandlerClass or one of {', '.join(BUILTIN_APPS)}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"app {spec!r}: cannot import {module_name!r}: {_one_line(str(exc))}") from exc
    except Exception as exc:
        # The app's own bug (a SyntaxError, a failing top-level statement): one line
        # here, and the way to see its traceback.
        raise UsageError(
            f"app {spec!r}: importing {module_name!r} raised {type(exc).__name__}: "
            f"{_one_line(str(exc))} (python -c 'import {module_name}' shows the traceback)"
        ) from exc
    handler = module
    for part in attr.split("."):
        handler = getattr(handler, part, None)
        if handler is None:
            raise UsageError(f"app {spec!r}: {module_name!r} has no attribute {attr!r}")
    if not (isinstance(handler, type) and issubclass(handler, Handler)):
        raise UsageError(f"app {spec!r}: {attr} is not a connserver.Handler subclass")
    return handler


def build_config(args: argparse.Namespace) -> Config:
    config = Config.from_toml(args.config) if args.config is not None else Config()
    # Flags not given are absent from args (SUPPRESS), so "none" can mean None.
    overrides = {field.name: getattr(args, field.name) for field, _ in config_fields()
                 if hasattr(args, field.name)}
    return config.replace(**overrides)


def _configure_logging(args: argparse.Namespace) -> None:
    if args.log_file == "":
        raise UsageError("--log-file '': expected a file name")
    try:
        configure_logging(args.log_level, args.log_format, args.log_file, args.access_log)
    except OSError as exc:
        raise UsageError(f"cannot open log file {args.log_file!r}: {exc.strerror or exc}") from exc


def serve(args: argparse.Namespace) -> int:
    from .process import DaemonOptions, make_listeners, run_daemon

    try:
        _configure_logging(args)
        config = build_config(args)
        handler = load_handler(args.app)
        if args.workers is not None and not 1 <= args.workers <= MAX_WORKERS:
            raise UsageError(f"--workers must be from 1 to {MAX_WORKERS}")
        if args.worker_max_connections is not None and args.worker_max_connections < 1:
            raise UsageError("--worker-max-connections must be at least 1")
        binds = args.bind or ([] if args.fd or systemd_listen_fds()
                              else [f"127.0.0.1:{DEFAULT_PORT}"])
        for bind in binds:
            check_bind(bind)
        for fd in args.fd:
            try:
                check_inherited_fd(fd)
            except OSError as exc:
                raise UsageError(f"--fd: {exc.strerror or exc}") from exc
        if config.backplane is not None:
            require_redis_client()   # a clear error now, not one per worker later
        elif args.workers is not None and args.workers > 1:
            logging.getLogger("connserver.daemon").warning(
                "hubs are per process: with --workers %d, a broadcast (a chat room) reaches only "
                "the connections of its own worker; --backplane redis://HOST:PORT/0 makes one "
                "room of them", args.workers)
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
        where = [*binds, *(f"fd {fd}" for fd in args.fd)]
        if config.admin_address is not None:
            where.append(f"the admin address {config.admin_address}")
        print(f"connserver: error: cannot listen on {', '.join(where) or 'the systemd fds'}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "soak":
        return soak(args)
    if args.command == "lab":
        return lab(args)
    parser.print_help()
    return 2
