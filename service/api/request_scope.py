"""What every request gets at the edge, whatever the front (gRPC or HTTP): its request id
(the client's own, else one generated) in every log line written while it is handled and in
the response, and, when tracing is on, its span with the stages the pipeline records.

Per request this is two context-variable sets and resets and, with tracing on, one span; the
stages are collected only when that span is sampled.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Mapping
from typing import Any

from service.logs import REQUEST_ID
from service.monitoring.stages import ATTRIBUTES, COLLECTOR, Stage
from service.monitoring.tracing import Tracing

REQUEST_ID_KEY = "x-request-id"
"""Response metadata (gRPC) and header (HTTP) carrying the request id."""
MAX_CLIENT_ID = 128
_PREFIX = secrets.token_hex(4)  # ids stay unique across restarts and workers
_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_PREFIX}-{next(_COUNTER):x}"


def client_request_id(request: Any) -> str:
    """The id a client gave its request (KServe v2 `id`, quorum.v1 `request_id`), if any."""
    value = getattr(request, "id", "") or getattr(request, "request_id", "")
    return value[:MAX_CLIENT_ID] if isinstance(value, str) else ""


class RequestScope:
    """Entered when a request starts, closed when it ends (in the same task)."""

    __slots__ = ("request_id", "_tracing", "_span", "_id_token", "_stages_token", "_attributes_token")

    def __init__(self, tracing: Tracing, name: str, request_id: str,
                 carrier: Mapping[str, str] | None = None) -> None:
        self.request_id = request_id
        self._tracing = tracing
        self._id_token = REQUEST_ID.set(request_id)
        self._span = self._stages_token = self._attributes_token = None
        if tracing.enabled:
            span = self._span = tracing.start_rpc(name, carrier or {}, {"quorum.request_id": request_id})
            if span is not None and span.is_recording():  # None only while tracing is disabled
                self._stages_token = COLLECTOR.set([])
                self._attributes_token = ATTRIBUTES.set({})

    def close(self, code: str, attributes: Mapping[str, Any] | None = None) -> None:
        """End the request: its span gets the status `code`, the stages and the attributes
        recorded meanwhile, and a final stage from the last recorded one to now (encoding
        the answer)."""
        if self._span is not None:
            stages = COLLECTOR.get() if self._stages_token is not None else None
            if stages:
                end = time.monotonic()
                stages.append(Stage("encode and respond", max(s.end for s in stages), end))
            recorded = dict(ATTRIBUTES.get() or ()) if self._attributes_token is not None else {}
            self._tracing.finish(self._span, code, stages or (), {**recorded, **(attributes or {})})
            if self._stages_token is not None:
                COLLECTOR.reset(self._stages_token)
            if self._attributes_token is not None:  # set with the stages' token
                ATTRIBUTES.reset(self._attributes_token)
        REQUEST_ID.reset(self._id_token)
