"""Prediction sets and selective answers through stock clients, on the digits test split (360
rows the validation replay never saw): at coverage 0.9 and 0.95 the sets cover the truth as
often as split conformal promises for this many calibration rows; with max_risk the error
among answered rows stays under it; gRPC and HTTP give the same sets; a model whose
configuration sets a default coverage answers sets to a TF Serving Predict, which cannot ask;
a coverage or risk out of range, or more than the calibration rows support, is
INVALID_ARGUMENT (HTTP 400) naming the value and the limit."""

from __future__ import annotations

import json
import math

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.e2e.fixtures import ENSEMBLE, MEMBER, module_server
from tests.helpers import MODELS, ONNX_VARIANTS, onnx_ensemble

DEFAULTED = "digits_sets"  # the ensemble again, with a default coverage (APS sets)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = onnx_ensemble(tmp_path_factory.mktemp("sets") / "models", policy="stacked", name=ENSEMBLE)
    (root / DEFAULTED).mkdir()
    (root / DEFAULTED / "ensemble.yaml").write_text(yaml.safe_dump({
        "members": list(ONNX_VARIANTS), "policy": "stacked", "uncertainty": {"coverage": 0.9, "score": "aps"}}))
    with module_server(tmp_path_factory, "sets", repository=root) as s:
        yield s


def _calibration_rows(model: str) -> int:
    """The rows that calibrate the sets: the odd half of the rows every member's validation shares."""
    members = ONNX_VARIANTS if model != MEMBER else (MEMBER,)
    shared = set.intersection(*(set(json.loads((MODELS / m / "1" / "variant.json").read_text())["validation"]["indices"])
                                for m in members))
    return len(shared) // 2


def _bounds(coverage: float, n: int, rows: int) -> tuple[float, float]:
    """Split conformal's coverage given n calibration scores is Beta(k, n + 1 - k), k =
    ceil((n + 1) coverage); over `rows` test rows binomial noise adds to it: 3 standard deviations."""
    k = math.ceil((n + 1) * coverage)
    mean = k / (n + 1)
    var = k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2)) + mean * (1 - mean) / rows
    return mean - 3 * math.sqrt(var), min(1.0, mean + 3 * math.sqrt(var))


def _grpc_infer(server, model, x, **parameters):
    client = grpcclient.InferenceServerClient(server.address)
    tensor = grpcclient.InferInput("pixels", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], parameters=parameters)


@pytest.mark.parametrize("model", [ENSEMBLE, MEMBER])
@pytest.mark.parametrize("coverage", [0.9, 0.95])
def test_sets_cover_the_test_split_as_split_conformal_promises(server, test_split, model, coverage):
    x, y = test_split
    answer = _grpc_infer(server, model, x, coverage=coverage)
    sets, sizes = answer.as_numpy("prediction_set"), answer.as_numpy("set_size")
    assert sets.dtype == np.bool_ and sets.shape == (len(y), 10) and sizes.dtype == np.int64
    np.testing.assert_array_equal(sizes, sets.sum(axis=1))
    covered = sets[np.arange(len(y)), y].mean()
    low, high = _bounds(coverage, _calibration_rows(model), len(y))
    assert low <= covered <= high, (covered, low, high)
    labels = answer.as_numpy("class_index")
    assert sets[np.arange(len(y)), labels].mean() > 0.8  # the answer's label is nearly always in its set


def test_http_answers_the_same_sets_as_grpc(server, test_split):
    x, _ = test_split
    expected = _grpc_infer(server, ENSEMBLE, x, coverage=0.9).as_numpy("prediction_set")
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    for binary in (False, True):
        tensor = httpclient.InferInput("pixels", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        wanted = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("prediction_set", "set_size")]
        answer = client.infer(ENSEMBLE, [tensor], outputs=wanted, parameters={"coverage": 0.9})
        np.testing.assert_array_equal(answer.as_numpy("prediction_set"), expected)
        assert [o["name"] for o in answer.get_response()["outputs"]] == ["prediction_set", "set_size"]


def test_selective_answers_keep_the_error_among_answered_rows_under_the_risk(server, test_split):
    x, y = test_split
    answer = _grpc_infer(server, ENSEMBLE, x, max_risk=0.05)
    abstained, labels = answer.as_numpy("abstained"), answer.as_numpy("class_index")
    assert abstained.dtype == np.bool_ and labels.shape == y.shape  # every row keeps its label, marked
    answered = ~abstained
    assert answered.mean() > 0.5
    assert np.mean(labels[answered] != y[answered]) <= 0.05


def test_a_default_coverage_reaches_tf_serving_clients_and_metadata(server, test_split):
    x, y = test_split
    request = predict_pb2.PredictRequest()
    request.model_spec.name = DEFAULTED
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(x))
    with grpc.insecure_channel(server.address) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    sets = tf.make_ndarray(response.outputs["prediction_set"])
    low, _ = _bounds(0.9, _calibration_rows(DEFAULTED), len(y))
    assert sets[np.arange(len(y)), y].mean() >= low  # APS keeps the class that reaches q: it over-covers
    assert sets.sum(axis=1).min() >= 1  # APS sets are never empty
    rest = requests.post(f"{server.http_url}/v1/models/{DEFAULTED}:predict",
                         json={"instances": x[:5].tolist()}, timeout=30).json()["predictions"]
    assert [r["prediction_set"] for r in rest] == sets[:5].tolist()
    outputs = {o.name for o in grpcclient.InferenceServerClient(server.address).get_model_metadata(DEFAULTED).outputs}
    assert {"prediction_set", "set_size"} <= outputs
    plain = {o.name for o in grpcclient.InferenceServerClient(server.address).get_model_metadata(ENSEMBLE).outputs}
    assert not {"prediction_set", "set_size", "abstained"} & plain  # a client asking every output listed gets them


@pytest.mark.parametrize("parameters, message", [
    ({"coverage": 0.0}, "coverage must be a number strictly between 0 and 1, got 0.0"),
    ({"coverage": 1.0}, "coverage must be a number strictly between 0 and 1, got 1.0"),
    ({"coverage": 1.5}, "coverage must be a number strictly between 0 and 1, got 1.5"),
    ({"coverage": float("nan")}, "coverage must be a number strictly between 0 and 1, got nan"),
    ({"coverage": "0.9"}, "parameter 'coverage' must be a number strictly between 0 and 1, got '0.9'"),
    ({"max_risk": -0.1}, "max_risk must be a number strictly between 0 and 1, got -0.1"),
    ({"coverage": 0.999}, "coverage 0.999 needs at least 999 calibration rows; there are 180, which support a "
                          "coverage of at most 0.9945"),
    ({"max_risk": 0.01}, "max_risk 0.01 cannot be certified on 180 calibration rows (at 95% confidence); the "
                         "smallest risk they could certify, with no error among them, is 0.0376"),
])
def test_a_coverage_or_risk_that_cannot_be_given_is_invalid_argument_naming_it(server, test_split, parameters,
                                                                                message):
    x, _ = test_split
    with pytest.raises(InferenceServerException) as grpc_error:
        _grpc_infer(server, ENSEMBLE, x[:2], **parameters)
    assert grpc_error.value.status() == "StatusCode.INVALID_ARGUMENT" and message in grpc_error.value.message()
    body = {"inputs": [{"name": "pixels", "shape": [2, 64], "datatype": "FP32", "data": x[:2].ravel().tolist()}],
            "parameters": parameters}
    http = requests.post(f"{server.http_url}/v2/models/{ENSEMBLE}/infer", data=json.dumps(body), timeout=30)
    assert http.status_code == 400 and message in http.json()["error"], http.text


def test_asking_for_a_set_without_a_coverage_is_invalid_argument(server, test_split):
    x, _ = test_split
    client = grpcclient.InferenceServerClient(server.address)
    tensor = grpcclient.InferInput("pixels", [2, 64], "FP32")
    tensor.set_data_from_numpy(x[:2])
    with pytest.raises(InferenceServerException, match="outputs prediction_set and set_size need a coverage"):
        client.infer(ENSEMBLE, [tensor], outputs=[grpcclient.InferRequestedOutput("prediction_set")])
    with pytest.raises(InferenceServerException, match="output abstained needs the request parameter 'max_risk'"):
        client.infer(ENSEMBLE, [tensor], outputs=[grpcclient.InferRequestedOutput("abstained")])


def test_quorum_v1_predictions_carry_their_sets_labels_and_abstention(server, test_split):
    x, _ = test_split
    from service._proto.quorum.v1 import ensemble_pb2 as qpb
    from service._proto.quorum.v1 import ensemble_pb2_grpc as qpb_grpc

    answer = _grpc_infer(server, ENSEMBLE, x, coverage=0.9, max_risk=0.05)
    labels = [str(i) for i in range(10)]
    with grpc.insecure_channel(server.address) as channel:
        response = qpb_grpc.EnsembleServiceStub(channel).Predict(qpb.PredictRequest(
            model=ENSEMBLE, inputs=qpb.Tensor(dtype="FP32", shape=list(x.shape), content=x.tobytes()),
            coverage=0.9, max_risk=0.05), timeout=30)
        plain = qpb_grpc.EnsembleServiceStub(channel).Predict(qpb.PredictRequest(
            model=ENSEMBLE, inputs=qpb.Tensor(dtype="FP32", shape=list(x[:3].shape), content=x[:3].tobytes())),
            timeout=30)
    sets, abstained = answer.as_numpy("prediction_set"), answer.as_numpy("abstained")
    assert [list(p.prediction_set) for p in response.predictions] == [
        [labels[c] for c in np.flatnonzero(row)] for row in sets]
    assert [p.abstained for p in response.predictions] == abstained.tolist()
    assert all(not p.prediction_set and not p.abstained for p in plain.predictions)
    with pytest.raises(grpc.RpcError) as error, grpc.insecure_channel(server.address) as channel:
        qpb_grpc.EnsembleServiceStub(channel).Predict(qpb.PredictRequest(
            model=ENSEMBLE, inputs=qpb.Tensor(dtype="FP32", shape=[1, 64], content=x[:1].tobytes()), coverage=1.0),
            timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "coverage must be a number strictly between 0 and 1, got 1.0" in error.value.details()


def test_get_status_shows_what_the_sets_are_made_of(server):
    from service._proto.quorum.v1 import ensemble_pb2 as qpb
    from service._proto.quorum.v1 import ensemble_pb2_grpc as qpb_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = qpb_grpc.EnsembleServiceStub(channel)
        defaulted = stub.GetStatus(qpb.GetStatusRequest(model=DEFAULTED), timeout=30).models[0].uncertainty
        plain = stub.GetStatus(qpb.GetStatusRequest(model=MEMBER), timeout=30).models[0].uncertainty
    n = _calibration_rows(DEFAULTED)
    assert (defaulted.coverage, defaulted.is_default, defaulted.score) == (0.9, True, "aps")
    assert (defaulted.fit_rows, defaulted.calibration_rows) == (n, n)
    assert defaulted.max_coverage == pytest.approx(n / (n + 1))
    assert 0 < defaulted.quantile <= 1 and defaulted.mean_set_size >= 1  # APS: never an empty set
    assert (plain.coverage, plain.is_default, plain.score, plain.class_conditional) == (0.9, False, "lac", False)
    assert plain.calibration_rows == _calibration_rows(MEMBER) and 0 < plain.mean_set_size < 3
