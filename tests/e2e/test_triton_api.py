"""The KServe v2 / Open Inference Protocol, spoken by tritonclient.grpc, against a real server."""

from __future__ import annotations

import queue
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from tests.e2e.fixtures import ENSEMBLE, MEMBER, Reference, as_text, repository_models, vote_temperatures
from tests.server import EXPLICIT_CONTROL

SERVER_ARGS = EXPLICIT_CONTROL  # the unload/load test below

UNLOADED = "digits_logreg"  # the member the load/unload test takes away and brings back


@pytest.fixture(scope="module")
def reference(server):
    return Reference(vote_temperatures=vote_temperatures(server))


@pytest.fixture(scope="module")
def pixels(test_split):
    return test_split[0][:16]


def _input(pixels: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)  # raw binary: the client's default over gRPC
    return tensor


def _check(result, reference: Reference, model: str, pixels: np.ndarray, names=None) -> None:
    expected = reference.outputs(model, pixels)
    for name in names or expected:
        got = result.as_numpy(name)
        assert got is not None, name
        if name == "label":
            assert as_text(got) == as_text(expected[name])
        elif name == "class_index":
            np.testing.assert_array_equal(got, expected[name])
        elif name == "logits":
            np.testing.assert_allclose(got, expected[name], rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_allclose(got, expected[name], atol=1e-6, err_msg=name)


def test_server_live_and_ready(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    for model in (ENSEMBLE, MEMBER):
        assert client.is_model_ready(model)
        assert client.is_model_ready(model, "1")
    for model, version in ((MEMBER, "7"), (ENSEMBLE, "2"), ("no_such_model", "")):
        with pytest.raises(InferenceServerException) as err:  # unknown, not "not ready" (Triton's client raises)
            client.is_model_ready(model, version)
        assert err.value.status() == "StatusCode.NOT_FOUND" and f"'{model}'" in err.value.message()


def test_server_metadata(client):
    metadata = client.get_server_metadata()
    assert metadata.name == "quorum"
    assert "model_repository" in metadata.extensions and "statistics" in metadata.extensions


def test_model_metadata(client):
    ensemble = client.get_model_metadata(ENSEMBLE)
    assert ensemble.name == ENSEMBLE and list(ensemble.versions) == ["1"]
    assert [(i.name, i.datatype, list(i.shape)) for i in ensemble.inputs] == [("pixels", "FP32", [-1, 64])]
    outputs = {o.name: (o.datatype, list(o.shape)) for o in ensemble.outputs}
    assert outputs == {"probabilities": ("FP32", [-1, 10]), "label": ("BYTES", [-1]),
                       "class_index": ("INT64", [-1]), "confidence": ("FP32", [-1]),
                       "agreement": ("FP32", [-1])}
    member = client.get_model_metadata(MEMBER, as_json=True)
    assert member["platform"] == "onnxruntime_onnx"
    assert {o["name"] for o in member["outputs"]} == {
        "probabilities", "label", "class_index", "confidence", "logits"}


def _all_voted(result, server) -> None:
    """Every member voted (else the server's log says why one was left out)."""
    left_out = result.get_response().parameters.get("members_left_out")
    assert left_out is None, f"left out: {left_out.string_param}\n{server.output()[-4000:]}"


def test_infer_ensemble_raw(client, server, reference, pixels):
    result = client.infer(ENSEMBLE, [_input(pixels)], request_id="req-ensemble-1")
    _all_voted(result, server)
    assert result.get_response().id == "req-ensemble-1"
    assert result.get_response().model_name == ENSEMBLE
    # The answer came back as raw bytes, as tritonclient asks by default.
    assert len(result.get_response().raw_output_contents) == 5
    _check(result, reference, ENSEMBLE, pixels)


def test_infer_member_requested_outputs(client, reference, pixels):
    outputs = [grpcclient.InferRequestedOutput("probabilities"), grpcclient.InferRequestedOutput("label")]
    result = client.infer(MEMBER, [_input(pixels)], model_version="1", outputs=outputs, request_id="m-7")
    response = result.get_response()
    assert response.id == "m-7" and response.model_version == "1"
    assert [o.name for o in response.outputs] == ["probabilities", "label"]
    assert result.as_numpy("logits") is None
    _check(result, reference, MEMBER, pixels, ["probabilities", "label"])


def test_repository_index(client):
    index = client.get_model_repository_index(as_json=True)["models"]
    by_name = {m["name"]: m for m in index}
    assert set(by_name) == repository_models() >= {ENSEMBLE, MEMBER, UNLOADED}
    assert all(m["state"] == "READY" for m in index), index
    assert all(m["version"] == "1" for m in index)


def test_unload_then_load_member(client, server, reference, pixels):
    try:
        client.unload_model(UNLOADED)
        assert not client.is_model_ready(UNLOADED)
        with pytest.raises(InferenceServerException) as err:
            client.infer(UNLOADED, [_input(pixels)])
        assert err.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND")
        assert UNLOADED in err.value.message()
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index[UNLOADED]["state"] != "READY"
        # one of five members is missing: the quorum (a majority, 3) still serves
        assert client.is_model_ready(ENSEMBLE)
        result = client.infer(ENSEMBLE, [_input(pixels)])
        assert UNLOADED in result.get_response().parameters["members_left_out"].string_param
        _wait_selection_without(server, UNLOADED)  # the background re-selection saw it go
    finally:
        client.load_model(UNLOADED)
    assert client.is_model_ready(UNLOADED)
    _check(client.infer(UNLOADED, [_input(pixels)]), reference, UNLOADED, pixels)
    assert client.is_model_ready(ENSEMBLE)
    # At once, before the next re-selection: the member that came back votes again, with or
    # without a deadline (pygrpc-native reports "no deadline" as 9.2e18 s remaining).
    for timeout in (None, 30):
        result = client.infer(ENSEMBLE, [_input(pixels)], client_timeout=timeout)
        _all_voted(result, server)
        _check(result, reference, ENSEMBLE, pixels)


def _wait_selection_without(server, member: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EnsembleServiceStub(channel)
        while True:
            [status] = stub.GetStatus(pb.GetStatusRequest(model=ENSEMBLE), timeout=10).models
            selected = status.objective.selected_members
            if selected and member not in selected:
                return
            assert time.monotonic() < end, f"'{ENSEMBLE}' still selects '{member}' {timeout} s after it unloaded"
            time.sleep(0.05)


def _stats(client, model):
    [entry] = client.get_inference_statistics(model, as_json=True)["model_stats"]
    stats = entry["inference_stats"]
    return int(entry.get("inference_count", 0)), int(stats.get("success", {}).get("count", 0))


def test_every_ready_model_is_in_the_statistics_before_its_first_request(client):
    ready = {m["name"] for m in client.get_model_repository_index(as_json=True)["models"] if m.get("state") == "READY"}
    listed = {s["name"] for s in client.get_inference_statistics(as_json=True)["model_stats"]}
    assert ready and ready <= listed, ready - listed


@pytest.mark.parametrize("model", [MEMBER, ENSEMBLE])
def test_inference_statistics_grow(client, pixels, model):
    before_rows, before_ok = _stats(client, model)
    for _ in range(3):
        client.infer(model, [_input(pixels[:4])])
    after_rows, after_ok = _stats(client, model)
    assert after_ok == before_ok + 3
    assert after_rows == before_rows + 12


def test_stream_many_requests_one_bad(client, reference, pixels):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        sent = []
        for i in range(6):
            model = ENSEMBLE if i % 2 == 0 else MEMBER
            rows = pixels[i:i + 1 + i % 3]
            if i == 3:  # wrong dtype in the middle of the stream
                bad = grpcclient.InferInput("pixels", list(rows.shape), "FP64")
                bad.set_data_from_numpy(rows.astype(np.float64))
                client.async_stream_infer(model, [bad], request_id=f"s{i}")
            else:
                client.async_stream_infer(model, [_input(rows)], request_id=f"s{i}")
            sent.append((f"s{i}", model, rows))
        got = [answers.get(timeout=30) for _ in sent]
    finally:
        client.stop_stream()
    for (request_id, model, rows), (result, error) in zip(sent, got):
        if request_id == "s3":
            assert result is None and error is not None
            assert "FP64" in error.message() or "float64" in error.message()
            continue
        assert error is None, error
        assert result.get_response().id == request_id
        _check(result, reference, model, rows)
