"""The `quorum` command: serve, export, predict, validate, ensemble create."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from service import __version__


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model repository over gRPC")
    p.add_argument("--model-repository", type=Path, help="repository root (default: the bundled models/)")
    p.add_argument("--grpc-port", type=int, help="gRPC port for every service (default 8500)")
    p.add_argument("--http-port", type=int, help="HTTP/REST port, TF Serving REST and KServe v2 (default 8501, 0 disables)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 8502)")
    p.add_argument("--device", help="auto, cpu, gpu or gpu:N (default auto)")
    p.add_argument("--batch-invariance", choices=["strict", "tolerant"],
                   help="strict pads every batch to the max batch size (bitwise-identical outputs)")
    p.add_argument("--model-control", choices=["none", "poll", "explicit"],
                   help="none (default): load once; poll: rescan the repository (hot reload); "
                        "explicit: Load/Unload/ReloadConfig RPCs (needs a bearer token, "
                        "QUORUM_AUTH_TOKEN_FILE or QUORUM_AUTH_TOKEN, or --allow-unauthenticated-control)")
    p.add_argument("--allow-unauthenticated-control", action="store_true", default=None,
                   help="with --model-control explicit and no token, start anyway (and warn): anyone who "
                        "reaches the port may load, unload and reconfigure models")
    p.add_argument("--poll-interval", type=float, dest="poll_interval_s",
                   help="seconds between repository scans with --model-control poll (default 2)")
    p.add_argument("--strict-readiness", action="store_true", default=None,
                   help="readiness SERVING only while every model and ensemble is ready")
    p.add_argument("--grace-period", type=float, dest="grace_period_s",
                   help="seconds in-flight requests get to finish on SIGTERM")
    p.add_argument("--drain-delay", type=float, dest="drain_delay_s",
                   help="seconds to keep accepting after turning NOT_SERVING on SIGTERM (default 5)")
    p.add_argument("--grpc-engine", choices=["grpcio", "native"],
                   help="gRPC server: grpcio (grpc.aio, the default) or native (pygrpc-native, "
                        "HTTP/2 in Rust); TLS and mTLS are served by grpcio only")
    p.add_argument("--event-loop", choices=["asyncio", "uvloop"],
                   help="the server's event loop (default asyncio; uvloop is faster for lone models, slower for ensembles)")
    p.add_argument("--workers", type=int,
                   help="server processes sharing the gRPC port (SO_REUSEPORT; default 1)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING...")
    p.add_argument("--log-format", choices=["text", "json"], help="log lines as text (default) or JSON")
    p.add_argument("--otlp-endpoint", help="OTLP/gRPC endpoint for OpenTelemetry traces (default: off, "
                                           "or OTEL_EXPORTER_OTLP_ENDPOINT)")
    p.add_argument("--trace-sample-ratio", type=float, help="share of new traces sampled (default 0.01)")


def _serve(args: argparse.Namespace) -> int:  # returns only when the settings are refused
    from pydantic import ValidationError

    from service.settings import Settings

    flags = {k: v for k, v in vars(args).items()
             if k not in ("command", "handler") and v is not None}
    try:
        settings = Settings(**flags)  # flags over QUORUM_* env over defaults
    except ValidationError as exc:
        print(f"quorum serve: {_settings_error(exc)}", file=sys.stderr)
        return 2
    from service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    from service.server import run  # after the settings: a refusal needs no TensorFlow

    code = run(settings)
    # Everything is drained, unloaded and logged: skip the interpreter's teardown, where
    # TensorFlow's and gRPC's finalizers take seconds a terminating pod does not have.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _settings_error(exc) -> str:
    """One line naming each bad setting, e.g. "auth_token: ... is set but empty"."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where and not message.startswith(where) else message)
    return "invalid settings: " + "; ".join(problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quorum", description=__doc__)
    parser.add_argument("--version", action="version", version=f"quorum {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    from service.export import cli as export_cli

    export_cli.add_parser(sub)
    from service.client import predict as predict_cli

    predict_cli.add_parser(sub)
    from service.export import repository_cli

    repository_cli.add_parsers(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "export":
        return export_cli.run(args)
    if args.command == "predict":
        return predict_cli.run(args)
    if args.command in ("validate", "ensemble"):
        return repository_cli.run(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
