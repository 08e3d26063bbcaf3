"""OpenTelemetry traces of requests, off by default.

On when an OTLP endpoint is configured: `--otlp-endpoint` (`QUORUM_OTLP_ENDPOINT`) or the
standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; the other
standard variables (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_*`
headers, certificates, timeouts) are read by the SDK itself. Sampling follows
`OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` when set, else it is parent-based with
`trace_sample_ratio` of new traces: a caller's sampled trace always continues through Quorum.
The incoming W3C trace context (`traceparent`/`tracestate` in gRPC metadata or HTTP headers)
is the RPC span's parent.

Cost on the hot path: one span per RPC (a non-recording one when unsampled) and nothing else.
The stages of a request (queueing, each member's compute, calibration and vote, encoding) are
recorded after the fact as child spans, from the timestamps the pipeline keeps anyway, and
only for sampled requests.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from service.monitoring.stages import Stage

log = logging.getLogger(__name__)
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def endpoint_from(configured: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The OTLP endpoint to export to, if any: the setting, else the standard variables."""
    if configured:
        return configured
    return next((environ[v] for v in ENDPOINT_VARIABLES if environ.get(v)), None)


class Tracing:
    """Spans for RPCs and their stages; a disabled instance costs one attribute check."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self._tracer = provider.get_tracer("quorum") if provider else None

    @classmethod
    def disabled(cls) -> "Tracing":
        return cls(None)

    @classmethod
    def configure(cls, endpoint: str | None, sample_ratio: float, *, insecure: bool = True,
                  processor: SpanProcessor | None = None, environ: Mapping[str, str] = os.environ) -> "Tracing":
        """Tracing to `endpoint` (OTLP over gRPC), or to `processor` (tests); else disabled."""
        endpoint = endpoint_from(endpoint, environ)
        if processor is None and endpoint is None:
            return cls.disabled()
        sampler = None if environ.get("OTEL_TRACES_SAMPLER") else ParentBased(TraceIdRatioBased(sample_ratio))
        resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "quorum")})
        provider = TracerProvider(sampler=sampler, resource=resource)  # sampler None: the SDK reads the env
        if processor is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure))
            log.info("OpenTelemetry traces to %s (new traces sampled at %g)", endpoint, sample_ratio)
        provider.add_span_processor(processor)
        return cls(provider)

    def start_rpc(self, name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any] | None = None
                  ) -> Span | None:
        """The server span of one RPC, continuing the caller's trace context; None if disabled.
        The caller ends it (`finish`)."""
        if self._tracer is None:
            return None
        context = propagate.extract(carrier) if carrier else None
        return self._tracer.start_span(name, context=context, kind=SpanKind.SERVER, attributes=attributes)

    def finish(self, span: Span | None, code: str, stages: Iterable[Stage] = (),
               attributes: Mapping[str, Any] | None = None) -> None:
        """End the RPC span with its status code and, when it is sampled, its stages."""
        if span is None:
            return
        if span.is_recording():
            if attributes:
                span.set_attributes(attributes)
            span.set_attribute("rpc.grpc.status_code", code)
            if code != "OK":
                span.set_status(Status(StatusCode.ERROR, code))
            parent = trace.set_span_in_context(span)
            offset = time.time_ns() - int(time.monotonic() * 1e9)  # monotonic -> epoch ns
            for stage in stages:
                self._record(stage, parent, offset)
        span.end()

    def _record(self, stage: Stage, parent, offset: int) -> None:
        assert self._tracer is not None  # stages are recorded under a span: tracing is enabled
        child = self._tracer.start_span(stage.name, context=parent, start_time=int(stage.start * 1e9) + offset,
                                        attributes=dict(stage.attributes))
        context = trace.set_span_in_context(child)
        for grandchild in stage.children:
            self._record(grandchild, context, offset)
        child.end(end_time=int(stage.end * 1e9) + offset)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()
