"""Domain errors -> HTTP: the gRPC code the gRPC handler wrapper's table gives (one table for both
fronts), then the HTTP status for that code as Google's API mapping, grpc-gateway and TF
Serving's REST front translate it. The body is TF Serving's and Triton's `{"error": ...}`,
plus the gRPC code name."""

from __future__ import annotations

import grpc

from service.api.status_codes import status_of

C = grpc.StatusCode
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    C.OK: 200,
    C.INVALID_ARGUMENT: 400,
    C.OUT_OF_RANGE: 400,
    C.FAILED_PRECONDITION: 400,  # as Google's mapping and TF Serving; the body names the precondition
    C.UNAUTHENTICATED: 401,
    C.PERMISSION_DENIED: 403,
    C.NOT_FOUND: 404,
    C.ALREADY_EXISTS: 409,
    C.ABORTED: 409,
    C.RESOURCE_EXHAUSTED: 429,
    C.CANCELLED: 499,
    C.UNIMPLEMENTED: 501,
    C.UNAVAILABLE: 503,
    C.DEADLINE_EXCEEDED: 504,
}
GRPC_CODE = {status: code for code, status in reversed(HTTP_STATUS.items())}
GRPC_CODE.update({413: C.RESOURCE_EXHAUSTED, 405: C.UNIMPLEMENTED, 411: C.INVALID_ARGUMENT,
                  415: C.INVALID_ARGUMENT, 500: C.INTERNAL})
RETRY_AFTER_S = {C.RESOURCE_EXHAUSTED: 1, C.UNAVAILABLE: 1}
"""Overload and not-ready answers tell clients when to come back (429 and 503)."""


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def grpc_code(status: int) -> grpc.StatusCode:
    """The gRPC code an HTTP status counts as in metrics (its class when not listed)."""
    return GRPC_CODE.get(status) or (C.OK if status < 400 else C.INVALID_ARGUMENT if status < 500 else C.INTERNAL)


def error_of(exc: BaseException) -> grpc.StatusCode:
    return status_of(exc)
