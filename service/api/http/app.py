"""What the HTTP routes of both protocols share: the application's keys, request deadlines,
body reads and JSON answers (the front that assembles them is service/api/http/front.py).

Bodies beyond max_message_bytes get 413 before they are read (from Content-Length) or as
soon as the read passes the limit (chunked). Deadlines: the `grpc-timeout` header (gRPC's
syntax, e.g. `250m`, `2S`) on both APIs, and Triton's `timeout` request parameter
(microseconds) on /v2 infer.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

from aiohttp import web

from service.api.context import ApiContext
from service.api.http.offload import BodyDecoder
from service.errors import InvalidInput

API = web.AppKey("api", ApiContext)
MAX_BODY = web.AppKey("max_body", int)
BODY_TIMEOUT = web.AppKey("body_timeout_s", float)
DECODER = web.AppKey("decoder", BodyDecoder)
"""Large JSON bodies and answers go through it (service/api/http/offload.py)."""
SERVICERS = web.AppKey("servicers", dict)
"""The gRPC servicers whose answers the REST routes reuse, by protocol."""

_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_UNIT_S = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def deadline(request: web.Request, timeout_us: Any = None) -> float | None:
    """The request's deadline as a time.monotonic() instant: the `grpc-timeout` header
    and/or a v2 `timeout` parameter in microseconds, whichever is sooner."""
    found = []
    header = request.headers.get("grpc-timeout")
    if header is not None:
        match = _TIMEOUT.match(header.strip())
        if not match:
            raise InvalidInput(f"grpc-timeout header {header!r} is not a number of 1-8 digits and a unit "
                               "(H, M, S, m, u, n), e.g. 250m")
        found.append(int(match[1]) * _UNIT_S[match[2]])
    if timeout_us is not None:
        if not isinstance(timeout_us, int) or isinstance(timeout_us, bool) or timeout_us < 0:
            raise InvalidInput("parameter 'timeout' must be a non-negative integer (microseconds)")
        if timeout_us:
            found.append(timeout_us / 1e6)
    return time.monotonic() + min(found) if found else None


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused with 413 before reading when Content-Length says it is too large,
    and with 408 when it has not all arrived within the body timeout (http_body_timeout_s)."""
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    timeout = request.app.get(BODY_TIMEOUT)
    try:
        async with asyncio.timeout(timeout):
            return await request.read()  # aiohttp stops at client_max_size (413) on chunked bodies too
    except TimeoutError:
        raise web.HTTPRequestTimeout(
            text=f"request body not received in full within {timeout:g} s (http_body_timeout_s)") from None


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), status=status,
                        content_type="application/json", headers=headers)
