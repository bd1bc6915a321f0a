"""The ``connserver`` command. Only this module configures logging and signals."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from typing import Any, Sequence

from . import __version__
from .config import Config, config_fields, parse_address
from .errors import ConfigError
from .handler import Handler

__all__ = ["main", "build_parser", "load_handler", "BUILTIN_APPS", "DEFAULT_PORT"]

DEFAULT_PORT = 7070
DEFAULT_APP = "chat"
BUILTIN_APPS = {
    "chat": "connserver.apps.chat:ChatHandler",
    "echo": "connserver.apps.echo:EchoHandler",
    "framed-echo": "connserver.apps.echo:FramedEchoHandler",
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
        "serve", help="run a server", description="Run a connserver server until SIGTERM/SIGINT.")
    serve.add_argument("app", nargs="?", default=DEFAULT_APP,
                       help="module:HandlerClass, or a built-in: "
                            f"{', '.join(BUILTIN_APPS)} (default: {DEFAULT_APP})")
    serve.add_argument("--bind", metavar="HOST:PORT", default=f"127.0.0.1:{DEFAULT_PORT}",
                       help=f"address to listen on; [::1]:PORT for IPv6 "
                            f"(default: 127.0.0.1:{DEFAULT_PORT}; use 0.0.0.0:PORT for all interfaces)")
    serve.add_argument("--config", metavar="FILE", help="TOML file of settings; flags override it")
    serve.add_argument("--log-level", default="info",
                       choices=("debug", "info", "warning", "error"), help="(default: info)")
    add_config_arguments(serve)
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
    from .server import Server   # imported here so `connserver --help` stays fast

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = build_config(args)
        handler = load_handler(args.app)
        address = parse_bind(args.bind)
    except (ConfigError, UsageError) as exc:
        print(f"connserver: error: {exc}", file=sys.stderr)
        return 2
    try:
        server = Server(address, handler, config)
    except OSError as exc:
        print(f"connserver: error: cannot listen on {args.bind}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop_requested.is_set():
            log.warning("second %s: forcing shutdown now", signal.Signals(signum).name)
            server.force()
        else:
            stop_requested.set()   # before logging: a second signal may arrive mid-log
            log.info("%s: draining (up to %.1f s)", signal.Signals(signum).name,
                     config.graceful_timeout)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with server:
            server.start()
            host, port = server.server_address[:2]
            log.info("listening on %s", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            stop_requested.wait()
            done = threading.Event()
            result: list = []

            def drain() -> None:
                try:
                    result.append(server.shutdown(config.graceful_timeout))
                finally:
                    done.set()

            threading.Thread(target=drain, name="connserver-shutdown").start()
            done.wait()
            report = result[0] if result else None
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)
    if report is None:
        return 1
    log.info("stopped: %d drained, %d forced, %d stuck thread(s)",
             report.drained, report.forced, len(report.stuck))
    if not report.clean:
        # The stuck threads were logged with their stacks; they would keep the
        # process alive forever, and a daemon's stop must not hang.
        logging.shutdown()
        os._exit(1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    parser.print_help()
    return 2
