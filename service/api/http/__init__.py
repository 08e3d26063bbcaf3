"""HTTP/REST beside gRPC: TF Serving REST (/v1) and KServe v2 REST (/v2) on one port."""

from service.api.http.front import HttpServer, start_http

__all__ = ["HttpServer", "start_http"]
