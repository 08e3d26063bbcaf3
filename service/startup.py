"""Refusals to start, before a port is bound: each one line naming the path, port or setting, and an exit code.

Code 2 is a setting that cannot work (a repository that is not there, two roles on one
port, an address this host does not have, an unknown device, the native engine with TLS,
--workers on port 0); code 1 is the host's state (a port another process holds). A failure inside the server's own start is reported the same way
(`StartupError`, raised by service.process.serve), without a traceback.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from service.serve_flags import flag_of
from service.settings import Settings


class StartupError(Exception):
    """Why the server does not start, in one line, and the exit code to end with."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def check_repository(root: Path) -> None:
    where = f"model repository {str(root)!r} {flag_of('model_repository')}"
    if not root.exists():
        raise StartupError(f"{where} does not exist", 2)
    if not root.is_dir():
        raise StartupError(f"{where} is not a folder", 2)
    try:
        os.listdir(root)
    except OSError as exc:
        raise StartupError(f"{where} cannot be read: {exc.strerror}", 2) from None


def _ports(settings: Settings) -> list[tuple[str, str, str, int]]:
    """(what, setting, host, port) of every port this process (or its workers) will bind;
    port 0 (a free one, or HTTP off) is never taken."""
    ports = [("gRPC", "grpc_port", settings.grpc_host, settings.grpc_port),
             ("HTTP", "http_port", settings.http_host, settings.http_port)]
    if settings.monitoring and settings.metrics_port:
        count = settings.workers  # worker i serves /metrics on metrics_port + i
        ports += [("metrics", "metrics_port", settings.metrics_host, settings.metrics_port + i) for i in range(count)]
    return [p for p in ports if p[3]]


def check_ports(settings: Settings) -> None:
    ports = _ports(settings)
    seen: dict[int, tuple[str, str]] = {}
    for what, setting, _, port in ports:
        if port in seen:
            first, first_setting = seen[port]
            raise StartupError(f"the {first} port {flag_of(first_setting)} and the {what} port {flag_of(setting)} "
                               f"are both {port}: give each its own", 2)
        seen[port] = what, setting
    for what, setting, host, port in ports:
        shared = settings.reuse_port and setting != "metrics_port"
        _check_port(what, setting, host, port, shared)


def _check_port(what: str, setting: str, host: str, port: int, shared: bool = False) -> None:
    """Bind the port as the server will (and close it at once): in use, not ours to bind.
    `shared`: with SO_REUSEPORT, as a worker of --workers binds it beside its siblings (who
    may hold it already), and no other process may."""
    address = host.strip("[]") or None
    named = f"{what} port {port} {flag_of(setting)} on {host}"
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise _not_ours(what, setting, host, exc.strerror or str(exc)) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
        if shared:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # [::] takes IPv4 too, as gRPC's does
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"{named} is already in use (another server on the same ports?)", 1) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise _not_ours(what, setting, host, exc.strerror or str(exc)) from None
            raise StartupError(f"{named} cannot be bound: {exc.strerror}", 1) from None


def _not_ours(what: str, setting: str, host: str, why: str) -> StartupError:
    """A bind address this host does not have: a setting to fix (exit code 2)."""
    host_setting = setting.replace("_port", "_host")
    return StartupError(f"{what} address {host!r} {flag_of(host_setting)} is not an address of this host: {why}", 2)


def check_settings(settings: Settings) -> None:
    """Settings that each parse but cannot serve together."""
    from service.api.engine import EngineUnavailable, resolve_engine

    try:
        resolve_engine(settings.grpc_engine, tls=bool(settings.tls_cert and settings.tls_key))
    except EngineUnavailable as exc:
        raise StartupError(str(exc), 2) from None
    from service.runtimes.devices import validate_device

    for setting, device in [("device", settings.device), *(("device_overrides", d) for d in
                                                          settings.device_overrides.values())]:
        try:
            validate_device(device)  # at start, not as each model fails to load on it
        except ValueError as exc:
            raise StartupError(f"{setting} {flag_of(setting)}: {exc}", 2) from None
    if settings.state_url and settings.state_required:  # a URL that can never work: a setting to fix
        from service.objectives.state import SETTING, describe_url

        shown, why = describe_url(settings.state_url)
        if why is not None:
            raise StartupError(f"feedback store {shown} {SETTING}: {why} (--state-required)", 2)
    if settings.workers > 1 and settings.grpc_port == 0:
        raise StartupError(f"--workers {settings.workers} needs a fixed gRPC port {flag_of('grpc_port')}: "
                           "with port 0 each worker would pick its own", 2)


def check_startup(settings: Settings) -> None:
    check_settings(settings)
    check_repository(Path(settings.model_repository))
    check_ports(settings)


def run_checked(settings: Settings) -> int:
    """service.process.run after the checks; raises StartupError instead of starting."""
    check_startup(settings)
    from service.process import run  # TensorFlow and gRPC only for a server that starts

    return run(settings)
