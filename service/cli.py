"""The `quorum` command: serve, export, predict."""

from __future__ import annotations

import argparse
import logging
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
    p.add_argument("--poll-interval", type=float, dest="poll_interval_s",
                   help="seconds between repository scans (0 disables hot reload)")
    p.add_argument("--grace-period", type=float, dest="grace_period_s",
                   help="seconds in-flight requests get to finish on SIGTERM")
    p.add_argument("--drain-delay", type=float, dest="drain_delay_s",
                   help="seconds to keep accepting after turning NOT_SERVING on SIGTERM (default 0)")
    p.add_argument("--workers", type=int,
                   help="server processes sharing the gRPC port (SO_REUSEPORT; default 1)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING...")


def _serve(args: argparse.Namespace) -> int:
    from service.server import run
    from service.settings import Settings

    flags = {k: v for k, v in vars(args).items()
             if k not in ("command", "handler") and v is not None}
    settings = Settings(**flags)  # flags over QUORUM_* env over defaults
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quorum", description=__doc__)
    parser.add_argument("--version", action="version", version=f"quorum {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    from service.export import cli as export_cli

    export_cli.add_parser(sub)
    from service.client import predict as predict_cli

    predict_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "export":
        return export_cli.run(args)
    if args.command == "predict":
        return predict_cli.run(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
