"""Structured JSON logs, one object per line, with secrets scrubbed.

Access records carry the request id, model, route, status, latency and tokens as fields.
No request headers are ever logged; as a second line of defence the formatter masks
anything that looks like a bearer token or API key in free-text messages and tracebacks.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from typing import Any, TextIO

import orjson

ACCESS_LOGGER = "sluice.access"
_SECRET = re.compile(r"(?i)(bearer\s+|api[-_]?key[\"'=:\s]+)[^\s\"',]+|\bsk-[A-Za-z0-9_\-]{6,}")
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "color_message"}
)


def scrub(text: str) -> str:
    """Mask bearer tokens and key-looking strings."""
    return _SECRET.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON object: ts, level, logger, msg, then the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = scrub(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str) -> None:
    """Send every logger (ours and uvicorn's) to stdout as JSON lines."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # Sluice writes its own access log


class AccessLog:
    """Writes one access record per request as a JSON line, in the same shape as every other
    log line. It bypasses the `logging` machinery (record objects, handler locks), which
    cost a tenth of the gateway's per-request CPU; it is a no-op when access logging is off
    or the log level is above info.

    The lines of one event-loop turn go out in one write and one flush, at the end of the
    turn: a flush per request was a system call per request, and one that releases the GIL,
    handing it to any other thread that wants it (the SQLite writer's) and waiting to get
    it back. Outside an event loop a line is written at once; ``flush()`` writes what is
    pending (the lifespan calls it at shutdown).
    """

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled and logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)
        self._stream = stream or sys.stdout
        self._pending: list[str] = []

    def write(self, fields: dict[str, Any]) -> None:
        if not self.enabled:
            return
        entry = {"ts": round(time.time(), 6), **_ACCESS_HEADER, **fields}
        pending = self._pending
        pending.append(orjson.dumps(entry, default=str).decode())
        if len(pending) == 1:  # the turn's first line: flush when the turn ends
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop in this thread
                self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        lines.append("")  # the last line's newline
        self._stream.write("\n".join(lines))
        self._stream.flush()


_ACCESS_HEADER = {"level": "info", "logger": ACCESS_LOGGER, "msg": "request"}
