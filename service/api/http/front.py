"""The HTTP/REST front assembled: one aiohttp server on the gRPC server's asyncio loop, serving
TF Serving's REST API (/v1) and KServe v2 REST (/v2) over the same data plane.

Per request, as the gRPC handler wrapper does: bearer-token auth (health stays open), domain
errors mapped once to a status and a JSON `{"error": ...}` body, outcome metrics and a trace.
The routes (v2.py, tfserving.py) import only what they share (app.py); this module imports
them, so the package has no import cycle.
"""

from __future__ import annotations

import hmac
import logging
import ssl
import time
from typing import Any

import grpc
from aiohttp import web

from service.api.context import ApiContext
from service.api.http import errors as http_errors
from service.api.http import tfserving, v2
from service.api.http.app import API, BODY_TIMEOUT, DECODER, MAX_BODY, SERVICERS, json_response
from service.api.http.offload import BodyDecoder
from service.api.wrapped_call import RpcObserver
from service.api.request_scope import MAX_CLIENT_ID, REQUEST_ID_KEY, RequestScope, new_request_id
from service.errors import QuorumError, Unauthenticated
from service.monitoring.tracing import Tracing
from service.settings import Settings

log = logging.getLogger(__name__)

OPEN_PATHS = ("/v2/health/",)


class _Named:
    """What the metrics observer reads the model label from (as from a gRPC request)."""

    __slots__ = ("model_name",)

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name


def error_response(code: grpc.StatusCode, message: str, status: int | None = None) -> web.Response:
    status = status or http_errors.http_status(code)
    headers = {}
    if code in http_errors.RETRY_AFTER_S:
        headers["Retry-After"] = str(http_errors.RETRY_AFTER_S[code])
    if code == grpc.StatusCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    return json_response({"error": message, "code": code.name}, status, headers)


def bearer_matches(header: str, token: bytes) -> bool:
    """`Authorization: Bearer <token>`, the scheme in any case (RFC 7235), token compared in constant time."""
    scheme, _, sent = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(sent.strip().encode(), token)


def make_app(api: ApiContext, *, max_body_bytes: int, token: str | None = None,
             observer: RpcObserver | None = None, tracing: Tracing | None = None,
             body_timeout_s: float | None = None) -> web.Application:

    secret = token.encode() if token else None
    tracing = tracing or Tracing.disabled()
    methods: dict[str | None, str] = {}

    def method_of(route: str | None) -> str:
        """Route name "kserve_v2.ModelInfer_version" -> metrics method "/rest.kserve_v2/ModelInfer"."""
        api_name, _, rpc = (route or "unknown.unknown").partition(".")
        return methods.setdefault(route, f"/rest.{api_name}/{rpc.partition('_')[0]}")

    @web.middleware
    async def front(request: web.Request, handler) -> web.StreamResponse:
        start = time.perf_counter()
        route = request.match_info.route.name
        method = methods.get(route) or method_of(route)
        if observer is not None:
            observer.on_rpc_start(method)
        code, status = grpc.StatusCode.OK, 200
        scope = RequestScope(tracing, f"{request.method} {route or request.path[:64]}",
                             request.headers.get(REQUEST_ID_KEY, "")[:MAX_CLIENT_ID] or new_request_id(),
                             request.headers if tracing.enabled else None)
        response = None
        try:
            if secret is not None and not request.path.startswith(OPEN_PATHS):
                sent = request.headers.getall("Authorization", [])
                if len(sent) > 1:  # as on gRPC: several are refused rather than one picked
                    raise Unauthenticated(f"{len(sent)} 'Authorization' headers: send exactly one bearer token")
                if not bearer_matches(sent[0] if sent else "", secret):
                    raise Unauthenticated("missing or invalid bearer token in the 'Authorization' header")
            response = await handler(request)
            status = response.status
            code = http_errors.grpc_code(status)
            return response
        except QuorumError as exc:
            code = http_errors.error_of(exc)
            response = error_response(code, str(exc) or type(exc).__name__)
            status = response.status
            return response
        except web.HTTPException as exc:  # no route, wrong method, body too large
            status = exc.status
            code = http_errors.grpc_code(status)
            if status < 400:
                raise
            message = exc.text if exc.text and not exc.text.startswith(str(status)) else exc.reason
            if status == 413:
                message = f"request body larger than the limit of {max_body_bytes} bytes (max_message_bytes)"
            response = error_response(code, message, status)
            if status == 408:  # the rest of the body is not waited for: the connection closes
                response.force_close()
            return response
        except Exception as exc:  # a bug: logged, 500, the server lives on
            log.exception("internal error in %s %s", request.method, request.path, exc_info=exc)
            code, status = grpc.StatusCode.INTERNAL, 500
            response = error_response(code, f"internal error: {type(exc).__name__}: {exc}")
            return response
        finally:
            if observer is not None:
                observer.on_rpc(method, code, time.perf_counter() - start,
                                _Named(request.match_info.get("name", "")))
            if response is not None:
                response.headers[REQUEST_ID_KEY] = scope.request_id
            scope.close(code.name, {"http.status_code": status})

    app = web.Application(middlewares=[front], client_max_size=max_body_bytes)
    app[API], app[MAX_BODY], app[SERVICERS], app[DECODER] = api, max_body_bytes, {}, BodyDecoder()
    if body_timeout_s is not None:
        app[BODY_TIMEOUT] = body_timeout_s
    v2.add_routes(app)
    tfserving.add_routes(app)
    return app


class HttpServer:
    """Starts and drains the HTTP front beside the gRPC server, on the same loop."""

    def __init__(self, app: web.Application, grace_s: float, header_timeout_s: float | None = None) -> None:
        # aiohttp has no header timeout of its own: its keep-alive timer, armed when a connection
        # opens and after each response, closes a connection whose request has not fully arrived.
        timeouts: dict[str, Any] = {} if header_timeout_s is None else {"keepalive_timeout": header_timeout_s}
        body_timeout = app.get(BODY_TIMEOUT)
        if body_timeout is not None:  # reading the rest of a refused body takes no longer than a body
            timeouts["lingering_time"] = min(10.0, body_timeout)
        self._decoder = app[DECODER]
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=grace_s,
                                     **timeouts)
        self._grace_s = grace_s
        self.port: int | None = None

    async def start(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                    reuse_port: bool = False) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port or None,
                           shutdown_timeout=self._grace_s)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, close."""
        await self._runner.cleanup()
        self._decoder.close()


def ssl_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """The same certificate, key and client CA as the gRPC port (mTLS when a CA is given)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def start_http(settings: Settings, api: ApiContext, *, token: str | None,
                     observer: RpcObserver | None, tracing: Tracing | None = None) -> HttpServer | None:
    """The HTTP front on the running loop, with the gRPC port's TLS, token and observer;
    None when http_port is 0. With --workers, every worker binds it with SO_REUSEPORT."""
    if not settings.http_port:
        return None
    app = make_app(api, max_body_bytes=settings.max_message_bytes, token=token, observer=observer, tracing=tracing,
                   body_timeout_s=settings.http_body_timeout_s)
    server = HttpServer(app, grace_s=settings.grace_period_s, header_timeout_s=settings.http_header_timeout_s)
    tls = None
    if settings.tls_cert and settings.tls_key:
        tls = ssl_context(str(settings.tls_cert), str(settings.tls_key),
                          str(settings.tls_client_ca) if settings.tls_client_ca else None)
    port = await server.start(settings.http_host, settings.http_port, ssl_context=tls, reuse_port=settings.reuse_port)
    log.info("HTTP/REST on port %d (%s)", port, "TLS" if tls else "plaintext")
    return server
