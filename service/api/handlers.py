"""The wrapping of every RPC handler, once, as it is registered (the server has no
interceptors): HandlerWrapper, and the Registrar that stands for the server while servicers
add their handlers. What a wrapped call does is service.api.wrapped_call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import grpc

from service.api.admission import Admission
from service.api.wrapped_call import RpcObserver, wrap_handler
from service.batching.priority import Priority
from service.monitoring.tracing import Tracing


class HandlerWrapper:
    """Wraps every RPC handler once, as it is registered: the per-call cost is the wrapper
    alone. A server interceptor would find the wrapped handler per call through a chain of
    Python coroutines (grpc.aio and pygrpc-native each run theirs on every call: 3.3 % of the
    event loop in a native ensemble profile). Calls to unknown methods never reach a wrapper:
    gRPC answers them UNIMPLEMENTED, as before."""

    def __init__(self, token: str | None = None, observer: RpcObserver | None = None,
                 admission: Admission | None = None, tracing: Tracing | None = None,
                 pushback: bool = True,
                 priorities: Callable[[str], Callable[[Any], Priority | None] | None] | None = None) -> None:
        """pushback: refusals carry `grpc-retry-pushback-ms` (see engine.sends_grpc_trailers).
        priorities: per method, what reads a request's priority for admission (None: none)."""
        self._priorities = priorities
        self._token = token.encode() if token else None
        self._pushback = pushback
        self._observer = observer
        self._admission = admission
        self._tracing = tracing or Tracing.disabled()

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return wrap_handler(handler, method, self._token, self._observer, self._admission, self._tracing,
                            self._pushback, self._priorities(method) if self._priorities is not None else None)

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
