"""Traces and logs as an on-call engineer follows a request: a real OTLP receiver on
loopback gets the RPC span of a traced request through an ensemble, continuing the caller's
W3C trace, with each member's queue and compute, the vote and the encoding under it; the
request id comes back in the response metadata and stands in the JSON log lines written
while the request was handled; no token or payload is ever logged."""

from __future__ import annotations

import json
import secrets
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from service._proto.inference import grpc_service_pb2 as v2
from service._proto.inference import grpc_service_pb2_grpc as v2_grpc
from service._proto.quorum.v1 import ensemble_pb2, ensemble_pb2_grpc
from tests.e2e.fixtures import Reference, module_server
from tests.helpers import free_port

TOKEN = "s3cret-token-never-logged"
MEMBERS = tuple(Reference().ensemble_config()["members"])
ROWS = np.linspace(0, 16, 2 * 64, dtype=np.float32).reshape(2, 64)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    self.spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str, want: int, timeout: float = 60.0) -> list:
        """The spans of `trace_id`, once at least `want` arrived (the exporter batches)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                found = [s for s in self.spans if s.trace_id.hex() == trace_id]
            if len(found) >= want:
                return found
            time.sleep(0.2)
        raise AssertionError(f"{len(found)} spans of trace {trace_id} after {timeout}s, wanted {want}")


@pytest.fixture(scope="module")
def receiver():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    sink = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    sink.endpoint = f"http://127.0.0.1:{port}"
    yield sink
    server.stop(0)


@pytest.fixture(scope="module")
def server(tmp_path_factory, receiver, grpc_engine):
    # Sampling 0 for new traces: only requests whose caller sampled them are traced, so
    # which traces arrive is decided by the test, not by chance.
    args = ["--otlp-endpoint", receiver.endpoint, "--trace-sample-ratio", "0", "--log-format", "json",
            "--model-control", "explicit"]
    with module_server(tmp_path_factory, "tracing", args=args,
                       env={"QUORUM_AUTH_TOKEN": TOKEN, "OTEL_BSP_SCHEDULE_DELAY": "200"}) as s:
        yield s


def _auth():
    return [("authorization", f"Bearer {TOKEN}")]


def _traceparent(trace_id: str, sampled: bool) -> str:
    return f"00-{trace_id}-00f067aa0ba902b7-{'01' if sampled else '00'}"


def _children(spans, parent) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in spans:
        if s.parent_span_id == parent.span_id:
            out.setdefault(s.name, []).append(s)
    return out


def _attributes(span) -> dict:
    return {a.key: (a.value.string_value or a.value.int_value) for a in span.attributes}


def test_a_traced_ensemble_request_shows_every_member_under_the_rpc_span(server, receiver):
    client = triton.InferenceServerClient(server.address)
    tensor = triton.InferInput("pixels", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS)
    # fresh ids: the receiver outlives this module's servers (one per engine), in any order
    unsampled, sampled = secrets.token_hex(16), secrets.token_hex(16)
    client.infer("digits", [tensor], headers={"traceparent": _traceparent(unsampled, False), **dict(_auth())})
    client.infer("digits", [tensor], headers={"traceparent": _traceparent(sampled, True), **dict(_auth())},
                 request_id="req-traced-1")
    client.close()

    # RPC span + the ensemble's queue + per member (member, queue, compute) + vote + encoding
    spans = receiver.trace(sampled, want=1 + 1 + 3 * len(MEMBERS) + 2)
    (rpc,) = [s for s in spans if s.name == "inference.GRPCInferenceService/ModelInfer"]
    assert rpc.parent_span_id.hex() == "00f067aa0ba902b7"  # the caller's span
    assert rpc.kind == rpc.SPAN_KIND_SERVER
    attributes = _attributes(rpc)
    assert attributes["quorum.model"] == "digits" and attributes["quorum.version"] == 1
    assert attributes["quorum.request_id"] == "req-traced-1" and attributes["rpc.grpc.status_code"] == "OK"
    assert attributes["quorum.rows"] == 2
    children = _children(spans, rpc)
    assert set(children) == {f"member {m}" for m in MEMBERS} | {"ensemble queue", "calibrate and vote",
                                                                 "encode and respond"}
    (queued,) = children["ensemble queue"]
    assert _attributes(queued)["quorum.batch_rows"] >= 2  # the batch this request was part of
    assert queued.end_time_unix_nano <= min(children[f"member {m}"][0].start_time_unix_nano for m in MEMBERS)
    for member in MEMBERS:
        (span,) = children[f"member {member}"]
        assert _attributes(span)["quorum.member"] == member
        inner = _children(spans, span)
        assert set(inner) == {"queue", "compute"}
        (compute,) = inner["compute"]
        assert _attributes(compute)["quorum.batch_rows"] >= 2
        assert span.start_time_unix_nano <= inner["queue"][0].start_time_unix_nano <= compute.start_time_unix_nano
        assert compute.end_time_unix_nano <= rpc.end_time_unix_nano
    assert not [s for s in receiver.spans if s.trace_id.hex() == unsampled]


def test_http_requests_continue_the_callers_trace_too(server, receiver):
    trace_id = secrets.token_hex(16)
    body = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROWS[0].tolist()}]}
    answer = requests.post(f"http://127.0.0.1:{server.http_port}/v2/models/digits_mlp_a/infer", json=body,
                           headers={"traceparent": _traceparent(trace_id, True), "Authorization": f"Bearer {TOKEN}"},
                           timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-request-id"]
    spans = receiver.trace(trace_id, want=5)  # RPC, member, queue, compute, vote (+ encoding)
    (rpc,) = [s for s in spans if s.parent_span_id.hex() == "00f067aa0ba902b7"]
    assert rpc.name.startswith("POST ") and _attributes(rpc)["quorum.model"] == "digits_mlp_a"
    assert "member digits_mlp_a" in _children(spans, rpc)


def test_the_request_id_comes_back_and_stands_in_the_log(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        request = v2.ModelInferRequest(model_name="digits_mlp_a", id="client-id-7")
        request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
        request.raw_input_contents.append(ROWS[:1].tobytes())
        _, call = stub.ModelInfer.with_call(request, metadata=_auth(), timeout=30)
        assert dict(call.trailing_metadata())["x-request-id"] == "client-id-7"

        # No id from the client: one is generated, and quorum.v1 answers with the same.
        quorum = ensemble_pb2_grpc.EnsembleServiceStub(channel)
        answer, call = quorum.Predict.with_call(ensemble_pb2.PredictRequest(
            model="digits", inputs=ensemble_pb2.Tensor(dtype="FP32", shape=[1, 64], content=ROWS[:1].tobytes())),
            metadata=_auth(), timeout=30)
        generated = dict(call.trailing_metadata())["x-request-id"]
        assert generated and answer.request_id == generated

        # An error carries it too; a request that logs (an unload) logs it on its lines.
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(v2.ModelInferRequest(model_name="no_such_model", id="client-id-8"),
                            metadata=_auth(), timeout=30)
        assert dict(err.value.trailing_metadata())["x-request-id"] == "client-id-8"
        _, call = stub.RepositoryModelUnload.with_call(
            v2.RepositoryModelUnloadRequest(model_name="digits_logreg"), metadata=_auth(), timeout=60)
        unload_id = dict(call.trailing_metadata())["x-request-id"]
        # loaded again: the module's other tests, in whatever order, vote with all five
        stub.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="digits_logreg"), metadata=_auth(),
                                 timeout=120)

    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    about_unload = [line for line in lines if "digits_logreg" in line["message"] and "unload" in line["message"]]
    assert about_unload and all(line.get("request_id") == unload_id for line in about_unload)
    startup = [line for line in lines if "Prometheus /metrics" in line["message"]]
    assert startup and "request_id" not in startup[0]
    log = server.output()
    assert TOKEN not in log
    assert ROWS[:1].tobytes().hex()[:32] not in log and "16.0, " not in log
