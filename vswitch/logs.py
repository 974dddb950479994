"""Daemon logging: the classic text lines, or one JSON object per line (log.format: json)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

# What every LogRecord has; anything else on a record came from ``extra=`` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonLogFormatter(logging.Formatter):
    """{"ts", "level", "logger", "node", "msg", ...extra fields[, "exc"]} on one line."""

    def __init__(self, node: str = "") -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        out = {"ts": ts.replace("+00:00", "Z"), "level": record.levelname.lower(), "logger": record.name,
               "node": self.node, "msg": record.getMessage()}
        for k, v in vars(record).items():
            if k not in _STANDARD and k not in out:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)  # json escapes newlines: one record stays one line


def configure(level: str, fmt: str, node: str) -> None:
    """Root logging to stderr, as `vswitch run` wants it."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLogFormatter(node))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s node={node} %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
