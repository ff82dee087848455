"""Structured logging: one JSON object per line, built with orjson."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Final

import orjson

ACCESS_LOGGER: Final = "gateway.access"

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line; `extra={"fields": {...}}` adds structured fields.

    orjson escapes every control character in values, so a hostile header value can never
    break a log line in two.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as a single JSON line."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        # orjson leaves U+2028/U+2029 raw (valid JSON), but line-splitting tools break on
        # them; in JSON text they can only stand inside strings, so escaping them is safe.
        return (
            orjson.dumps(entry, default=str)
            .decode()
            .replace("\u2028", "\\u2028")
            .replace("\u2029", "\\u2029")
        )


def setup_logging(level: str = "info", *, stream: Any = None) -> None:
    """Send every gateway log record to `stream` (stderr) as JSON lines at `level`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # aiohttp's own access log is replaced by ours.
    logging.getLogger("aiohttp.access").disabled = True
