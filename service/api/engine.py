"""Which gRPC server the API runs on: grpcio's `grpc.aio.server`, or pygrpc-native's drop-in
(`pygrpc_native.aio.server`: HTTP/2 and gRPC framing in Rust, outside the GIL; the same
servicers; client-/bidi-streaming methods such as reflection go to a grpcio
server behind it on a Unix socket).

pygrpc-native has no TLS: with TLS configured the server is always grpcio, and asking for
the native engine explicitly then refuses to start rather than serve something else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import grpc

log = logging.getLogger(__name__)

Engine = Literal["grpcio", "native"]
ENGINES: tuple[Engine, ...] = ("grpcio", "native")
DEFAULT_PLAINTEXT: Engine = "grpcio"
"""The engine of a plaintext server when none is asked for (see README, "gRPC engine")."""


def sends_grpc_trailers(engine: Engine) -> bool:
    """Whether a handler may set trailing metadata under a `grpc-` key (gRPC's retry pushback,
    `grpc-retry-pushback-ms`). pygrpc-native 0.5 reserves every `grpc-` key for its methods:
    its front raises when one is set and the call is then never answered, so the client waits
    out its deadline (measured: every RESOURCE_EXHAUSTED of an overload run lost so)."""
    return engine != "native"


class EngineUnavailable(ValueError):
    """The requested engine cannot serve these settings."""


def resolve_engine(requested: Engine | None, tls: bool) -> Engine:
    """The engine to build: the one asked for, else the default; TLS is grpcio only."""
    if tls:
        if requested == "native":
            raise EngineUnavailable(
                "--grpc-engine native has no TLS: drop QUORUM_TLS_CERT/QUORUM_TLS_KEY or use "
                "--grpc-engine grpcio (the default with TLS)")
        return "grpcio"
    return requested or DEFAULT_PLAINTEXT


def build_server(engine: Engine, *, options: Sequence[tuple[str, Any]]) -> grpc.aio.Server:
    """A server with no interceptors: handlers come wrapped (interceptors.HandlerWrapper)."""
    if engine == "native":
        import pygrpc_native.aio

        return pygrpc_native.aio.server(options=list(options))
    return grpc.aio.server(options=list(options))


class HandlerRegistry(Protocol):
    """The registration half of a gRPC server, what generated `add_*Servicer_to_server` calls:
    grpc.aio.Server (pygrpc-native's too) or `handlers.Registrar`, which wraps each handler
    on its way in."""

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None: ...

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None: ...


class _CallDetails(grpc.HandlerCallDetails):
    """The details of a call to `method`, to ask a generic handler for its method handler."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class _Collect:
    """Stands in for the server while older generated code registers a servicer."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        pass  # newer generated code registers both ways; the generic handler has them all


def add_servicer(server: HandlerRegistry, add_to_server: Callable[[Any, Any], None], servicer: Any,
                 service: Any) -> None:
    """`add_to_server(servicer, server)`, with the methods also registered by name.
    Older generated code (tensorflow-serving-api's) registers only a generic handler, which
    pygrpc-native leaves to its grpcio fallback behind a Unix socket: TF Serving's Predict
    would pay grpcio and a second hop. The method handlers are asked of that generic
    handler (its public `service()`), one per method of the `service` descriptor."""
    collected = _Collect()
    add_to_server(servicer, collected)
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        for generic in collected.generic:
            handler = generic.service(_CallDetails(f"/{service.full_name}/{method.name}"))
            if handler is not None:
                handlers[method.name] = handler
                break
    server.add_generic_rpc_handlers(tuple(collected.generic))
    server.add_registered_method_handlers(service.full_name, handlers)
