"""Logging setup: one line per record, text or JSON, to stderr."""

import json
import logging
import sys
from copy import copy
from datetime import UTC, datetime

from node_agent.escaping import printable


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception text)."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, one line per record: control characters in the message
    (which can quote a Secret's registry key or a node file) are escaped, so input cannot
    forge log lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        safe = copy(record)
        safe.message = printable(record.message)
        return super().formatMessage(safe)


def fatal_json(message: str) -> str:
    """A command's final error as one JSON log record (logger `node_agent`, level error)."""
    record = logging.LogRecord("node_agent", logging.ERROR, "", 0, "%s", (message,), None)
    return JsonFormatter().format(record)


def configure_logging(*, log_format: str, level: str) -> None:
    """Route the agent's logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
