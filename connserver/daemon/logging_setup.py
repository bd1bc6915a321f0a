"""Logging for the daemon (the library itself never configures logging).

Text or JSON lines, to stderr or a file that SIGHUP reopens (for logrotate).
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["configure_logging", "reopen_log_files", "JsonFormatter"]

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "thread": record.threadName,
        }
        for key in ("conn_id", "peer"):
            if hasattr(record, key):
                document[key] = getattr(record, key)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document)


def configure_logging(level: str, log_format: str = "text", log_file: str | None = None,
                      access_log: bool = True) -> logging.Handler:
    """Send every log record to ``log_file`` (or stderr); ``OSError`` if it cannot be opened.

    The file is opened before any existing handler is removed, so a failure leaves
    logging as it was.
    """
    handler: logging.Handler
    # An empty name is a mistake (an unset variable in a unit file), not "stderr":
    # opening it fails, and the CLI says so.
    handler = (logging.FileHandler(log_file) if log_file is not None
               else logging.StreamHandler(sys.stderr))
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    access = logging.getLogger("connserver.access")
    access.disabled = not access_log
    return handler


def reopen_log_files() -> None:
    """Reopen every file handler (after logrotate moved the file away)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.close()
                handler.stream = handler._open()
            finally:
                handler.release()
