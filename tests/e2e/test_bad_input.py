"""Bad requests get the right status code and a message naming the problem, while another
client's valid requests to the same server keep succeeding throughout this module."""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import pytest
import tensorflow as tf
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service._proto.quorum.v1 import ensemble_pb2 as qpb
from service._proto.quorum.v1 import ensemble_pb2_grpc as qpb_grpc
from tests.e2e.fixtures import ENSEMBLE, MEMBER, Reference, module_server, repository_models
from tests.e2e.traffic import GoodClient
from tests.helpers import MODELS, copy_variant

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


# -- the server, and a well-behaved client running beside every test ------------------------
@pytest.fixture(scope="module")
def layout(tmp_path_factory, grpc_engine):  # per engine: the load requests below change it
    """A copy of the bundled repository, with loadable model folders *outside* it that a
    path-traversing load request would reach: base/models (served), base/etc, base/escaped."""
    base = tmp_path_factory.mktemp("layout")
    repository = base / "models"
    shutil.copytree(MODELS, repository)
    copy_variant("digits_logreg", base, as_name="etc")
    copy_variant("digits_logreg", base, as_name="escaped")
    return repository


@pytest.fixture(scope="module")
def server(tmp_path_factory, layout, grpc_engine):
    with module_server(tmp_path_factory, "bad-input", repository=layout,
                       args=["--model-control", "explicit"]) as s:  # the load requests below
        yield s


@pytest.fixture(scope="module")
def v2(channel):
    return service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def pixels(test_split):
    return np.ascontiguousarray(test_split[0][:8])


@pytest.fixture(scope="module")
def good_client(server, pixels):
    expected = Reference().vote(ENSEMBLE, pixels).label_index
    thread = GoodClient(server.address, pixels, expected)
    thread.start()
    yield thread
    # After every test of the module, in whatever order they ran: the good client saw
    # nothing but right answers (an assertion here fails the module's last test).
    thread.stopping.set()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert thread.failures == []
    assert thread.successes >= 20


@pytest.fixture(autouse=True)
def _beside_good_client(good_client):
    """Every test here runs while the good client is sending requests."""
    assert good_client.is_alive()
    yield


def _code(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, ""


def _infer_request(model: str, rows: np.ndarray, *, name: str = "pixels", datatype: str = "FP32",
                   shape=None, raw: bytes | None = None, version: str = "") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=name, datatype=datatype, shape=list(rows.shape if shape is None else shape))
    request.raw_input_contents.append(rows.tobytes() if raw is None else raw)
    return request


def _tf_predict(channel, model: str, tensor, version: int | None = None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["pixels"].CopyFrom(tensor)
    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)


# -- unknown models and versions --------------------------------------------------------------
@pytest.mark.parametrize("model, version", [("no_such_model", ""), (MEMBER, "7"), (ENSEMBLE, "2")])
def test_unknown_model_or_version_is_not_found(v2, pixels, model, version):
    code, message = _code(v2.ModelInfer, _infer_request(model, pixels, version=version), timeout=30)
    assert code == NOT_FOUND, message
    assert model in message and (not version or version in message)


def test_unknown_model_and_version_over_tf_serving(channel, pixels):
    code, message = _code(_tf_predict, channel, "no_such_model", tf.make_tensor_proto(pixels))
    assert code == NOT_FOUND and "no_such_model" in message
    code, message = _code(_tf_predict, channel, MEMBER, tf.make_tensor_proto(pixels), version=7)
    assert code == NOT_FOUND and "7" in message


def test_unknown_model_with_tritonclient(client, pixels):
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    with pytest.raises(InferenceServerException) as err:
        client.infer("no_such_model", [tensor])
    assert err.value.status() == "StatusCode.NOT_FOUND" and "no_such_model" in err.value.message()


# -- malformed tensors ------------------------------------------------------------------------
@pytest.mark.parametrize("model", [ENSEMBLE, MEMBER])
def test_wrong_dtype(v2, channel, pixels, model):
    code, message = _code(v2.ModelInfer, _infer_request(model, pixels.astype(np.float64), datatype="FP64"),
                          timeout=30)
    assert code == INVALID, message
    assert "float32" in message and "float64" in message
    code, message = _code(_tf_predict, channel, model, tf.make_tensor_proto(pixels.astype(np.int32)))
    assert code == INVALID and "float32" in message and "int32" in message


def test_unknown_dtype_name(channel, pixels):
    stub = qpb_grpc.EnsembleServiceStub(channel)
    request = qpb.PredictRequest(model=ENSEMBLE, inputs=qpb.Tensor(dtype="FP99", shape=[8, 64],
                                                                  content=pixels.tobytes()))
    code, message = _code(stub.Predict, request, timeout=30)
    assert code == INVALID and "FP99" in message


@pytest.mark.parametrize("shape", [(8, 63), (8, 8, 8), (512,), (8, 2, 32)])
def test_wrong_shape(v2, pixels, shape):
    rows = np.zeros(shape, dtype=np.float32)
    code, message = _code(v2.ModelInfer, _infer_request(ENSEMBLE, rows), timeout=30)
    assert code == INVALID, message
    assert "shape" in message and str(list(shape)) in message


def test_missing_input(v2, pixels):
    code, message = _code(v2.ModelInfer, _infer_request(ENSEMBLE, pixels, name="image"), timeout=30)
    assert code == INVALID, message
    assert "'pixels'" in message
    code, message = _code(v2.ModelInfer, service_pb2.ModelInferRequest(model_name=ENSEMBLE), timeout=30)
    assert code == INVALID and "'pixels'" in message


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_rejected(v2, channel, pixels, value):
    rows = pixels.copy()
    rows[3, 17] = value
    code, message = _code(v2.ModelInfer, _infer_request(ENSEMBLE, rows), timeout=30)
    assert code == INVALID and "NaN or Inf" in message
    code, message = _code(_tf_predict, channel, MEMBER, tf.make_tensor_proto(rows))
    assert code == INVALID and "NaN or Inf" in message


def test_empty_batch(v2, channel):
    rows = np.zeros((0, 64), dtype=np.float32)
    code, message = _code(v2.ModelInfer, _infer_request(ENSEMBLE, rows), timeout=30)
    assert code == INVALID and "empty batch" in message
    code, message = _code(_tf_predict, channel, MEMBER, tf.make_tensor_proto(rows))
    assert code == INVALID and "empty batch" in message


@pytest.mark.parametrize("model", [ENSEMBLE, MEMBER])
def test_more_rows_than_max_request_rows(v2, model):
    # declared, not sent: refused from the declared shape, before any allocation
    request = _infer_request(model, np.zeros((1, 64), np.float32), shape=[65537, 64])
    code, message = _code(v2.ModelInfer, request, timeout=60)
    assert code == INVALID, message
    assert "65537 rows" in message and "max_request_rows 65536" in message


@pytest.mark.parametrize("extra", [-4, 4, -256])
def test_raw_contents_length_mismatch(v2, channel, pixels, extra):
    raw = pixels.tobytes()
    raw = raw[:extra] if extra < 0 else raw + b"\0" * extra
    code, message = _code(v2.ModelInfer, _infer_request(ENSEMBLE, pixels, raw=raw), timeout=30)
    assert code == INVALID, message
    assert f"{len(raw)} bytes" in message and "2048" in message
    stub = qpb_grpc.EnsembleServiceStub(channel)
    request = qpb.PredictRequest(model=ENSEMBLE, inputs=qpb.Tensor(dtype="FP32", shape=[8, 64], content=raw))
    code, message = _code(stub.Predict, request, timeout=30)
    assert code == INVALID and f"{len(raw)} bytes" in message


def test_raw_and_typed_contents_together(v2, pixels):
    request = _infer_request(ENSEMBLE, pixels)
    request.inputs[0].contents.fp32_contents.extend(pixels.ravel().tolist())
    code, message = _code(v2.ModelInfer, request, timeout=30)
    assert code == INVALID, message


# -- the wire and the clock ---------------------------------------------------------------------
@pytest.mark.parametrize("payload", [b"\xff" * 64, np.random.default_rng(4).bytes(4096), b"\x0a\xff\xff\xff\xff"])
def test_garbage_bytes_on_the_wire(server, channel, payload, v2, pixels):
    raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                              request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        raw(payload, timeout=10)
    # The client sent bytes that do not parse: its fault, INVALID_ARGUMENT (INTERNAL is ours).
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert "do not parse as inference.ModelInferRequest" in err.value.details()
    # ... and the server is still up and answering.
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    assert v2.ModelInfer(_infer_request(ENSEMBLE, pixels), timeout=30).outputs


def test_garbage_bytes_in_a_stream(server, channel, pixels):
    good = _infer_request(ENSEMBLE, pixels).SerializeToString()
    raw = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                request_serializer=None, response_deserializer=None)
    responses = raw(iter([good, b"\xff" * 32, good]), timeout=30)
    first = service_pb2.ModelStreamInferResponse.FromString(next(responses))
    assert not first.error_message and first.infer_response.model_name == ENSEMBLE
    with pytest.raises(grpc.RpcError) as err:
        next(responses)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert "do not parse" in err.value.details()
    assert server.health() == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("timeout", [1e-4, 1e-6])
def test_expired_deadline(v2, pixels, timeout):
    code, message = _code(v2.ModelInfer, _infer_request(ENSEMBLE, pixels), timeout=timeout)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, message


def test_latency_budget_zero(channel, pixels):
    """A zero latency budget leaves no member time to answer: an error, never a vote of nobody."""
    stub = qpb_grpc.EnsembleServiceStub(channel)
    request = qpb.PredictRequest(model=ENSEMBLE, inputs=qpb.Tensor(dtype="FP32", shape=[8, 64],
                                                                  content=pixels.tobytes()),
                                 latency_budget_ms=0.0)
    code, message = _code(stub.Predict, request, timeout=30)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, message
    assert ENSEMBLE in message


# -- the repository API does not leave the repository ------------------------------------------
@pytest.mark.parametrize("name", ["../etc", "..%2fetc", "..%2f", "a/b", "../escaped", "..", "/etc",
                                  "digits/../etc", "", "etc", "escaped"])
def test_load_outside_repository_refused(client, layout, name):
    with pytest.raises(InferenceServerException) as err:
        client.load_model(name)
    assert err.value.status() in ("StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT"), err.value
    with pytest.raises(InferenceServerException) as err:
        client.unload_model(name)
    assert err.value.status() in ("StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT"), err.value
    # The folders beside the repository were never loaded.
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {m["name"] for m in index} == repository_models(layout)
    assert all(m["state"] == "READY" for m in index)
    assert not client.is_model_ready("etc") and not client.is_model_ready("escaped")
    assert (layout.parent / "etc" / "1" / "variant.json").exists()


# -- oversized messages, on a server with a small limit ----------------------------------------
def test_oversized_message(tmp_path_factory, test_split):
    with module_server(tmp_path_factory, "small", env={"QUORUM_MAX_MESSAGE_BYTES": "65536"}) as small:
        c = grpcclient.InferenceServerClient(small.address)
        try:
            rows = np.ascontiguousarray(np.resize(test_split[0], (300, 64)).astype(np.float32))  # 76.8 kB
            big = grpcclient.InferInput("pixels", list(rows.shape), "FP32")
            big.set_data_from_numpy(rows)
            with pytest.raises(InferenceServerException) as err:
                c.infer(ENSEMBLE, [big])
            assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED", err.value
            assert "65536" in err.value.message()
            ok = grpcclient.InferInput("pixels", [64, 64], "FP32")  # 16 kB fits
            ok.set_data_from_numpy(rows[:64])
            assert c.infer(ENSEMBLE, [ok]).as_numpy("class_index").shape == (64,)
        finally:
            c.close()
