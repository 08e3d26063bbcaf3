"""`quorum serve`'s flags: one per setting in service.settings.Settings, each with its variable and default.

The flags are made from the settings' fields, so a new setting gets its flag, its
QUORUM_* variable (service.setting_names) and its line in `--help` by being declared.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, NoReturn

from pydantic.fields import FieldInfo

from service.setting_names import env_name, flag_name
from service.settings import BUNDLED_MODELS, Settings

ENV_ONLY = {"auth_token": "a flag would show the token to anyone who can list processes; see --auth-token-file"}
"""Settings read from the environment only, and why (they are listed in --help all the same)."""

HELP = {
    "model_repository": "repository root: one folder per model",
    "grpc_port": "gRPC port for every service (0 picks a free port)",
    "grpc_host": "address the gRPC port binds ([::]: every interface)",
    "http_port": "HTTP/REST port, TF Serving REST and KServe v2 (0 turns it off)",
    "http_host": "address the HTTP port binds",
    "metrics_port": "Prometheus /metrics port (0 picks a free port)",
    "metrics_host": "address the /metrics port binds",
    "http_header_timeout_s": "seconds an HTTP connection has to send a request line and headers (idle keep-alive too)",
    "http_body_timeout_s": "seconds an HTTP request has to send its body once its headers arrived (408 beyond)",
    "monitoring": "Prometheus metrics and drift monitoring (off only to measure their cost)",
    "drift_window": "live rows per model in the drift window",
    "drift_min_rows": "fewest rows in the window before drift statistics are computed",
    "drift_interval_s": "seconds between drift evaluations",
    "device": "auto (GPUs if visible), cpu, gpu or gpu:N",
    "device_overrides": 'per-variant placement as JSON, e.g. \'{"digits_cnn_a": "cpu"}\'',
    "intra_op_threads": "threads per model for ONNX Runtime / TensorFlow intra-op parallelism (0: the library's)",
    "compute_threads": "threads running batches, shared by every model on a device (0: one thread per model)",
    "gc_threshold": "the garbage collector's youngest-generation threshold (0: Python's default, 700)",
    "inline_compute_us": "a lone request's batch computing in under this many microseconds runs on the event "
                         "loop (0: never)",
    "batch_invariance": "strict pads every batch to the max batch size (bitwise-identical outputs)",
    "model_control": "none: load once; poll: rescan the repository (hot reload); explicit: the Load/Unload/"
                     "ReloadConfig RPCs (needs a bearer token, or --allow-unauthenticated-control)",
    "poll_interval_s": "seconds between repository scans with --model-control poll (0: no polling)",
    "strict_readiness": "readiness SERVING only while every model and ensemble is ready",
    "liveness_timeout_s": "seconds without an event-loop heartbeat before liveness turns NOT_SERVING",
    "grace_period_s": "seconds in-flight requests get to finish on SIGTERM",
    "drain_delay_s": "seconds to keep accepting after turning NOT_SERVING on SIGTERM",
    "objective_interval_s": "seconds between ensembles' re-evaluations of which members to ask",
    "max_message_bytes": "largest gRPC message and HTTP request body",
    "max_request_rows": "most rows one request may carry",
    "grpc_engine": "grpcio (grpc.aio; unset: grpcio) or native (pygrpc-native, HTTP/2 in Rust, plaintext only; "
                   "it reads and inflates a request whole before the message limit applies: trusted clients only)",
    "event_loop": "the server's event loop (uvloop: faster for lone models, slower for ensembles)",
    "tls_cert": "PEM certificate chain of the server; with --tls-key, turns TLS on",
    "tls_key": "PEM private key of the server",
    "tls_client_ca": "PEM CA bundle: clients must present a certificate it signed (mTLS)",
    "auth_token": "bearer token clients must send (health and reflection stay open)",
    "auth_token_file": "file holding the bearer token (wins over QUORUM_AUTH_TOKEN)",
    "allow_unauthenticated_control": "with --model-control explicit and no token, start anyway (and warn): anyone "
                                     "who reaches the port may load, unload and reconfigure models",
    "workers": "server processes sharing the gRPC and HTTP ports (SO_REUSEPORT)",
    "reuse_port": "bind the gRPC and HTTP ports with SO_REUSEPORT (what --workers sets for each worker)",
    "log_level": "DEBUG, INFO, WARNING...",
    "log_format": "log lines as text or JSON",
    "otlp_endpoint": "OTLP/gRPC endpoint for OpenTelemetry traces (unset: OTEL_EXPORTER_OTLP_ENDPOINT, else off)",
    "trace_sample_ratio": "share of new traces sampled",
    "state_url": "Redis URL of the store every replica shares for feedback and live accuracy "
                 "(redis://host:port/db, rediss:// for TLS; unset: in process)",
    "state_password_file": "file holding the shared store's Redis password",
    "state_ttl_s": "seconds a prediction waits in the shared store for its label",
    "state_required": "refuse to start when the shared store is malformed or unreachable (off: start and report)",
    "state_refresh_s": "seconds between reads of the fleet's live accuracy from the shared store",
    "state_queue": "predictions waiting for the shared store's writer (beyond: counted as unstored)",
    "max_feedback_labels": "most labels one Feedback call may carry",
}
"""One line per setting; a setting missing here shows its docstring's first sentence."""


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


_json_object.__name__ = "JSON object"  # argparse's "invalid JSON object value: 'x'"


def _default(name: str, field: FieldInfo) -> str:
    value = field.default
    if name == "model_repository" and value == BUNDLED_MODELS:
        return "the bundled models/"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _kind(annotation: Any) -> tuple[Any, list[str] | None]:
    """The flag's type and choices, from the field's annotation (an optional one unwrapped)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    if typing.get_origin(annotation) is dict:
        return _json_object, None
    return annotation, None


def _metavar(name: str, kind: Any) -> str:
    if name.endswith("_s"):
        return "SECONDS"
    return "PATH" if kind is Path else flag_name(name).split("-")[-1].upper()


def _help(name: str, field: FieldInfo) -> str:
    text = HELP.get(name) or " ".join((field.description or name).split()).split(". ")[0]
    where = "" if name in ENV_ONLY else f"; {env_name(name)}"
    return f"{text} (default: {_default(name, field)}{where})".replace("%", "%%")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Every setting as a flag whose default is None: a flag not given leaves the setting to
    its QUORUM_* variable, then its default."""
    for name, field in Settings.model_fields.items():
        if name in ENV_ONLY:
            continue
        flag, kind = f"--{flag_name(name)}", _kind(field.annotation)
        if kind[0] is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=_help(name, field))
        else:
            parser.add_argument(flag, dest=name, type=kind[0], choices=kind[1], default=None,
                                metavar=None if kind[1] else _metavar(name, kind[0]),
                                help=_help(name, field))
    parser.epilog = "environment only: " + "; ".join(
        f"{env_name(name)}: {_help(name, Settings.model_fields[name])} ({why})" for name, why in ENV_ONLY.items())
    _one_line_errors(parser)


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """A bad flag is one line and exit code 2, not the usage of every flag above it."""
    def error(message: str) -> NoReturn:
        print(f"quorum serve: {message} (quorum serve --help lists every setting)", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]


def flag_of(name: str) -> str:
    """How a message names a setting: "(--poll-interval, QUORUM_POLL_INTERVAL)"."""
    if name in ENV_ONLY:
        return f"({env_name(name)})"
    return f"(--{flag_name(name)}, {env_name(name)})"

