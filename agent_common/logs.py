"""Structured logs: one JSON object per line on stderr, carrying the request id of the work in progress."""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from contextvars import ContextVar

# The request being served on this thread/task; set by the HTTP middleware (cloud) or the Prefill
# handler (edge). Worker threads get it through contextvars.copy_context().
request_id_var: ContextVar[str | None] = ContextVar("kvwire_request_id", default=None)

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "service", "logger", "event", "request_id"?, ...extra fields} per record."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "event": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_") and key != "color_message":
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def clean_request_id(value: str | None, fresh_prefix: str = "") -> str:
    """The caller's request id if it is short and printable (it goes into every log line), else a fresh one."""
    if value and len(value) <= 64 and all(c.isalnum() or c in "-_.:" for c in value):
        return value
    return fresh_prefix + uuid.uuid4().hex


def setup_logging(service: str, level: str = "info") -> None:
    """Route every logger (ours, uvicorn's, transformers') through one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the cloud logs each request itself, with its id
    logging.captureWarnings(True)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields) -> None:
    """Log `event` with `fields` as top-level JSON keys."""
    logger.log(level, event, extra=fields)
