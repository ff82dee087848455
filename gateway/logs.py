"""Structured logging: one JSON object per line, built with orjson, with repeats rate-limited."""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
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

# Marks the summaries RepeatFilter writes itself, so its own filter lets them through.
_SUMMARY: Final = "_repeat_summary"

_Key = tuple[str, int, str]


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


@dataclass(slots=True)
class _Window:
    """One key's open window: when it ends, and what it has suppressed so far."""

    end: float
    count: int = 0
    timer: asyncio.AbstractEventLoop | None = None  # the loop holding this window's timer
    # The last suppressed record, already formatted: keeping the record would keep its
    # args (exceptions, their tracebacks and frames) alive for the whole window.
    message: str = ""
    fields: dict[str, Any] | None = None
    pathname: str = ""
    lineno: int = 0
    func: str | None = None


class RepeatFilter(logging.Filter):
    """Writes the first warning of a kind at once, then one summary per window of repeats.

    A kind is (logger, level, message template). The access log and records below WARNING
    always pass. Summaries go straight to `handler`.
    """

    def __init__(
        self,
        handler: logging.Handler,
        *,
        window_s: float = 10,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        super().__init__()
        self._handler = handler
        self._window_s = window_s
        self._clock = clock
        self._max_keys = max_keys
        # Ordered by window start (a key that starts a new window moves to the end), so
        # the windows that have ended are always at the front.
        self._windows: OrderedDict[_Key, _Window] = OrderedDict()
        # Records come from any thread (asyncio's default executor logs too).
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        """Let the record through, or count it as a repeat of its kind's open window."""
        if (
            record.levelno < logging.WARNING
            or record.name == ACCESS_LOGGER
            or getattr(record, _SUMMARY, False)
            # A template is a str; any other object would be a key per call (or unhashable).
            or not isinstance(record.msg, str)
        ):
            return True
        key = (record.name, record.levelno, record.msg)
        with self._lock:
            now = self._clock()
            summaries = self._expire(now)
            window = self._windows.get(key)
            if window is None:
                passes = True
                if len(self._windows) >= self._max_keys:
                    # Full: the oldest window is closed early rather than memory grown.
                    oldest_key, oldest = self._windows.popitem(last=False)
                    if oldest.count:
                        summaries.append(self._summary(oldest_key, oldest))
                self._windows[key] = _Window(end=now + self._window_s)
            else:
                passes = False
                self._suppress(key, window, record, now)
        self._write(summaries)
        return passes

    @property
    def open_windows(self) -> int:
        """How many kinds of record have a window open (never more than `max_keys`)."""
        return len(self._windows)

    def flush(self) -> None:
        """Write the summary of every window holding repeats, and forget every key."""
        with self._lock:
            summaries = [self._summary(k, w) for k, w in self._windows.items() if w.count]
            self._windows.clear()
        self._write(summaries)

    def _suppress(self, key: _Key, window: _Window, record: logging.LogRecord, now: float) -> None:
        """Count `record` in `window`; make sure a timer will write the summary on time."""
        window.count += 1
        try:
            window.message = record.getMessage()
        except Exception:  # a bad format/args pair must not raise out of log.warning()
            window.message = str(record.msg)
        fields = getattr(record, "fields", None)
        window.fields = dict(fields) if isinstance(fields, dict) else None
        window.pathname, window.lineno = record.pathname, record.lineno
        window.func = record.funcName
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop here: the next record of the key, or flush(), writes it
        # A window's timer is armed once per loop; a loop closed since dropped its timers.
        if window.timer is not loop:
            window.timer = loop
            loop.call_later(window.end - now, self._on_timer, key, window)

    def _on_timer(self, key: _Key, window: _Window) -> None:
        """Write `window`'s summary if it is still open and has ended by the clock."""
        with self._lock:
            if self._windows.get(key) is not window:
                return  # already written by a record, flush() or eviction
            now = self._clock()
            if now < window.end:
                # The loop's clock ran ahead of ours (its timers fire up to a resolution early).
                asyncio.get_running_loop().call_later(window.end - now, self._on_timer, key, window)
                return
            summaries = self._expire(now)
        self._write(summaries)

    def _expire(self, now: float) -> list[logging.LogRecord]:
        """Close every window that has ended: a summary if it held repeats, else forget it."""
        summaries = []
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if window.end > now:
                break
            del self._windows[key]
            if window.count:
                summaries.append(self._summary(key, window))
                # The summary is the first line of a new window for the same kind.
                self._windows[key] = _Window(end=now + self._window_s)
        return summaries

    def _summary(self, key: _Key, window: _Window) -> logging.LogRecord:
        """The line standing for `window`'s repeats: its last message and how many there were."""
        name, level, _ = key
        summary = logging.LogRecord(
            name, level, window.pathname, window.lineno, window.message, None, None, window.func
        )
        summary.fields = {
            **(window.fields or {}),
            "repeated": window.count,
            "window_s": self._window_s,
        }
        setattr(summary, _SUMMARY, True)
        return summary

    def _write(self, summaries: list[logging.LogRecord]) -> None:
        # Outside the lock: the handler takes its own lock, and an emit that logs must not
        # find ours held.
        for summary in summaries:
            self._handler.handle(summary)


def flush_logs() -> None:
    """Write the summaries the root logger's repeat filters still hold (atexit does it too)."""
    for handler in logging.getLogger().handlers:
        for f in handler.filters:
            if isinstance(f, RepeatFilter):
                f.flush()


def setup_logging(
    level: str = "info", *, stream: Any = None, clock: Callable[[], float] = time.monotonic
) -> None:
    """Send every gateway log record to `stream` (stderr) as JSON lines at `level`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatFilter(handler, clock=clock))
    # Counts held by a previous setup's filter go to that setup's stream first.
    flush_logs()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # aiohttp's own access log is replaced by ours.
    logging.getLogger("aiohttp.access").disabled = True
    # A loop's timers die with it: what is still counted at exit is written then. atexit
    # runs last-in first-out, so this comes before logging.shutdown closes the streams.
    atexit.unregister(flush_logs)
    atexit.register(flush_logs)
