"""What every wrapped RPC call does around its handler: domain errors answered with their
status (status_codes.py), bearer-token auth, admission (admission.py), request bounds, and
per-RPC outcome accounting. The wrapping is done once, at registration (handlers.py; the
server has no interceptors). Health checks and reflection
bypass auth (so that Kubernetes probes and grpcurl keep working) and admission (they answer
until the server closes)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, Awaitable, Callable, Protocol

import grpc

from service import errors
from service.api.admission import ALWAYS_ANSWERED, Admission
from service.api.common import remaining_s
from service.api.limits import check_request, short
from service.api.status_codes import status_of
from service.batching.priority import Priority
from service.api.request_scope import REQUEST_ID_KEY, RequestScope, client_request_id, new_request_id
from service.monitoring.tracing import Tracing

PUSHBACK_KEY = "grpc-retry-pushback-ms"

# Lines keep the handlers' logger name, as before the split: operators filter the logs on it.
log = logging.getLogger("service.api.handlers")

MAX_DETAILS = 1024
"""Longest error message sent back: names in messages are quoted short (limits.short),
and nothing a client sent is ever echoed back whole."""

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


class RpcObserver(Protocol):
    def on_rpc_start(self, method: str) -> None: ...

    def on_rpc(self, method: str, code: grpc.StatusCode, seconds: float, request: Any = None) -> None:
        """`request` is the unary request message (None for client-streaming RPCs)."""


class _Unparsable:
    """Stands in for request bytes that do not parse, so the handler answers
    INVALID_ARGUMENT with what failed: the client sent them (grpc.aio itself would say
    UNKNOWN, other gRPC servers INTERNAL, which means a bug of ours)."""

    def __init__(self, message: str) -> None:
        self.message = message


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    kind = getattr(descriptor, "full_name", "the request message")

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or a custom deserializer's error
            return _Unparsable(f"request bytes do not parse as {kind}: {short(str(exc))}")

    return parse


def _passing_bytes(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """The serializer, letting through a response its handler already wrote as bytes (the
    v2 ModelInfer answer, codecs.v2_response)."""
    if serializer is None:
        return None

    def serialize(response: Any) -> bytes:
        return response if response.__class__ is bytes else serializer(response)

    return serialize


async def _parsed(requests: Any, context: grpc.aio.ServicerContext) -> Any:
    """A client stream's requests, ending the call with INVALID_ARGUMENT at one that did not
    parse or is out of bounds."""
    async for request in requests:
        if isinstance(request, _Unparsable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        check_request(request)
        yield request


_DENIED = "missing or invalid bearer token in 'authorization' metadata"


def bearer_matches(metadata: Any, token: bytes) -> bool:
    """Exactly one `authorization` entry, "Bearer <token>" with the scheme in any case
    (RFC 6750 and 7235); several entries are refused rather than one picked."""
    sent = [value for key, value in (metadata or ()) if key == "authorization"]
    if len(sent) != 1 or not isinstance(sent[0], str):
        return False
    scheme, _, credentials = sent[0].partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token)


def _cancelled_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    remaining = remaining_s(context)
    return (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0
            else grpc.StatusCode.CANCELLED)


def wrap_handler(handler: grpc.RpcMethodHandler, method: str, token: bytes | None,
                 observer: RpcObserver | None, admission: Admission | None,
                 tracing: Tracing = Tracing.disabled(), pushback: bool = True,
                 priority_of: Callable[[Any], Priority | None] | None = None) -> grpc.RpcMethodHandler:
    """Rewrap the handler's behaviour, keeping its (de)serializers and streaming kind.
    `priority_of`: the level a (unary) request asks, for admission (api/priority.at_entry)."""
    open_service = method.startswith(OPEN_SERVICES)
    span_name = method[1:]
    required = None if open_service else token  # the bearer token this method asks for
    gate = None if open_service or method in ALWAYS_ANSWERED else admission

    def authorize(context: grpc.aio.ServicerContext) -> None:
        if required is not None and not bearer_matches(context.invocation_metadata(), required):
            raise errors.Unauthenticated(_DENIED)

    async def fail(context: grpc.aio.ServicerContext, exc: BaseException, request_id: str | None = None) -> None:
        code = status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error in %s", method, exc_info=exc)
        retry_after_s = getattr(exc, "retry_after_s", None) if pushback else None
        if retry_after_s is not None:  # gRPC's retry pushback: when to come back (A6)
            trailer = ((PUSHBACK_KEY, str(max(1, round(retry_after_s * 1000)))),)
            context.set_trailing_metadata(trailer + (((REQUEST_ID_KEY, request_id),) if request_id else ()))
        details = str(exc) or type(exc).__name__
        try:
            await context.abort(code, details if len(details) <= MAX_DETAILS else details[:MAX_DETAILS] + "...")
        except grpc.aio.AbortError:
            raise
        except Exception:  # noqa: BLE001 - the send failed: gRPC had ended the call (cancelled, expired)
            # grpc.aio raises its ExecuteBatchError and would log it at ERROR with a traceback
            # (under overload, for every call whose deadline passed on its way in); there is
            # nobody to tell: the call ends as cancelled, which grpc.aio logs at DEBUG.
            raise asyncio.CancelledError from None

    def observe(code: grpc.StatusCode, start: float, request: Any = None) -> None:
        if observer is not None:
            observer.on_rpc(method, code, time.perf_counter() - start, request)

    # The unary and streaming wrappers repeat the same try/except on purpose: factoring it
    # into an async context manager costs a generator and two awaits on every request.
    if handler.unary_unary or handler.stream_unary:
        # grpc-stubs 1.53 types a handler's behaviour as a sync grpc callable (and Optional);
        # a grpc.aio server's handlers are coroutine functions, and this branch has one.
        inner: Callable[..., Awaitable[Any]] = handler.unary_unary or handler.stream_unary  # type: ignore[assignment]

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            if observer is not None:
                observer.on_rpc_start(method)
            code = grpc.StatusCode.OK
            entered: Admission | None = None  # the gate, once entered
            scope = None
            if not open_service:  # probes and reflection get no request id or span
                scope = RequestScope(tracing, span_name, client_request_id(request) or new_request_id(),
                                     dict(context.invocation_metadata() or ()) if tracing.enabled else None)
                context.set_trailing_metadata(((REQUEST_ID_KEY, scope.request_id),))
            try:
                authorize(context)
                if gate is not None:
                    gate.enter(remaining_s(context), priority_of(request) if priority_of is not None
                               and not isinstance(request, _Unparsable) else None)
                    entered = gate
                if isinstance(request, _Unparsable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                if handler.unary_unary:
                    check_request(request)
                return await inner(_parsed(request, context) if handler.stream_unary else request, context)
            except errors.QuorumError as exc:
                code = status_of(exc)
                await fail(context, exc, scope.request_id if scope is not None else None)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:  # the client cancelled, or its deadline passed
                code = _cancelled_code(context)
                raise
            except Exception as exc:  # anything else is a bug: INTERNAL, logged, server lives on
                code = status_of(exc)
                await fail(context, exc)
            finally:
                if entered is not None:
                    entered.leave()
                observe(code, start, request if handler.unary_unary and not isinstance(request, _Unparsable) else None)
                if scope is not None:
                    scope.close(code.name)

        factory = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
                   else grpc.stream_unary_rpc_method_handler)
        return factory(unary, request_deserializer=_tolerant(handler.request_deserializer),
                       response_serializer=_passing_bytes(handler.response_serializer))

    # As `inner` above (grpc-stubs: a sync callable, Optional): an async generator function,
    # or a coroutine function that streams with context.write.
    inner_stream: Callable[..., Any] = handler.unary_stream or handler.stream_stream  # type: ignore[assignment]

    async def streaming(request: Any, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        if observer is not None:
            observer.on_rpc_start(method)
        code = grpc.StatusCode.OK
        entered: Admission | None = None  # the gate, once entered
        try:
            authorize(context)
            if gate is not None:
                gate.enter()
                entered = gate
            if isinstance(request, _Unparsable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            if handler.unary_stream:
                check_request(request)
            responses = inner_stream(_parsed(request, context) if handler.stream_stream else request, context)
            if hasattr(responses, "__aiter__"):
                async for item in responses:
                    yield item
            else:  # a coroutine that streams with context.write (e.g. Health/Watch)
                await responses
        except errors.QuorumError as exc:
            code = status_of(exc)
            await fail(context, exc)
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except asyncio.CancelledError:
            code = _cancelled_code(context)
            raise
        except Exception as exc:  # a bug: INTERNAL, logged
            code = status_of(exc)
            await fail(context, exc)
        finally:
            if entered is not None:
                entered.leave()
            if code == grpc.StatusCode.OK and context.cancelled():  # a stream the client cancelled
                code = _cancelled_code(context)
            observe(code, start, request if handler.unary_stream and not isinstance(request, _Unparsable) else None)

    factory = (grpc.unary_stream_rpc_method_handler if handler.unary_stream
               else grpc.stream_stream_rpc_method_handler)
    return factory(streaming, request_deserializer=_tolerant(handler.request_deserializer),
                   response_serializer=handler.response_serializer)
