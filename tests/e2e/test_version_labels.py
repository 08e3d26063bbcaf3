"""TF Serving's model_spec.version_label, resolved through model.yaml's version_labels."""

from __future__ import annotations

import grpc
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tests.helpers import copy_variant
from tests.server import running_server


def test_version_labels_pick_versions(tmp_path, scratch_repo, test_split):
    x, _ = test_split
    copy_variant("digits_mlp_a", scratch_repo, version=1, as_name="m")
    copy_variant("digits_cnn_a", scratch_repo, version=2, as_name="m")
    (scratch_repo / "m" / "model.yaml").write_text(
        "version_policy: {all: {}}\nversion_labels: {stable: 1, canary: 2}\n")
    with running_server(tmp_path, scratch_repo) as server, grpc.insecure_channel(server.address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def predict(label: str):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "m"
            request.model_spec.version_label = label
            request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(x[:2]))
            return stub.Predict(request, timeout=10)

        assert predict("stable").model_spec.version.value == 1
        assert predict("canary").model_spec.version.value == 2
        with pytest.raises(grpc.RpcError) as info:
            predict("nightly")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "version label 'nightly'" in info.value.details()
