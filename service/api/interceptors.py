"""Server interceptors: domain errors -> gRPC status codes (mapped once, here), bearer-token
auth, and per-RPC outcome accounting. Health checks and reflection bypass auth so that
Kubernetes probes and grpcurl keep working."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any, Awaitable, Callable, Protocol

import grpc

from service import errors

log = logging.getLogger(__name__)

STATUS_OF: dict[type[errors.QuorumError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


def status_of(exc: BaseException) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


class RpcObserver(Protocol):
    def on_rpc_start(self, method: str) -> None: ...

    def on_rpc(self, method: str, code: grpc.StatusCode, seconds: float, request: Any = None) -> None:
        """`request` is the unary request message (None for client-streaming RPCs)."""


class _Unparsable:
    """Stands in for request bytes that do not parse, so the handler answers INTERNAL with
    what failed, as gRPC's C++/Java/sync-Python servers do (grpc.aio alone says UNKNOWN)."""

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
            return _Unparsable(f"request bytes do not parse as {kind}: {exc}")

    return parse


async def _parsed(requests: Any, context: grpc.aio.ServicerContext) -> Any:
    """A client stream's requests, ending the call with INTERNAL at one that did not parse."""
    async for request in requests:
        if isinstance(request, _Unparsable):
            await context.abort(grpc.StatusCode.INTERNAL, request.message)
        yield request


def _wrap(handler: grpc.RpcMethodHandler, method: str, token: bytes | None,
          observer: RpcObserver | None) -> grpc.RpcMethodHandler:
    """Rewrap the handler's behaviour, keeping its (de)serializers and streaming kind."""
    check_auth = token is not None and not method.startswith(OPEN_SERVICES)

    def authorize(context: grpc.aio.ServicerContext) -> None:
        if not check_auth:
            return
        sent = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not (isinstance(sent, str) and sent.startswith("Bearer ")
                and hmac.compare_digest(sent[7:].encode(), token)):
            raise errors.Unauthenticated("missing or invalid bearer token in 'authorization' metadata")

    async def fail(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        code = status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error in %s", method, exc_info=exc)
        await context.abort(code, str(exc) or type(exc).__name__)

    def observe(code: grpc.StatusCode, start: float, request: Any = None) -> None:
        if observer is not None:
            observer.on_rpc(method, code, time.perf_counter() - start, request)

    # The unary and streaming wrappers repeat the same try/except on purpose: factoring it
    # into an async context manager costs a generator and two awaits on every request.
    if handler.unary_unary or handler.stream_unary:
        inner: Callable[..., Awaitable[Any]] = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            if observer is not None:
                observer.on_rpc_start(method)
            code = grpc.StatusCode.OK
            try:
                authorize(context)
                if isinstance(request, _Unparsable):
                    await context.abort(grpc.StatusCode.INTERNAL, request.message)
                return await inner(_parsed(request, context) if handler.stream_unary else request, context)
            except errors.QuorumError as exc:
                code = status_of(exc)
                await fail(context, exc)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception as exc:  # anything else is a bug: INTERNAL, logged, server lives on
                code = grpc.StatusCode.INTERNAL
                await fail(context, exc)
            finally:
                observe(code, start, request if handler.unary_unary else None)

        factory = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
                   else grpc.stream_unary_rpc_method_handler)
        return factory(unary, request_deserializer=_tolerant(handler.request_deserializer),
                       response_serializer=handler.response_serializer)

    inner_stream = handler.unary_stream or handler.stream_stream

    async def streaming(request: Any, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        if observer is not None:
            observer.on_rpc_start(method)
        code = grpc.StatusCode.OK
        try:
            authorize(context)
            if isinstance(request, _Unparsable):
                await context.abort(grpc.StatusCode.INTERNAL, request.message)
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
        except Exception as exc:  # a bug: INTERNAL, logged
            code = grpc.StatusCode.INTERNAL
            await fail(context, exc)
        finally:
            observe(code, start, request if handler.unary_stream else None)

    factory = (grpc.unary_stream_rpc_method_handler if handler.unary_stream
               else grpc.stream_stream_rpc_method_handler)
    return factory(streaming, request_deserializer=_tolerant(handler.request_deserializer),
                   response_serializer=handler.response_serializer)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every RPC handler once per method (cached), so the per-call cost is a dict hit."""

    def __init__(self, token: str | None = None, observer: RpcObserver | None = None) -> None:
        self._token = token.encode() if token else None
        self._observer = observer
        self._cache: dict[str, grpc.RpcMethodHandler | None] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method in self._cache:
            return self._cache[method]
        handler = await continuation(handler_call_details)
        wrapped = None if handler is None else _wrap(handler, method, self._token, self._observer)
        self._cache[method] = wrapped
        return wrapped
