"""Server settings: parsed once in `main` (flags over env `QUORUM_*` over defaults), then passed down.

Each field's flag and variable are named by service.setting_names (`poll_interval_s`:
`--poll-interval`, `QUORUM_POLL_INTERVAL`); its docstring is its `--help`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from service.setting_names import env_name, field_environment
from service.tls_files import check_tls_files

BUNDLED_MODELS = Path(__file__).resolve().parent.parent / "models"


class _NamedEnvironment(EnvSettingsSource):
    """QUORUM_* variables by their names (service.setting_names), old names included: each
    field's value is presented to pydantic-settings as QUORUM_<FIELD>, which it then parses."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        fields = self.settings_cls.model_fields
        return {key.lower(): value for key, value in field_environment(fields, os.environ).items()}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUORUM_", extra="ignore", use_attribute_docstrings=True)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _NamedEnvironment(settings_cls)  # keyword arguments (the flags) win

    grpc_host: str = "[::]"
    """Address the gRPC server binds."""
    grpc_port: int = Field(8500, ge=0, le=65535)
    """gRPC port for every service (0 picks a free port)."""
    http_port: int = Field(8501, ge=0, le=65535)
    """HTTP/REST port: TF Serving's REST API and KServe v2 REST, beside gRPC (0 disables it)."""
    http_host: str = "0.0.0.0"
    """Address the HTTP/REST server binds."""
    http_header_timeout_s: float = Field(75.0, gt=0)
    """Seconds an HTTP connection has to send a whole request line and headers, from when
    it opens or from its previous response; an idle keep-alive connection is closed after
    as long (aiohttp's keepalive_timeout, which is both: it has no separate header timeout).
    The connection is closed without an answer. Behind a load balancer that reuses
    connections, keep it above the balancer's idle timeout (75: above 60 s of AWS ALB and
    ingress-nginx)."""
    http_body_timeout_s: float = Field(60.0, gt=0)
    """Seconds an HTTP request has to send its whole body once its headers arrived: 408
    beyond, and the connection is closed (a 64 MiB body needs about 1.1 MB/s)."""
    metrics_port: int = Field(8502, ge=0, le=65535)
    """HTTP port of the Prometheus /metrics endpoint (0 picks a free port)."""
    metrics_host: str = "0.0.0.0"
    """Address the /metrics endpoint binds."""
    monitoring: bool = True
    """Prometheus metrics and drift monitoring; off only to measure their overhead."""
    drift_window: int = Field(500, ge=10)
    """Live rows per model in the drift window compared with the training reference."""
    drift_min_rows: int = Field(100, ge=1)
    """Fewest rows in the window before drift statistics are computed."""
    drift_interval_s: float = Field(5.0, gt=0)
    """Seconds between drift evaluations (off the request path)."""

    model_repository: Path = BUNDLED_MODELS
    """Model repository root: one folder per model (TF Serving layout)."""
    device: str = "auto"
    """Default placement: auto (a GPU if one is visible, else the CPU), cpu, gpu or gpu:N."""
    device_overrides: dict[str, str] = {}
    """Per-variant placement, model name -> device, e.g. {"digits_cnn_a": "cpu"}."""
    intra_op_threads: int = Field(0, ge=0)
    """Threads per model for ONNX Runtime / TensorFlow intra-op parallelism (0: library default)."""
    compute_threads: int = Field(0, ge=0)
    """Threads that run batches, shared by every model on one device (0: one thread per model
    version, so members compute side by side). On a small CPU a shared thread keeps members'
    threads from queueing behind the event loop for the GIL (docs/performance.md)."""
    gc_threshold: int = Field(50_000, ge=0)
    """The garbage collector's youngest-generation threshold (0: Python's default, 700). With
    700, serving allocates enough that the full collections, which walk every object the
    loaded models and libraries made at startup, run often: p99 at c=64 was 55-60 ms against
    18 ms with 50,000, and throughput 7-12 % lower (docs/performance.md). Cycles are still
    collected, in larger and rarer young collections."""
    inline_compute_us: float = Field(100.0, ge=0)
    """A batch that is the only work in the batchers (one request alone: concurrency 1) runs
    on the event loop instead of its model's thread when, at the model's warm-up time per
    row, it computes in under this many microseconds: two thread hand-offs cost more than
    such a batch. Never while other requests are queued or computing, never a batch that
    would hold the loop longer (0: never)."""
    batch_invariance: Literal["strict", "tolerant"] = "tolerant"
    """strict: pad every batch to the model's max batch size, so outputs are bitwise
    identical whatever else is in the batch; tolerant: run batches at their own size."""

    model_control: Literal["none", "poll", "explicit"] = "none"
    """What may change the loaded models after start, as Triton's --model-control-mode:
    none (the repository is read once), poll (rescanned every poll_interval_s), explicit
    (the Load/Unload/ReloadConfig RPCs). Those RPCs answer PERMISSION_DENIED unless explicit."""
    poll_interval_s: float = Field(2.0, ge=0)
    """With model_control=poll, how often to rescan the repository for new or removed
    versions (0 disables polling)."""
    strict_readiness: bool = False
    """Readiness (health service "") SERVING only while every model and ensemble is ready;
    off: SERVING once the first load finished and until draining, whatever one model does."""
    liveness_timeout_s: float = Field(10.0, gt=0)
    """Liveness (health service "liveness") turns NOT_SERVING when the event loop has not
    answered its heartbeat for this long (a wedged server)."""
    grace_period_s: float = Field(10.0, ge=0)
    """On SIGTERM, how long in-flight requests get to finish before the server stops."""
    drain_delay_s: float = Field(5.0, ge=0)
    """On SIGTERM, how long the server keeps accepting requests after turning NOT_SERVING,
    so that load balancers and Kubernetes endpoints stop routing to it first (at least one
    readiness probe period); the grace period starts after it."""
    objective_interval_s: float = Field(1.0, gt=0)
    """How often ensembles re-evaluate which members to ask (satisficing selection)."""
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    """Largest gRPC message accepted or sent, and largest HTTP request body (413 beyond)."""
    max_request_rows: int = Field(65536, ge=1)
    """Most rows one request may carry, on every protocol (INVALID_ARGUMENT beyond, naming
    this limit). A request with more rows than a model's max batch size is split into
    max-batch-size pieces inside and answered as one (as TF Serving does); the message size
    limit bounds it too."""
    grpc_engine: Literal["grpcio", "native"] | None = None
    """gRPC server: grpcio (grpc.aio) or native (pygrpc-native, HTTP/2 in Rust; plaintext
    only). Unset: grpcio. With TLS the server is grpcio, and asking for native refuses to start."""
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"
    """The server's event loop: asyncio's own, or uvloop (libuv). Measured side by side
    (docs/performance.md): uvloop +10-18% req/s for a single ONNX model, but -15-33% for the
    5-member ensemble, whose executor hand-offs it makes slower; ensembles are the point."""

    tls_cert: Path | None = None
    """PEM certificate chain of the server; with tls_key, turns TLS on."""
    tls_key: Path | None = None
    """PEM private key of the server."""
    tls_client_ca: Path | None = None
    """PEM CA bundle; when set, clients must present a certificate it signed (mTLS)."""
    auth_token: str | None = None
    """Bearer token clients must send in `authorization` metadata (health and reflection stay open)."""
    auth_token_file: Path | None = None
    """File holding the bearer token (read once at start); wins over auth_token."""
    allow_unauthenticated_control: bool = False
    """Start with model_control=explicit and no auth_token(_file): any client that reaches
    the gRPC or HTTP port may then load, unload and reconfigure models (one ReloadConfig
    unloads every model it does not name). Off: such a server refuses to start; on, it
    logs a warning at start."""

    workers: int = Field(1, ge=1)
    """Server processes sharing the gRPC and HTTP ports through SO_REUSEPORT (each loads every model;
    worker i serves /metrics on metrics_port + i). The kernel balances connections, not
    requests, so one client channel always reaches the same worker (and its Feedback too)."""
    reuse_port: bool = False
    """Bind the gRPC and HTTP ports with SO_REUSEPORT (set for each worker of a multi-process server)."""

    log_level: str = "INFO"
    """Python logging level."""
    log_format: Literal["text", "json"] = "text"
    """Log lines as text or as one JSON object each; a line written while a request is
    handled carries its request id (the client's id, else a generated one)."""
    otlp_endpoint: str | None = None
    """OTLP/gRPC endpoint for OpenTelemetry traces (e.g. http://otel-collector:4317); unset,
    the standard OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, else tracing is off."""
    trace_sample_ratio: float = Field(0.01, ge=0, le=1)
    """Share of new traces sampled (parent-based: a caller's sampled trace always continues);
    OTEL_TRACES_SAMPLER/OTEL_TRACES_SAMPLER_ARG, when set, win."""

    state_url: str | None = None
    """Redis URL of the store shared by every replica (redis://host:port/db, rediss:// for TLS):
    predictions awaiting ground truth and the fleet's live accuracy. Unset: in process, so a
    Feedback call counts only on the replica that answered the request."""
    state_password_file: Path | None = None
    """File holding the Redis password (wins over one in the URL)."""
    state_ttl_s: float = Field(86400.0, gt=0)
    """Seconds a prediction waits in the shared store for its label."""
    state_required: bool = False
    """Refuse to start when the shared store's URL is malformed or it is unreachable at
    start; off, the server starts, says so in one line and serves (Feedback UNAVAILABLE)."""
    state_refresh_s: float = Field(1.0, gt=0)
    """Seconds between reads of the fleet's live accuracy from the shared store."""
    state_queue: int = Field(10_000, ge=1)
    """Predictions waiting for the shared store's writer; beyond, they are counted as unstored."""
    max_feedback_labels: int = Field(100_000, ge=1)
    """Most labels one Feedback call may carry (more: INVALID_ARGUMENT)."""

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint_is_a_url(cls, value: str | None) -> str | None:
        """Checked here: the exporter would fail inside the server's start, naming no setting."""
        if value is None:
            return value
        try:
            urlsplit(value).port  # noqa: B018 (parses the host and port as the exporter will)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a URL ({exc}): e.g. http://otel-collector:4317") from None
        return value

    @field_validator("auth_token")
    @classmethod
    def _token_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("auth_token is set but empty; unset it to serve without authentication")
        return value

    @field_validator("auth_token_file")
    @classmethod
    def _token_file_not_empty(cls, value: Path | None) -> Path | None:
        if value is None:
            return value
        try:
            text = value.read_text()
        except OSError as exc:
            raise ValueError(f"auth_token_file {str(value)!r} cannot be read: {exc.strerror}") from None
        if not text.strip():
            raise ValueError(f"auth_token_file {str(value)!r} is empty")
        return value

    @field_validator("tls_cert", "tls_key", "tls_client_ca", mode="before")
    @classmethod
    def _tls_path_not_empty(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"{info.field_name} ({env_name(str(info.field_name))}) is set but empty: "
                             "give the path of a PEM file, or unset it")
        return value

    @model_validator(mode="after")
    def _tls_complete(self) -> "Settings":
        """Settings that would weaken security refuse to start: no silent plaintext."""
        if self.tls_cert and not self.tls_key:
            raise ValueError("tls_cert is set without tls_key: give both, or neither for plaintext")
        if self.tls_key and not self.tls_cert:
            raise ValueError("tls_key is set without tls_cert: give both, or neither for plaintext")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca is set without tls_cert and tls_key: mTLS needs TLS")
        if self.tls_cert and self.tls_key:  # before any port is bound, one line naming the setting
            check_tls_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        return self

    @model_validator(mode="after")
    def _control_authenticated(self) -> "Settings":
        """Explicit model control without a token only when asked for by name."""
        if (self.model_control == "explicit" and not (self.auth_token or self.auth_token_file)
                and not self.allow_unauthenticated_control):
            raise ValueError(
                "model_control is explicit but no auth_token or auth_token_file is set: anyone who reaches "
                "the port could load, unload and reconfigure every model; set QUORUM_AUTH_TOKEN_FILE (or "
                "QUORUM_AUTH_TOKEN), or pass --allow-unauthenticated-control "
                "(QUORUM_ALLOW_UNAUTHENTICATED_CONTROL=true) if that is intended")
        return self

    def unauthenticated_control(self) -> bool:
        """Explicit model control that anyone may call (allowed by allow_unauthenticated_control)."""
        return self.model_control == "explicit" and not (self.auth_token or self.auth_token_file)

    def token(self) -> str | None:
        """The bearer token clients must send (the file wins), or None without authentication."""
        if self.auth_token_file:
            return self.auth_token_file.read_text().strip()
        return self.auth_token
