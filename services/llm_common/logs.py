"""Structured logs: one JSON object per line on stderr, fields passed through `extra=`.

    log.info("request_finished", extra={"request_id": rid, "completion_tokens": n})

prints {"ts": ..., "level": "INFO", "logger": ..., "event": "request_finished",
"request_id": ..., "completion_tokens": ...}. Shared by the engine and the gateway.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import IO, Any

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO") -> None:
    """Route every logger (ours, grpc's, uvicorn's) through one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def announce(event: str, **fields: object) -> None:
    """The one stdout line a supervisor (or a test) parses, e.g. the bound port."""
    print(json.dumps({"event": event, **fields}), flush=True)


def read_announcement(stream: IO[str], event: str, timeout: float) -> dict[str, Any]:
    """Read `stream` (a child's stdout) until the JSON line `{"event": event, ...}`.

    For supervisors and tests that start `--port 0` processes. Raises TimeoutError if the
    line does not come within `timeout` seconds (or the stream ends first).
    """
    found: dict[str, Any] = {}

    def scan() -> None:
        for line in stream:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("event") == event:
                found.update(obj)
                return

    reader = threading.Thread(target=scan, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        raise TimeoutError(f"no {event!r} line within {timeout} s")
    return found
