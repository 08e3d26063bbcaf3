"""The /metrics HTTP endpoint on its own port: prometheus_client's threaded WSGI server for
one registry, answering 404 on every other path."""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _get_best_family, _SilentHandler


def _only_metrics(app: Callable) -> Callable:
    """prometheus_client's exposition app answers on every path; this one on /metrics only."""
    def route(environ, start_response):
        if environ.get("PATH_INFO", "") == "/metrics":
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: metrics are at /metrics\n"]

    return route


class MetricsServer:
    """/metrics over HTTP (prometheus_client's threaded WSGI server) for one registry;
    404 on every other path."""

    def __init__(self, registry: CollectorRegistry, host: str = "0.0.0.0", port: int = 0) -> None:
        self.registry = registry
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        class Server(ThreadingWSGIServer):  # as prometheus_client's start_wsgi_server: IPv4 or IPv6
            pass

        Server.address_family, host = _get_best_family(self.host, self.requested_port)
        self._httpd = make_server(host, self.requested_port, _only_metrics(make_wsgi_app(self.registry)),
                                  Server, handler_class=_SilentHandler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        self.port = self._httpd.server_port
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
