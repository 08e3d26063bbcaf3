"""An unknown model, or an unknown version of a known model, is 404 on every HTTP route that
names a model and NOT_FOUND on every gRPC call that names one, with a message naming the
model (and the version); a known model that is not ready stays 503 / UNAVAILABLE. Stock
clients against a real server: `requests` on every route, tritonclient.http and .grpc, the
tensorflow-serving-api stubs and quorum.v1's own."""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc)
from tritonclient.utils import InferenceServerException

from service._proto.quorum.v1 import ensemble_pb2 as qpb
from service._proto.quorum.v1 import ensemble_pb2_grpc as qpb_grpc
from tests.e2e.fixtures import ENSEMBLE, MEMBER, module_server
from tests.helpers import copy_variant, onnx_models

BROKEN = "digits_broken"  # in the repository, its checkpoint corrupt: known, never ready
UNKNOWN = [("nosuch", None), ("nosuch", 1), (MEMBER, 9), (ENSEMBLE, 2)]
KNOWN = [(MEMBER, None), (MEMBER, 1), (ENSEMBLE, None), (ENSEMBLE, 1)]
ROW = [0.0] * 64  # one digit image, flattened: what every model here takes
V2_ROUTES = [("GET", ""), ("GET", "/ready"), ("GET", "/config"), ("GET", "/stats"), ("POST", "/infer")]
V1_ROUTES = [("GET", ""), ("GET", "/metadata"), ("POST", ":predict"), ("POST", ":classify"), ("POST", ":regress")]
BODY = {"/infer": {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}]},
        ":predict": {"instances": [ROW]}, ":classify": {"examples": [{"pixels": ROW}]},
        ":regress": {"examples": [{"pixels": ROW}]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, grpc_engine):
    repo = tmp_path_factory.mktemp("unknown-models") / "models"
    shutil.copytree(onnx_models(), repo)
    broken = copy_variant(MEMBER, repo, as_name=BROKEN)
    (broken / "model.onnx").write_bytes(b"not an ONNX graph" * 8)
    with module_server(tmp_path_factory, "unknown-models", repository=repo) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    yield c
    c.close()


def _id(target) -> str:
    return f"{target[0]}" + (f"-v{target[1]}" if target[1] is not None else "")


def _path(api: str, model: str, version: int | None) -> str:
    return f"/{api}/models/{model}" + (f"/versions/{version}" if version is not None else "")


def _call(server, api: str, target, route) -> requests.Response:
    method, suffix = route
    url = server.http_url + _path(api, *target) + suffix
    return requests.request(method, url, json=BODY.get(suffix), timeout=30)


def _names(message: str, model: str, version: int | None) -> None:
    """The message names the model, and the version when the model is known."""
    assert f"'{model}'" in message, message
    if model != "nosuch" and version is not None:
        assert f"version {version}" in message, message


# -- every HTTP route ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", UNKNOWN, ids=_id)
@pytest.mark.parametrize("api, route", [("v2", r) for r in V2_ROUTES] + [("v1", r) for r in V1_ROUTES],
                         ids=lambda r: r if isinstance(r, str) else "".join(r))
def test_every_http_route_is_404_for_an_unknown_model_or_version(server, api, route, target):
    response = _call(server, api, target, route)
    assert response.status_code == 404, response.text
    body = response.json()
    assert body["code"] == "NOT_FOUND"
    _names(body["error"], *target)


@pytest.mark.parametrize("target", KNOWN, ids=_id)
@pytest.mark.parametrize("api, route", [("v2", r) for r in V2_ROUTES] + [("v1", r) for r in V1_ROUTES],
                         ids=lambda r: r if isinstance(r, str) else "".join(r))
def test_the_same_requests_are_answered_for_a_known_model(server, api, route, target):
    """The 404 above is the name's: the very same request to a served model is answered
    (Regress is refused whatever the model: Quorum serves classifiers)."""
    response = _call(server, api, target, route)
    assert response.status_code == (400 if route[1] == ":regress" else 200), response.text


@pytest.mark.parametrize("path, named", [(f"/v1/models/{MEMBER}/labels/nolabel", "'nolabel'"),
                                         ("/v1/models/nosuch/labels/stable", "'nosuch'")])
@pytest.mark.parametrize("suffix", ["", "/metadata", ":predict", ":classify"])
def test_an_unknown_version_label_is_404(server, path, named, suffix):
    response = requests.request("POST" if suffix.startswith(":") else "GET", server.http_url + path + suffix,
                                json=BODY.get(suffix), timeout=30)
    assert response.status_code == 404 and named in response.json()["error"], response.text


def test_a_known_model_that_is_not_ready_stays_503(server, http):
    for path in (f"/v2/models/{BROKEN}/ready", f"/v2/models/{BROKEN}/versions/1/ready"):
        response = requests.get(server.http_url + path, timeout=30)
        assert response.status_code == 503 and response.json() == {"name": BROKEN, "ready": False}
    response = _call(server, "v2", (BROKEN, None), ("POST", "/infer"))
    assert response.status_code == 503 and response.json()["code"] == "UNAVAILABLE", response.text
    response = _call(server, "v1", (BROKEN, None), ("POST", ":predict"))
    assert response.status_code == 503 and BROKEN in response.json()["error"], response.text
    assert http.is_model_ready(BROKEN) is False


# -- tritonclient.http: what a user of the stock client sees --------------------------------------
@pytest.mark.parametrize("target", UNKNOWN, ids=_id)
def test_tritonclient_http_sees_not_ready_and_404(http, target):
    model, version = target
    version_text = "" if version is None else str(version)
    assert http.is_model_ready(model, version_text) is False  # the client reads any non-200 as not ready
    tensor = httpclient.InferInput("pixels", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
    calls = [lambda: http.get_model_metadata(model, version_text), lambda: http.get_model_config(model, version_text),
             lambda: http.get_inference_statistics(model, version_text),
             lambda: http.infer(model, [tensor], model_version=version_text)]
    for call in calls:
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == "404", err.value
        _names(err.value.message(), model, version)
    assert http.is_model_ready(MEMBER, "1") and http.is_model_ready(ENSEMBLE)


# -- gRPC: tritonclient.grpc, TF Serving's stubs, quorum.v1 --------------------------------------
@pytest.mark.parametrize("target", UNKNOWN, ids=_id)
def test_tritonclient_grpc_gets_not_found(client, target):
    model, version = target
    version_text = "" if version is None else str(version)
    tensor = grpcclient.InferInput("pixels", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
    calls = [lambda: client.is_model_ready(model, version_text), lambda: client.get_model_metadata(model, version_text),
             lambda: client.get_model_config(model, version_text),
             lambda: client.get_inference_statistics(model, version_text),
             lambda: client.infer(model, [tensor], model_version=version_text)]
    for call in calls:
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == "StatusCode.NOT_FOUND", err.value
        _names(err.value.message(), model, version)


def test_tritonclient_grpc_a_known_model_that_is_not_ready(client):
    assert client.is_model_ready(BROKEN) is False and client.is_model_ready(BROKEN, "1") is False
    tensor = grpcclient.InferInput("pixels", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer(BROKEN, [tensor])
    assert err.value.status() == "StatusCode.UNAVAILABLE" and BROKEN in err.value.message()


def _spec(spec, model: str, version: int | None) -> None:
    spec.name = model
    if version is not None:
        spec.version.value = version


def _tf_requests(model: str, version: int | None):
    status = get_model_status_pb2.GetModelStatusRequest()
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    predict = predict_pb2.PredictRequest()
    predict.inputs["pixels"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 64), np.float32)))
    classify = classification_pb2.ClassificationRequest()
    classify.input.example_list.examples.add().features.feature["pixels"].float_list.value.extend(ROW)
    for request in (status, metadata, predict, classify):
        _spec(request.model_spec, model, version)
    return [("ModelService", "GetModelStatus", status), ("PredictionService", "GetModelMetadata", metadata),
            ("PredictionService", "Predict", predict), ("PredictionService", "Classify", classify)]


@pytest.mark.parametrize("target", UNKNOWN, ids=_id)
def test_tf_serving_stubs_get_not_found(channel, target):
    stubs = {"ModelService": model_service_pb2_grpc.ModelServiceStub(channel),
             "PredictionService": prediction_service_pb2_grpc.PredictionServiceStub(channel)}
    for service, rpc, request in _tf_requests(*target):
        with pytest.raises(grpc.RpcError) as err:
            getattr(stubs[service], rpc)(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, (rpc, err.value.details())
        _names(err.value.details(), *target)


@pytest.mark.parametrize("target", KNOWN, ids=_id)
def test_tf_serving_stubs_answer_a_known_model(channel, target):
    stubs = {"ModelService": model_service_pb2_grpc.ModelServiceStub(channel),
             "PredictionService": prediction_service_pb2_grpc.PredictionServiceStub(channel)}
    for service, rpc, request in _tf_requests(*target):
        getattr(stubs[service], rpc)(request, timeout=30)  # answered: no RpcError


@pytest.mark.parametrize("target", UNKNOWN, ids=_id)
def test_quorum_api_gets_not_found(channel, target):
    model, version = target
    stub = qpb_grpc.EnsembleServiceStub(channel)
    rows = np.zeros((1, 64), np.float32)
    request = qpb.PredictRequest(model=model, version=version or 0,
                                 inputs=qpb.Tensor(dtype="FP32", shape=[1, 64], content=rows.tobytes()))
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    _names(err.value.details(), model, version)
    if version is None:
        with pytest.raises(grpc.RpcError) as err:
            stub.GetStatus(qpb.GetStatusRequest(model=model), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and f"'{model}'" in err.value.details()
