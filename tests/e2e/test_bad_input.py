"""Bad and hostile requests get the right status code and a message naming the problem, while
another client's valid requests to the same server keep succeeding throughout this module.

Two parts, on one server per engine: cases that check the message a user reads (unknown
models, malformed tensors, the wire, the clock, the repository API), then the matrix of
hostile calls across every protocol and RPC (tests/e2e/bad_requests.py), each answered with
its status, a short message, well inside the deadline the call itself carries (a slow answer
fails the call, not a timing assertion) and without the server's memory growing by more than
a bound far below what the declared sizes would cost."""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import pytest
import tensorflow as tf
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service._proto.quorum.v1 import ensemble_pb2 as qpb
from service._proto.quorum.v1 import ensemble_pb2_grpc as qpb_grpc
from tests.e2e.bad_requests import (
    CASES, Case, code_of_call, code_of_future, infer_request, rss, tf_predict_call)
from tests.e2e.fixtures import ENSEMBLE, MEMBER, Reference, module_server, repository_models
from tests.e2e.traffic import GoodClient
from tests.helpers import copy_variant, onnx_models
from tests.server import EXPLICIT_CONTROL

BOTH_ENGINES = True  # the subject is the transport (tests/e2e/conftest.py)

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DEADLINE_S = 5.0  # each hostile call carries this deadline: a slow answer is DEADLINE_EXCEEDED
RSS_BOUND = 200 * 2**20  # bytes the server may grow by over one case (declared sizes reach TBs)


# -- the server, and a well-behaved client running beside every test ------------------------
@pytest.fixture(scope="module")
def layout(tmp_path_factory, grpc_engine):  # per engine: the load requests below change it
    """A copy of the test repository, with loadable model folders *outside* it that a
    path-traversing load request would reach: base/models (served), base/etc, base/escaped."""
    base = tmp_path_factory.mktemp("layout")
    repository = base / "models"
    shutil.copytree(onnx_models(), repository)
    copy_variant("digits_logreg", base, as_name="etc")
    copy_variant("digits_logreg", base, as_name="escaped")
    return repository


@pytest.fixture(scope="module")
def server(tmp_path_factory, layout, grpc_engine):
    with module_server(tmp_path_factory, "bad-input", repository=layout,
                       args=EXPLICIT_CONTROL) as s:  # the load requests below
        yield s


@pytest.fixture(scope="module")
def v2(channel):
    return service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def pixels(test_split):
    return np.ascontiguousarray(test_split[0][:8])


@pytest.fixture(scope="module")
def good_client(server, layout, pixels):
    expected = Reference(layout).vote(ENSEMBLE, pixels).label_index
    thread = GoodClient(server.address, pixels, expected)
    thread.start()
    yield thread
    thread.finish(min_successes=20)  # after every test of the module, in whatever order they ran


@pytest.fixture(autouse=True)
def _beside_good_client(good_client):
    """Every test here runs while the good client is sending requests."""
    assert good_client.is_alive()
    yield


# -- unknown models and versions --------------------------------------------------------------
@pytest.mark.parametrize("model, version", [("no_such_model", ""), (MEMBER, "7"), (ENSEMBLE, "2")])
def test_unknown_model_or_version_is_not_found(v2, pixels, model, version):
    code, message = code_of_call(v2.ModelInfer, infer_request(model, pixels, version=version), timeout=30)
    assert code == NOT_FOUND, message
    assert model in message and (not version or version in message)


def test_unknown_model_and_version_over_tf_serving(channel, pixels):
    code, message = code_of_call(tf_predict_call, channel, "no_such_model", tf.make_tensor_proto(pixels))
    assert code == NOT_FOUND and "no_such_model" in message
    code, message = code_of_call(tf_predict_call, channel, MEMBER, tf.make_tensor_proto(pixels), version=7)
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
    code, message = code_of_call(v2.ModelInfer, infer_request(model, pixels.astype(np.float64), datatype="FP64"),
                          timeout=30)
    assert code == INVALID, message
    assert "float32" in message and "float64" in message
    code, message = code_of_call(tf_predict_call, channel, model, tf.make_tensor_proto(pixels.astype(np.int32)))
    assert code == INVALID and "float32" in message and "int32" in message


def test_unknown_dtype_name(channel, pixels):
    stub = qpb_grpc.EnsembleServiceStub(channel)
    request = qpb.PredictRequest(model=ENSEMBLE, inputs=qpb.Tensor(dtype="FP99", shape=[8, 64],
                                                                  content=pixels.tobytes()))
    code, message = code_of_call(stub.Predict, request, timeout=30)
    assert code == INVALID and "FP99" in message


@pytest.mark.parametrize("shape", [(8, 63), (8, 8, 8), (512,), (8, 2, 32)])
def test_wrong_shape(v2, pixels, shape):
    rows = np.zeros(shape, dtype=np.float32)
    code, message = code_of_call(v2.ModelInfer, infer_request(ENSEMBLE, rows), timeout=30)
    assert code == INVALID, message
    assert "shape" in message and str(list(shape)) in message


def test_missing_input(v2, pixels):
    code, message = code_of_call(v2.ModelInfer, infer_request(ENSEMBLE, pixels, name="image"), timeout=30)
    assert code == INVALID, message
    assert "'pixels'" in message
    code, message = code_of_call(v2.ModelInfer, service_pb2.ModelInferRequest(model_name=ENSEMBLE), timeout=30)
    assert code == INVALID and "'pixels'" in message


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_rejected(v2, channel, pixels, value):
    rows = pixels.copy()
    rows[3, 17] = value
    code, message = code_of_call(v2.ModelInfer, infer_request(ENSEMBLE, rows), timeout=30)
    assert code == INVALID and "NaN or Inf" in message
    code, message = code_of_call(tf_predict_call, channel, MEMBER, tf.make_tensor_proto(rows))
    assert code == INVALID and "NaN or Inf" in message


def test_empty_batch(v2, channel):
    rows = np.zeros((0, 64), dtype=np.float32)
    code, message = code_of_call(v2.ModelInfer, infer_request(ENSEMBLE, rows), timeout=30)
    assert code == INVALID and "empty batch" in message
    code, message = code_of_call(tf_predict_call, channel, MEMBER, tf.make_tensor_proto(rows))
    assert code == INVALID and "empty batch" in message


@pytest.mark.parametrize("model", [ENSEMBLE, MEMBER])
def test_more_rows_than_max_request_rows(v2, model):
    # declared, not sent: refused from the declared shape, before any allocation
    request = infer_request(model, np.zeros((1, 64), np.float32), shape=[65537, 64])
    code, message = code_of_call(v2.ModelInfer, request, timeout=60)
    assert code == INVALID, message
    assert "65537 rows" in message and "max_request_rows 65536" in message


@pytest.mark.parametrize("extra", [-4, 4, -256])
def test_raw_contents_length_mismatch(v2, channel, pixels, extra):
    raw = pixels.tobytes()
    raw = raw[:extra] if extra < 0 else raw + b"\0" * extra
    code, message = code_of_call(v2.ModelInfer, infer_request(ENSEMBLE, pixels, raw=raw), timeout=30)
    assert code == INVALID, message
    assert f"{len(raw)} bytes" in message and "2048" in message
    stub = qpb_grpc.EnsembleServiceStub(channel)
    request = qpb.PredictRequest(model=ENSEMBLE, inputs=qpb.Tensor(dtype="FP32", shape=[8, 64], content=raw))
    code, message = code_of_call(stub.Predict, request, timeout=30)
    assert code == INVALID and f"{len(raw)} bytes" in message


def test_raw_and_typed_contents_together(v2, pixels):
    request = infer_request(ENSEMBLE, pixels)
    request.inputs[0].contents.fp32_contents.extend(pixels.ravel().tolist())
    code, message = code_of_call(v2.ModelInfer, request, timeout=30)
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
    assert v2.ModelInfer(infer_request(ENSEMBLE, pixels), timeout=30).outputs


def test_garbage_bytes_in_a_stream(server, channel, pixels):
    good = infer_request(ENSEMBLE, pixels).SerializeToString()
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


@pytest.mark.parametrize("timeout", [1e-5, 1e-6])
def test_expired_deadline(v2, pixels, timeout):
    """A deadline too short to be met is never answered OK nor an error of ours: DEADLINE_EXCEEDED,
    or, while the good client keeps the server busy, admission's RESOURCE_EXHAUSTED for the work
    ahead (gRPC carries 1 us as about 1 ms; with a few ms of calls in flight admission refuses
    it first, as documented in service/api/admission.py). Which of the two such a
    call deserves is the priorities issue's (DEADLINE_EXCEEDED for a call refused for its deadline)."""
    code, message = code_of_call(v2.ModelInfer, infer_request(ENSEMBLE, pixels), timeout=timeout)
    assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED), (code, message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert "overloaded" in message and "deadline leaves" in message, message


def test_latency_budget_zero(channel, pixels):
    """A zero latency budget leaves no member time to answer: an error, never a vote of nobody."""
    stub = qpb_grpc.EnsembleServiceStub(channel)
    request = qpb.PredictRequest(model=ENSEMBLE, inputs=qpb.Tensor(dtype="FP32", shape=[8, 64],
                                                                  content=pixels.tobytes()),
                                 latency_budget_ms=0.0)
    code, message = code_of_call(stub.Predict, request, timeout=30)
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
    for outside in ("etc", "escaped"):  # not models of this server: NOT_FOUND
        with pytest.raises(InferenceServerException) as err:
            client.is_model_ready(outside)
        assert err.value.status() == "StatusCode.NOT_FOUND", err.value
    assert (layout.parent / "etc" / "1" / "variant.json").exists()


# -- the hostile matrix: every protocol and RPC ----------------------------------------------


def test_matrix_is_large():
    assert len({c.id for c in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_call(server, channel, good_client, case: Case):
    assert good_client.is_alive()
    call = case.call(channel)
    request = case.request()
    before = rss(server)
    code, details = code_of_call(call, request, timeout=DEADLINE_S)
    grown = rss(server) - before
    assert code == case.code, f"{case.id}: {code.name}: {details[:300]}"
    assert len(details) <= 1200, f"{case.id}: a {len(details)}-character message"
    assert "x" * 100 not in details  # a 1 MB name is never echoed back whole
    assert grown < RSS_BOUND, f"{case.id}: server grew by {grown / 2**20:.0f} MB"
    assert server.health() == health_pb2.HealthCheckResponse.SERVING


def test_many_unknown_methods_leave_nothing_behind(server, channel, good_client):
    """20,000 distinct unknown method names: each UNIMPLEMENTED, and the server keeps no
    record of them (it grew by tens of MB per 20,000 when it cached every name)."""
    before = rss(server)
    futures = []
    for i in range(20_000):
        futures.append(channel.unary_unary(f"/quorum.v1.EnsembleService/NoSuch{i:05d}{'y' * 200}",
                                           request_serializer=None, response_deserializer=None).future(
            b"", timeout=60))
        if len(futures) == 500:
            codes = {code_of_future(f) for f in futures}
            assert codes == {grpc.StatusCode.UNIMPLEMENTED}, codes
            futures = []
    grown = rss(server) - before
    assert grown < 40 * 2**20, f"server grew by {grown / 2**20:.0f} MB"

