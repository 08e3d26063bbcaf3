"""Tracing with the OpenTelemetry SDK's own in-memory exporter: the caller's trace continues,
stages hang under the RPC span, unsampled requests record nothing."""

from __future__ import annotations

import time

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.monitoring.stages import Stage
from service.monitoring.tracing import Tracing, endpoint_from

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SAMPLED = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}
NOT_SAMPLED = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-00"}


def tracing(ratio: float = 1.0) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return Tracing.configure(None, ratio, processor=SimpleSpanProcessor(exporter), environ={}), exporter


def test_disabled_without_an_endpoint_and_costs_nothing():
    t = Tracing.configure(None, 1.0, environ={})
    assert not t.enabled and t.start_rpc("x", SAMPLED) is None
    t.finish(None, "OK")  # no span: nothing to do


def test_the_standard_variables_name_the_endpoint():
    assert endpoint_from(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}) == "http://collector:4317"
    assert endpoint_from("http://mine:4317", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://other:4317"}) == "http://mine:4317"
    assert endpoint_from(None, {}) is None


def test_stages_hang_under_the_rpc_span_of_the_callers_trace():
    t, exporter = tracing(ratio=0.0)  # new traces never sampled: the caller's flag decides
    now = time.monotonic()
    span = t.start_rpc("inference.GRPCInferenceService/ModelInfer", SAMPLED, {"quorum.model": "digits"})
    member = Stage("compute digits_mlp_a", now + 0.002, now + 0.005, {"quorum.member": "digits_mlp_a"})
    t.finish(span, "OK", [Stage("queue", now, now + 0.002), Stage("members", now + 0.002, now + 0.009,
                                                                    children=(member,))])
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"inference.GRPCInferenceService/ModelInfer", "queue", "members", "compute digits_mlp_a"}
    rpc = spans["inference.GRPCInferenceService/ModelInfer"]
    assert format(rpc.context.trace_id, "032x") == TRACE_ID
    assert {s.context.trace_id for s in spans.values()} == {rpc.context.trace_id}
    assert spans["queue"].parent.span_id == rpc.context.span_id
    assert spans["compute digits_mlp_a"].parent.span_id == spans["members"].context.span_id
    compute = spans["compute digits_mlp_a"]
    assert abs((compute.end_time - compute.start_time) - 3_000_000) < 1_000  # 3 ms, in ns
    assert abs(compute.start_time - time.time_ns()) < 60e9  # converted to the epoch
    assert rpc.attributes["quorum.model"] == "digits" and rpc.attributes["rpc.grpc.status_code"] == "OK"


def test_an_unsampled_request_records_nothing_and_errors_mark_the_span():
    t, exporter = tracing(ratio=1.0)
    t.finish(t.start_rpc("rpc", NOT_SAMPLED), "OK", [Stage("queue", 1, 2)])
    assert exporter.get_finished_spans() == ()
    t.finish(t.start_rpc("rpc", {}), "INVALID_ARGUMENT")
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code.name == "ERROR" and span.status.description == "INVALID_ARGUMENT"
