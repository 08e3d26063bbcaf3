"""Logging set-up: text or JSON lines (`--log-format`), and the request id on every line
written while a request is handled.

The API layer sets `REQUEST_ID` when an RPC starts (the client's own id, else a generated
one) and returns it in the response metadata; a context variable follows the request's
task, so concurrent requests never see each other's id. Log lines never carry payloads or
credentials: request ids are bounded and only ids, names and codes are logged.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(request_suffix)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (and a ready-made text suffix) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        record.request_id = request_id
        record.request_suffix = f" [request_id={request_id}]" if request_id else ""
        return True


class _JsonFormatter(JsonFormatter):
    """One JSON object per line; `request_id` only on lines about a request."""

    def add_fields(self, log_record: dict, record: logging.LogRecord, message_dict: dict) -> None:
        super().add_fields(log_record, record, message_dict)
        log_record.pop("request_suffix", None)
        if not log_record.get("request_id"):
            log_record.pop("request_id", None)


def configure_logging(level: str = "INFO", fmt: Literal["text", "json"] = "text", stream=None) -> None:
    """Replace the root logger's handlers with one that writes `fmt` lines to `stream`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter(
            JSON_FIELDS, rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
