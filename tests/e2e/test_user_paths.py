"""Paths a user takes that no other module walks end to end, on a real server with stock
clients: per-request objectives (min_accuracy, latency_budget_ms) and the bundled
`digits_slo`, a v2 request id labelled through quorum.v1 Feedback, unloading and
reloading an ensemble, a full queue answered RESOURCE_EXHAUSTED while the server goes on,
requests larger than a batch answered as their chunks would be (up to max_request_rows),
per-variant placement from QUORUM_DEVICE_OVERRIDES, `--batch-invariance strict`, and an
edited ensemble.yaml picked up by the poller (its new objective reported at once)."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from service.runtimes.devices import gpu_count
from tests.e2e.fixtures import module_server
from tests.helpers import MODELS, copy_variant
from tests.server import EXPLICIT_CONTROL, running_server

QUEUE_MODEL = "digits_cnn_one_slot"  # a member copy whose queue holds one request
PLACED_MODEL = "digits_logreg_on_gpu"  # QUORUM_DEVICE_OVERRIDES asks a GPU for it
MAX_ROWS = 2000  # QUORUM_MAX_REQUEST_ROWS of the module's server


@pytest.fixture(scope="module")
def repo(tmp_path_factory, grpc_engine):
    root = tmp_path_factory.mktemp("user-paths-repo")
    shutil.copytree(MODELS, root, dirs_exist_ok=True)
    copy_variant("digits_cnn_a", root, as_name=QUEUE_MODEL)
    (root / QUEUE_MODEL / "model.yaml").write_text("batching: {max_queue_size: 1, max_batch_size: 64}\n")
    copy_variant("digits_logreg", root, as_name=PLACED_MODEL)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, repo, grpc_engine):
    with module_server(tmp_path_factory, "user-paths", repository=repo, args=EXPLICIT_CONTROL,
                       env={"QUORUM_DEVICE_OVERRIDES": json.dumps({PLACED_MODEL: "gpu"}),
                            "QUORUM_MAX_REQUEST_ROWS": str(MAX_ROWS)}) as s:
        yield s


@pytest.fixture(scope="module")
def quorum(channel):
    return pb_grpc.EnsembleServiceStub(channel)


def _predict(model: str, rows: np.ndarray, **fields) -> pb.PredictRequest:
    return pb.PredictRequest(model=model, inputs=pb.Tensor(dtype="FP32", shape=list(rows.shape),
                                                           content=np.ascontiguousarray(rows).tobytes()), **fields)


def _code(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_min_accuracy_and_latency_budget_per_request(quorum, test_split):
    x, y = test_split
    met = quorum.Predict(_predict("digits", x[:32], min_accuracy=0.9, latency_budget_ms=30_000), timeout=60)
    assert len(met.predictions) == 32
    assert np.mean([p.class_index for p in met.predictions] == y[:32]) > 0.9
    code, details = _code(lambda: quorum.Predict(_predict("digits", x[:1], min_accuracy=0.9995), timeout=30))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "min_accuracy 0.9995" in details and "exceeds the best expected accuracy" in details


def test_the_bundled_slo_ensemble_answers_and_reports_its_objective(quorum, test_split):
    x, y = test_split
    response = quorum.Predict(_predict("digits_slo", x[:16]), timeout=30)
    assert response.model == "digits_slo" and len(response.predictions) == 16
    assert np.mean([p.class_index for p in response.predictions] == y[:16]) > 0.85
    [status] = quorum.GetStatus(pb.GetStatusRequest(model="digits_slo"), timeout=10).models
    assert status.objective.objective == "accuracy"
    assert "latency_p99_ms" in {c.name for c in status.objective.constraints}
    assert set(status.objective.selected_members) <= set(status.members)


def test_a_v2_request_id_is_labelled_through_quorum_feedback(client, quorum, test_split):
    x, y = test_split
    tensor = grpcclient.InferInput("pixels", [4, 64], "FP32")
    tensor.set_data_from_numpy(x[:4])
    result = client.infer("digits", [tensor], request_id="v2-request-7")
    assert result.get_response().id == "v2-request-7"
    labels = [pb.FeedbackRequest.Label(request_id="v2-request-7", row=row, label=str(y[row])) for row in range(4)]
    reply = quorum.Feedback(pb.FeedbackRequest(labels=labels), timeout=10)
    assert reply.accepted == 4 and not reply.unknown_ids


def test_an_unloaded_ensemble_stops_answering_and_its_members_stay(client, test_split):
    tensor = grpcclient.InferInput("pixels", [2, 64], "FP32")
    tensor.set_data_from_numpy(test_split[0][:2])
    client.unload_model("digits")
    try:
        assert not client.is_model_ready("digits")
        assert all(client.is_model_ready(m) for m in ("digits_mlp_a", "digits_cnn_a", "digits_logreg"))
        with pytest.raises(InferenceServerException) as err:
            client.infer("digits", [tensor])
        assert err.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND"), err.value
        assert "digits" in err.value.message()
        assert client.is_server_ready()  # one unloaded model does not flip the server
    finally:
        client.load_model("digits")
    assert client.is_model_ready("digits")
    assert client.infer("digits", [tensor]).as_numpy("probabilities").shape == (2, 10)


def test_a_full_queue_is_resource_exhausted_and_the_server_goes_on(quorum, test_split):
    x = test_split[0][:64]

    def call(_):
        return _code(lambda: quorum.Predict(_predict(QUEUE_MODEL, x), timeout=60))

    # 64-row batches of the CNN keep it busy; a queue of one leaves most of 96 at once out
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(call, range(96)))
    kinds = {code for code, _ in codes}
    assert kinds <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in kinds and grpc.StatusCode.OK in kinds
    refused = [details for code, details in codes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert all("queue full" in d and QUEUE_MODEL in d for d in refused), refused[:3]
    assert call(0) == (grpc.StatusCode.OK, "")  # once the burst is over, it serves again


def test_device_overrides_place_one_variant(client):
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    config = client.get_model_config("digits_logreg", as_json=True)["config"]
    assert config["instance_group"][0]["kind"] == "KIND_CPU"  # the server's --device cpu
    if gpu_count() == 0:
        entry = index[PLACED_MODEL]
        assert entry["state"] == "UNAVAILABLE" and "no GPU is visible" in entry["reason"], entry
        assert client.is_server_ready()  # reported, and the server serves the rest
    else:
        placed = client.get_model_config(PLACED_MODEL, as_json=True)["config"]
        assert placed["instance_group"][0]["kind"] == "KIND_GPU"


def _v2(client, model: str, x: np.ndarray) -> dict[str, np.ndarray]:
    tensor = grpcclient.InferInput("pixels", list(x.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(x))
    result = client.infer(model, [tensor])
    return {name: result.as_numpy(name) for name in ("probabilities", "class_index")}


def _in_chunks(client, model: str, x: np.ndarray, size: int = 64) -> dict[str, np.ndarray]:
    parts = [_v2(client, model, x[i:i + size]) for i in range(0, len(x), size)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


@pytest.mark.parametrize("model", ["digits", "digits_mlp_a"])
def test_a_request_of_1000_rows_is_answered_as_its_chunks_would_be(client, channel, model, test_split):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    x = np.resize(test_split[0], (1000, 64)).astype(np.float32)  # 16 batches' worth, in one request
    chunks = _in_chunks(client, model, x)
    whole = _v2(client, model, x)
    np.testing.assert_array_equal(whole["class_index"], chunks["class_index"])
    np.testing.assert_allclose(whole["probabilities"], chunks["probabilities"], atol=1e-6)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(x))
    tf_answer = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    np.testing.assert_array_equal(tf.make_ndarray(tf_answer.outputs["class_index"]), chunks["class_index"])
    np.testing.assert_allclose(tf.make_ndarray(tf_answer.outputs["probabilities"]), chunks["probabilities"],
                               atol=1e-6)
    with pytest.raises(InferenceServerException) as err:
        _v2(client, model, np.resize(x, (MAX_ROWS + 1, 64)))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"{MAX_ROWS + 1} rows" in err.value.message() and f"max_request_rows {MAX_ROWS}" in err.value.message()


def _rows_alone_and_together(client: grpcclient.InferenceServerClient, x: np.ndarray) -> tuple:
    alone = []
    for row in range(len(x)):
        tensor = grpcclient.InferInput("pixels", [1, 64], "FP32")
        tensor.set_data_from_numpy(x[row:row + 1])
        alone.append(client.infer("digits", [tensor]).as_numpy("probabilities")[0])
    tensor = grpcclient.InferInput("pixels", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return np.stack(alone), client.infer("digits", [tensor]).as_numpy("probabilities")


def test_strict_batch_invariance_gives_bitwise_the_same_answer_alone_or_batched(tmp_path, test_split):
    x = np.ascontiguousarray(test_split[0][:17])
    with running_server(tmp_path, args=["--batch-invariance", "strict"]) as server:
        client = grpcclient.InferenceServerClient(server.address)
        try:
            alone, together = _rows_alone_and_together(client, x)
            large = np.resize(x, (1000, 64))
            whole, chunks = _v2(client, "digits", large), _in_chunks(client, "digits", large, size=50)
        finally:
            client.close()
    np.testing.assert_array_equal(alone, together)  # bitwise, not within a tolerance
    np.testing.assert_array_equal(whole["probabilities"], chunks["probabilities"])  # split inside, or by the client


def test_an_edited_objective_is_reported_at_once_not_at_the_next_evaluation(tmp_path, test_split):
    """GetStatus never shows a placeholder: an objective just edited (so not yet evaluated,
    with the background evaluation an hour away) is evaluated when asked about."""
    repo = tmp_path / "repo"
    for name in ("digits_mlp_a", "digits_cnn_a", "digits_logreg"):
        copy_variant(name, repo)
    (repo / "trio").mkdir()
    config = repo / "trio" / "ensemble.yaml"
    members = "members: [digits_mlp_a, digits_cnn_a, digits_logreg]\npolicy: confidence\n"
    config.write_text(members + "objective: {optimize: accuracy, latency_p99_ms: 20}\n")
    with running_server(tmp_path, repository=repo, args=["--model-control", "poll"],
                        env={"QUORUM_OBJECTIVE_INTERVAL": "3600"}) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EnsembleServiceStub(channel)
        assert len(stub.Predict(_predict("trio", test_split[0][:4]), timeout=30).predictions) == 4
        staged = repo / ".ensemble.yaml.new"
        staged.write_text(members + "objective: {optimize: accuracy, latency_p99_ms: 35}\n")
        staged.rename(config)
        end = time.monotonic() + 60
        while True:
            [status] = stub.GetStatus(pb.GetStatusRequest(model="trio"), timeout=10).models
            thresholds = {c.name: c.threshold for c in status.objective.constraints}
            if thresholds.get("latency_p99_ms") == 35:
                break
            assert time.monotonic() < end, f"constraints {thresholds}:\n{server.output()[-3000:]}"
            time.sleep(0.2)
        assert set(status.objective.selected_members) <= set(status.members)
        assert status.objective.reason and status.objective.reason != "not evaluated yet"


def test_an_edited_ensemble_yaml_is_picked_up_by_the_poller(tmp_path, test_split):
    repo = tmp_path / "repo"
    for name in ("digits_mlp_a", "digits_cnn_a", "digits_logreg"):
        copy_variant(name, repo)
    (repo / "trio").mkdir()
    config = repo / "trio" / "ensemble.yaml"
    config.write_text("members: [digits_mlp_a, digits_cnn_a, digits_logreg]\npolicy: confidence\n")
    x = test_split[0][:4]
    with running_server(tmp_path, repository=repo, args=["--model-control", "poll"]) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EnsembleServiceStub(channel)
        assert stub.Predict(_predict("trio", x), timeout=30).policy == pb.VOTING_POLICY_CONFIDENCE
        staged = repo / ".ensemble.yaml.new"  # written aside, then renamed: the poller never sees half a file
        staged.write_text("members: [digits_mlp_a, digits_cnn_a, digits_logreg]\npolicy: majority\n")
        staged.rename(config)
        end = time.monotonic() + 60
        while True:
            [status] = stub.GetStatus(pb.GetStatusRequest(model="trio"), timeout=10).models
            if status.policy == pb.VOTING_POLICY_MAJORITY:
                break
            assert time.monotonic() < end, f"the new ensemble.yaml was not picked up:\n{server.output()[-3000:]}"
            time.sleep(0.2)
        response = stub.Predict(_predict("trio", x), timeout=30)
        assert response.policy == pb.VOTING_POLICY_MAJORITY and len(response.predictions) == 4
