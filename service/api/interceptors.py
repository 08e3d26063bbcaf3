"""What wraps every RPC handler (once, at registration; the server has no interceptors):
domain errors -> gRPC status codes (mapped once, here), bearer-token auth, admission during
shutdown, request bounds, and per-RPC outcome accounting. Health checks and reflection
bypass auth (so that Kubernetes probes and grpcurl keep working) and admission (they answer
until the server closes)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Sequence
from typing import Any, Awaitable, Callable, Protocol

import grpc

from service import errors
from service.api.common import remaining_s
from service.api.limits import check_request, short
from service.api.request_scope import REQUEST_ID_KEY, RequestScope, client_request_id, new_request_id
from service.monitoring.tracing import Tracing

PUSHBACK_KEY = "grpc-retry-pushback-ms"

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
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}
MAX_DETAILS = 1024
"""Longest error message sent back: names in messages are quoted short (limits.short),
and nothing a client sent is ever echoed back whole."""

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
ALWAYS_ANSWERED = ("/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady",
                   "/inference.GRPCInferenceService/ServerMetadata")
"""Asked before and during loading (a client waiting for readiness): not held by admission."""


def status_of(exc: BaseException) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    if isinstance(exc, NotImplementedError):  # a generated servicer's default method
        return grpc.StatusCode.UNIMPLEMENTED
    return grpc.StatusCode.INTERNAL


class Admission:
    """Which calls the server still takes, and how many it is answering.

    Open while serving and through the drain delay; once closed (shutdown), every new call
    is refused at once with UNAVAILABLE, so the calls already accepted finish on a quiet
    loop and the transport closes with nothing left half-received.

    Under overload it fails fast: a call whose deadline is less than half the time the calls
    already in flight will take to finish (Little's law: in flight / measured completions
    per busy second) is refused at once with RESOURCE_EXHAUSTED, so the server spends its
    time on calls that can still be answered in time and the client can retry elsewhere.
    Half, not all: an ensemble answering at its straggler cutoff takes about its callers'
    deadline by design, and a call like theirs must still be let in.
    """

    RATE_WINDOW_S = 0.25  # busy seconds per completion-rate measurement
    SLACK = 2.0  # refuse when the work ahead exceeds this many times the deadline left

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.open = True
        self.loading = True
        """Until the first load has finished: a model call would find no model yet."""
        self.inflight = 0
        self._clock = clock
        self.last_arrival = clock()
        self._idle = asyncio.Event()
        self._idle.set()
        self.rate: float | None = None
        """Completions per second while busy (EWMA), None until first measured."""
        self._last_event = self.last_arrival
        self._busy_s = 0.0
        self._completed = 0

    def _account(self, now: float) -> None:
        if self.inflight:
            self._busy_s += now - self._last_event
        self._last_event = now

    def enter(self, time_left_s: float | None = None) -> None:
        now = self.last_arrival = self._clock()
        if not self.open:
            raise errors.Unavailable("server is shutting down; retry on another replica")
        if self.loading:
            raise errors.Unavailable("server is still loading its models; retry shortly")
        if time_left_s is not None and time_left_s <= 0:
            # Its own deadline, not the load, ends such a call: refused as DEADLINE_EXCEEDED.
            raise errors.DeadlineExceeded("the call's deadline passed before it was admitted")
        if time_left_s is not None and self.inflight and self.rate:
            wait_s = self.inflight / self.rate
            if wait_s > self.SLACK * time_left_s:
                raise errors.Overloaded(
                    f"server overloaded: {self.inflight} calls in flight, about {wait_s * 1000:.0f} ms of work "
                    f"at {self.rate:.0f} calls/s, more than twice the {max(time_left_s, 0.0) * 1000:.0f} ms "
                    f"this call's deadline leaves; retry later or elsewhere", retry_after_s=wait_s)
        self._account(now)
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self._account(self._clock())
        self.inflight -= 1
        self._completed += 1
        if self._busy_s >= self.RATE_WINDOW_S:
            rate = self._completed / self._busy_s
            self.rate = rate if self.rate is None else 0.7 * self.rate + 0.3 * rate
            self._busy_s, self._completed = 0.0, 0
        if self.inflight == 0:
            self._idle.set()

    def close(self) -> None:
        self.open = False

    async def drained(self, deadline: float, quiet_s: float = 1.0) -> bool:
        """Wait (until `deadline`, time.monotonic) for every accepted call to finish and no
        call to arrive for quiet_s; False when the deadline came first."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._idle.wait(), remaining)
            except asyncio.TimeoutError:
                return False
            quiet = time.monotonic() - self.last_arrival
            if quiet >= quiet_s:
                return True
            await asyncio.sleep(min(quiet_s - quiet, max(0.0, deadline - time.monotonic())))


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


def _wrap(handler: grpc.RpcMethodHandler, method: str, token: bytes | None,
          observer: RpcObserver | None, admission: Admission | None,
          tracing: Tracing = Tracing.disabled(), pushback: bool = True) -> grpc.RpcMethodHandler:
    """Rewrap the handler's behaviour, keeping its (de)serializers and streaming kind."""
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
        await context.abort(code, details if len(details) <= MAX_DETAILS else details[:MAX_DETAILS] + "...")

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
                    gate.enter(remaining_s(context))
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


class HandlerWrapper:
    """Wraps every RPC handler once, as it is registered: the per-call cost is the wrapper
    alone. A server interceptor would find the wrapped handler per call through a chain of
    Python coroutines (grpc.aio and pygrpc-native each run theirs on every call: 3.3 % of the
    event loop in a native ensemble profile). Calls to unknown methods never reach a wrapper:
    gRPC answers them UNIMPLEMENTED, as before."""

    def __init__(self, token: str | None = None, observer: RpcObserver | None = None,
                 admission: Admission | None = None, tracing: Tracing | None = None,
                 pushback: bool = True) -> None:
        """pushback: refusals carry `grpc-retry-pushback-ms` (see engine.sends_grpc_trailers)."""
        self._token = token.encode() if token else None
        self._pushback = pushback
        self._observer = observer
        self._admission = admission
        self._tracing = tracing or Tracing.disabled()

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return _wrap(handler, method, self._token, self._observer, self._admission, self._tracing,
                     self._pushback)

    def generic(self, handler: grpc.GenericRpcHandler) -> grpc.GenericRpcHandler:
        if isinstance(handler, grpc.ServiceRpcHandler):  # pygrpc-native reads its service_name()
            return _WrappedService(handler, self.wrap)
        return _WrappedGeneric(handler, self.wrap)

    def registrar(self, server: grpc.aio.Server) -> Registrar:
        """Stands for `server` while servicers are added: whatever they register is wrapped."""
        return Registrar(server, self)


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose handlers come wrapped, each wrapped once (cached per method;
    a method it does not have leaves nothing behind)."""

    def __init__(self, inner: grpc.GenericRpcHandler,
                 wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]) -> None:
        self._inner = inner
        self._wrap = wrap
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        wrapped = self._cache.get(method)
        if wrapped is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            wrapped = self._cache[method] = self._wrap(method, handler)
        return wrapped


class _WrappedService(_WrappedGeneric, grpc.ServiceRpcHandler):
    def service_name(self) -> str:
        return self._inner.service_name()  # type: ignore[attr-defined]


class Registrar:
    """The registration half of a gRPC server, wrapping each handler on its way in (what
    generated `add_*Servicer_to_server`, health and reflection call)."""

    def __init__(self, server: grpc.aio.Server, wrapper: HandlerWrapper) -> None:
        self._server = server
        self._wrapper = wrapper

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(self._wrapper.generic(h) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        # grpc-stubs 1.53 predates grpc.aio.Server.add_registered_method_handlers (newer grpcio has it).
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service, {name: self._wrapper.wrap(f"/{service}/{name}", h) for name, h in handlers.items()})
