"""A server with monitoring off (QUORUM_MONITORING=false) still starts when a model fails to
load: the manager then reports to `Statistics` alone, which must take the load failure (it
once had no `on_load_failure`, so the failure raised AttributeError and the server never
started). The broken model is reported not ready under its own name; the others answer."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2
from sklearn.datasets import load_digits

from tests.helpers import copy_variant
from tests.server import running_server

GRPCIO_ONLY = True  # the subject is monitoring, not the transport

GOOD = ("digits_mlp_a", "digits_logreg")
BROKEN = "digits_broken"


@pytest.fixture(scope="module")
def server(tmp_path_factory, grpc_engine):
    tmp = tmp_path_factory.mktemp("monitoring-off")
    repo = tmp / "repo"
    for name in GOOD:
        copy_variant(name, repo)
    broken = copy_variant("digits_cnn_a", repo, as_name=BROKEN)
    (broken / "model.onnx").write_bytes(b"this is not an ONNX model\x00\xff" * 16)
    with running_server(tmp, repository=repo, env={"QUORUM_MONITORING": "false"}) as s:
        yield s  # running_server has waited for SERVING (or raised with the server's log)


def test_the_broken_model_is_not_ready_under_its_own_name(server, client):
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    assert server.health(BROKEN) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not client.is_model_ready(BROKEN)
    for name in GOOD:
        assert server.health(name) == health_pb2.HealthCheckResponse.SERVING
        assert client.is_model_ready(name)


@pytest.mark.parametrize("model", GOOD)
def test_the_good_models_answer(client, model):
    pixels = load_digits().data.astype("float32")[:4]
    tensor = grpcclient.InferInput("pixels", [4, 64], "FP32")
    tensor.set_data_from_numpy(pixels)
    probabilities = client.infer(model, [tensor]).as_numpy("probabilities")
    assert probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
