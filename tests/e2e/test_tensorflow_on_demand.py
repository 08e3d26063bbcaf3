"""TensorFlow is loaded only when a model needs it: a server whose models are all ONNX
answers TF Serving's API (its protos are TensorFlow's) without ever mapping TensorFlow's
library; one serving a SavedModel loads it and answers with it."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
import tritonclient.grpc as grpcclient
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from tests.e2e.fixtures import Reference, vote_temperatures
from tests.helpers import MODELS, copy_variant
from tests.server import RunningServer, running_server

SERVER_REPOSITORY = MODELS  # `server`: the bundled repository as shipped, SavedModel members included

ONNX_MEMBERS = ("digits_mlp_a", "digits_cnn_a", "digits_logreg")
TF_LIBRARY = "libtensorflow_framework"  # what `import tensorflow` maps, and protos alone do not


def _tensorflow_mapped(server: RunningServer) -> bool:
    return TF_LIBRARY in Path(f"/proc/{server.process.pid}/maps").read_text()


@pytest.fixture(scope="module")
def onnx_server(tmp_path_factory, grpc_engine):
    tmp = tmp_path_factory.mktemp("onnx-only")
    repo = tmp / "repo"
    for name in ONNX_MEMBERS:
        copy_variant(name, repo)
    (repo / "trio").mkdir()
    (repo / "trio" / "ensemble.yaml").write_text(f"members: [{', '.join(ONNX_MEMBERS)}]\npolicy: confidence\n")
    with running_server(tmp, repository=repo) as server:
        yield server


def _predict(server: RunningServer, model: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
    with grpc.insecure_channel(server.address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels))
        response = stub.Predict(request, timeout=30)
        metadata = stub.GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=request.model_spec, metadata_field=["signature_def"]), timeout=30)
        assert metadata.model_spec.name == model and "signature_def" in metadata.metadata
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def test_an_onnx_only_server_answers_tf_serving_without_loading_tensorflow(onnx_server, test_split):
    x, y = test_split
    out = _predict(onnx_server, "trio", x[:32])
    assert out["probabilities"].shape == (32, 10)
    assert np.mean(out["class_index"] == y[:32]) > 0.85
    client = grpcclient.InferenceServerClient(onnx_server.address)
    try:
        tensor = grpcclient.InferInput("pixels", [4, 64], "FP32")
        tensor.set_data_from_numpy(x[:4])
        assert client.infer("digits_mlp_a", [tensor]).as_numpy("probabilities").shape == (4, 10)
    finally:
        client.close()
    assert not _tensorflow_mapped(onnx_server)


def test_a_savedmodel_member_loads_tensorflow_and_answers(server, test_split):
    x, y = test_split
    out = _predict(server, "digits_mlp_b", x[:32])  # a SavedModel in the bundled repository
    assert np.mean(out["class_index"] == y[:32]) > 0.85
    assert _tensorflow_mapped(server)
    # ... through tritonclient too, every output as the SavedModel run here gives it
    reference = Reference(MODELS)
    expected = reference.outputs("digits_mlp_b", x[:16])
    client = grpcclient.InferenceServerClient(server.address)
    try:
        tensor = grpcclient.InferInput("pixels", [16, 64], "FP32")
        tensor.set_data_from_numpy(x[:16])
        result = client.infer("digits_mlp_b", [tensor])
    finally:
        client.close()
    for name in ("probabilities", "logits", "confidence"):
        np.testing.assert_allclose(result.as_numpy(name), expected[name], atol=1e-5)
    np.testing.assert_array_equal(result.as_numpy("class_index"), expected["class_index"])


def test_a_savedmodel_is_described_as_one(server):
    """Its model config (Triton's platform name) and quorum.v1 status name its framework."""
    from service._proto.quorum.v1 import ensemble_pb2 as pb
    from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc

    client = grpcclient.InferenceServerClient(server.address)
    try:
        assert client.get_model_config("digits_mlp_b").config.platform == "tensorflow_savedmodel"
        assert client.get_model_config("digits_mlp_a").config.platform == "onnxruntime_onnx"
    finally:
        client.close()
    with grpc.insecure_channel(server.address) as channel:
        [model] = pb_grpc.EnsembleServiceStub(channel).GetStatus(pb.GetStatusRequest(model="digits_cnn_b"),
                                                                 timeout=10).models
    assert [(v.version, v.framework, v.device) for v in model.versions] == [(1, "savedmodel", "cpu")]


def test_the_bundled_ensemble_of_onnx_and_savedmodel_members_answers_as_its_reference(server, test_split):
    """The bundled repository as shipped: its 5-member ensemble (ONNX and SavedModel members)
    answers each row as the members run here and combined by the oracle would."""
    x, _ = test_split
    reference = Reference(MODELS, vote_temperatures=vote_temperatures(server))
    assert len(reference.ensemble_config("digits")["members"]) == 5
    out = _predict(server, "digits", x[:32])
    expected = reference.outputs("digits", x[:32])
    np.testing.assert_allclose(out["probabilities"], expected["probabilities"], atol=1e-5)
    np.testing.assert_array_equal(out["class_index"], expected["class_index"])
