"""The ensemble contract through the real server and stock clients: members aligned by
label name, members that cannot vote together refused (naming them and what they have),
an ensemble that stands on its own when any one member is unloaded, and a new member
version that would break an ensemble refused while the serving one stays."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
    prediction_service_pb2_grpc)
from tritonclient.utils import InferenceServerException

from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from tests.e2e.contract_models import narrow_member, permuted_member, relabelled_member
from tests.e2e.fixtures import as_text, module_server
from tests.helpers import copy_variant
from tests.server import EXPLICIT_CONTROL

MEMBERS = ["digits_mlp_a", "digits_cnn_a", "digits_logreg"]
ORDER = np.random.default_rng(7).permutation(10)  # class j of the permuted member = class ORDER[j]
ENSEMBLES = {
    "aligned": MEMBERS,
    "permuted": ["digits_mlp_a", "digits_cnn_a_permuted", "digits_logreg"],
    "mismatched": ["digits_mlp_a", "digits_relabelled"],
    "ghost": ["digits_mlp_a", "digits_nonexistent"],
    "narrow": ["digits_mlp_a", "digits_narrow"],
}
BROKEN = {
    "mismatched": ["member 'digits_relabelled' predicts labels that 'digits_mlp_a' does not: "
                   "['c0' at 0, 'c1' at 1, 'c2' at 2, 'c3' at 3, 'c4' at 4, 'c5' at 5, 'c6' at 6, 'c7' at 7, "
                   "'c8' at 8, 'c9' at 9] and lacks labels that 'digits_mlp_a' predicts: "
                   "['0' at 0, '1' at 1, '2' at 2, '3' at 3, '4' at 4, '5' at 5, '6' at 6, '7' at 7, '8' at 8, '9' at 9]"],
    "narrow": ["member 'digits_narrow' takes input float32 [32] per row but 'digits_mlp_a' takes float32 [64]"],
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, grpc_engine):
    """A fresh repository per engine: a test below publishes a breaking member version."""
    root = tmp_path_factory.mktemp("contract-repo")
    for name in MEMBERS:
        copy_variant(name, root)
    permuted_member("digits_cnn_a", root, "digits_cnn_a_permuted", ORDER)
    relabelled_member("digits_logreg", root, "digits_relabelled", [f"c{i}" for i in range(10)])
    narrow_member("digits_logreg", root, "digits_narrow")
    for name, members in ENSEMBLES.items():
        (root / name).mkdir()
        (root / name / "ensemble.yaml").write_text(f"members: [{', '.join(members)}]\npolicy: confidence\n")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, repo, grpc_engine):
    # Broken ensembles are in this repository on purpose: wait for the good ones, not for
    # overall readiness (which, by default, one bad model does not decide either way here).
    with module_server(tmp_path_factory, "contract", repository=repo, wait=False,
                       args=EXPLICIT_CONTROL) as s:
        wait_ready(s, ["aligned", "permuted"])
        yield s


def wait_ready(server, models: list[str], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    client = grpcclient.InferenceServerClient(server.address)
    try:
        while time.monotonic() < end:
            assert server.process.poll() is None, server.output()[-4000:]
            try:
                if all(client.is_model_ready(m) for m in models):
                    return
            except InferenceServerException:
                pass
            time.sleep(0.2)
    finally:
        client.close()
    raise TimeoutError(f"{models} not ready after {timeout}s:\n{server.output()[-4000:]}")


@pytest.fixture(scope="module")
def quorum(channel):
    return pb_grpc.EnsembleServiceStub(channel)


def _infer(client, model: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
    outputs = {}
    for start in range(0, len(pixels), 60):  # within the members' max batch size
        tensor = grpcclient.InferInput("pixels", [len(pixels[start:start + 60]), 64], "FP32")
        tensor.set_data_from_numpy(pixels[start:start + 60])
        result = client.infer(model, [tensor])
        for name in ("probabilities", "class_index", "label"):
            outputs.setdefault(name, []).append(result.as_numpy(name))
    return {k: np.concatenate(v) for k, v in outputs.items()}


def test_members_with_permuted_labels_answer_as_accurately_as_aligned_ones(client, quorum, test_split):
    x, y = test_split
    aligned, permuted = _infer(client, "aligned", x), _infer(client, "permuted", x)
    alone = _infer(client, "digits_cnn_a_permuted", x)
    # the permuted member on its own speaks its own class order, with the right names
    assert (alone["class_index"] != _infer(client, "digits_cnn_a", x)["class_index"]).any()
    assert (np.asarray(as_text(alone["label"])) == y.astype(str)).mean() > 0.95
    accuracy = {k: (np.asarray(as_text(v["label"])) == y.astype(str)).mean() for k, v in
                (("aligned", aligned), ("permuted", permuted))}
    assert accuracy["permuted"] == accuracy["aligned"] > 0.95, accuracy
    np.testing.assert_array_equal(permuted["class_index"], aligned["class_index"])
    np.testing.assert_allclose(permuted["probabilities"], aligned["probabilities"], atol=1e-6)
    # each member's reported vote is in the ensemble's class order too
    request = pb.PredictRequest(model="permuted", inputs=pb.Tensor(dtype="FP32", shape=[32, 64],
                                content=x[:32].tobytes()), return_member_votes=True)
    response = quorum.Predict(request, timeout=30)
    member_alone = as_text(alone["label"][:32])
    for row, prediction in enumerate(response.predictions):
        [vote] = [v for v in prediction.member_votes if v.member == "digits_cnn_a_permuted"]
        assert vote.label == member_alone[row] == str(vote.class_index)  # ensemble order: "0".."9"


def _index(client) -> dict[str, dict]:
    return {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}


@pytest.mark.parametrize("ensemble", sorted(BROKEN))
def test_ensemble_whose_members_cannot_vote_together_is_refused_naming_them(client, channel, quorum, server,
                                                                          ensemble, test_split):
    expected = BROKEN[ensemble]
    entry = _index(client)[ensemble]
    assert entry["state"] == "UNAVAILABLE" and all(e in entry["reason"] for e in expected), entry
    assert not client.is_model_ready(ensemble)
    tensor = grpcclient.InferInput("pixels", [1, 64], "FP32")
    tensor.set_data_from_numpy(test_split[0][:1])
    with pytest.raises(InferenceServerException) as err:
        client.infer(ensemble, [tensor])
    assert err.value.status() == "StatusCode.UNAVAILABLE" and all(e in err.value.message() for e in expected)
    spec = get_model_status_pb2.GetModelStatusRequest()
    spec.model_spec.name = ensemble
    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(spec, timeout=10)
    assert all(e in status.model_version_status[0].status.error_message for e in expected)
    [model] = quorum.GetStatus(pb.GetStatusRequest(model=ensemble), timeout=10).models
    assert model.versions[0].state == pb.VERSION_STATE_FAILED
    assert all(e in model.versions[0].reason for e in expected)
    time.sleep(1.5)  # three polls of the repository: the failure is still reported once
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert f'quorum_model_load_failures_total{{model="{ensemble}"}} 1.0' in metrics
    assert server.output().count(f"ensemble {ensemble} FAILED to load: ") == 1


def test_an_ensemble_below_its_quorum_for_a_member_not_in_the_repository_names_it(client, channel, quorum,
                                                                                  server, test_split):
    """A member that is not there is missing, not a broken contract: 'ghost' serves 1 of its 2
    members, fewer than its majority quorum, and says which member is missing and why."""
    expected = "1 of its 2 members serve, fewer than its quorum 2; member 'digits_nonexistent': it is not in the repository"
    entry = _index(client)["ghost"]
    assert entry["state"] == "UNAVAILABLE" and expected in entry["reason"], entry
    tensor = grpcclient.InferInput("pixels", [1, 64], "FP32")
    tensor.set_data_from_numpy(test_split[0][:1])
    with pytest.raises(InferenceServerException) as err:
        client.infer("ghost", [tensor])
    assert err.value.status() == "StatusCode.UNAVAILABLE" and expected in err.value.message()
    [model] = quorum.GetStatus(pb.GetStatusRequest(model="ghost"), timeout=10).models
    assert model.versions[0].state == pb.VERSION_STATE_FAILED and expected in model.versions[0].reason
    assert list(model.members_missing) == ["digits_nonexistent"]
    assert "ensemble ghost FAILED to load" not in server.output()


def _metadata(client, channel, ensemble: str):
    v2 = client.get_model_metadata(ensemble, as_json=True)
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = ensemble
    tf = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=10)
    return v2, tf.SerializeToString(deterministic=True)


@pytest.mark.parametrize("member", MEMBERS)  # the first, and each of the others
def test_with_any_one_member_unloaded_the_ensemble_answers_on_every_protocol(client, channel, quorum, member,
                                                                           test_split):
    x = test_split[0][:8]
    before = _metadata(client, channel, "aligned")
    client.unload_model(member)
    try:
        assert not client.is_model_ready(member)
        assert client.is_model_ready("aligned")  # 2 of 3 members: its majority quorum
        # once the background re-selection drops it, it is still reported left out on
        # every protocol, with a deadline or without one
        _wait_selection_without(quorum, "aligned", member)
        assert _metadata(client, channel, "aligned") == before
        tensor = grpcclient.InferInput("pixels", [8, 64], "FP32")
        tensor.set_data_from_numpy(x)
        v2 = client.infer("aligned", [tensor])
        assert v2.as_numpy("probabilities").shape == (8, 10)
        assert member in v2.get_response().parameters["members_left_out"].string_param
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "aligned"
        request.inputs["pixels"].CopyFrom(_tensor_proto(x))
        tf = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
        assert list(tf.outputs["label"].string_val) == [s.encode() for s in as_text(v2.as_numpy("label"))]
        response = quorum.Predict(pb.PredictRequest(model="aligned", inputs=pb.Tensor(
            dtype="FP32", shape=[8, 64], content=x.tobytes())), timeout=30)
        assert member in response.members_left_out and len(response.predictions) == 8
        [status] = quorum.GetStatus(pb.GetStatusRequest(model="aligned"), timeout=10).models
        assert (status.quorum, status.serving_members) == (2, 2)
        assert status.versions[0].state == pb.VERSION_STATE_READY
        assert status.degraded and list(status.members_missing) == [member]  # reported as degraded
        assert status.versions[0].reason == f"degraded: answering without member '{member}' (it was unloaded)"
        _wait_health(channel, "aligned/complete", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert _health(channel, "aligned") == health_pb2.HealthCheckResponse.SERVING
    finally:
        client.load_model(member)
    assert client.is_model_ready(member)
    _wait_health(channel, "aligned/complete", health_pb2.HealthCheckResponse.SERVING)  # whole again
    [status] = quorum.GetStatus(pb.GetStatusRequest(model="aligned"), timeout=10).models
    assert not status.degraded and list(status.members_missing) == []


def _health(channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _wait_health(channel, service: str, status: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if _health(channel, service) == status:
            return
        time.sleep(0.1)
    raise TimeoutError(f"health of {service!r} not {status} after {timeout}s")


def _wait_selection_without(quorum, ensemble: str, member: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        [status] = quorum.GetStatus(pb.GetStatusRequest(model=ensemble), timeout=10).models
        if status.objective.selected_members and member not in status.objective.selected_members:
            return
        time.sleep(0.1)
    raise TimeoutError(f"'{ensemble}' still selects '{member}' {timeout}s after it unloaded: {status}")


def _tensor_proto(x: np.ndarray):
    import tensorflow as tf

    return tf.make_tensor_proto(x)


def test_below_its_quorum_the_ensemble_is_not_ready_and_says_so(client, channel, test_split):
    client.unload_model("digits_mlp_a")
    client.unload_model("digits_logreg")
    try:
        assert not client.is_model_ready("aligned")
        with pytest.raises(InferenceServerException) as err:
            client.get_model_metadata("aligned")
        assert err.value.status() == "StatusCode.UNAVAILABLE"
        assert "1 of its 3 members serve, fewer than its quorum 2" in err.value.message()
    finally:
        client.load_model("digits_mlp_a")
        client.load_model("digits_logreg")
    assert client.is_model_ready("aligned")


def test_new_member_version_that_breaks_the_contract_is_refused_and_the_old_one_serves(client, repo, test_split):
    before = _infer(client, "aligned", test_split[0][:16])
    staged = relabelled_member("digits_logreg", repo / ".staging", "digits_logreg", [f"c{i}" for i in range(10)])
    manifest = json.loads((staged / "variant.json").read_text())
    manifest["version"] = 2
    (staged / "variant.json").write_text(json.dumps(manifest))
    staged.rename(repo / "digits_logreg" / "2")
    try:
        client.load_model("digits_logreg")  # (re)load it as the repository now has it: v1 serves on
        [entry] = [m for m in client.get_model_repository_index(as_json=True)["models"]
                   if m["name"] == "digits_logreg" and m.get("version") == "2"]
        assert entry["state"] == "UNAVAILABLE" and "refused: it would break ensemble '" in entry["reason"], entry
        assert "member 'digits_logreg' predicts labels that 'digits_mlp_a' does not: ['c0' at 0, 'c1' at 1" \
            in entry["reason"]
        assert client.is_model_ready("digits_logreg", "1") and client.is_model_ready("aligned")
        after = _infer(client, "aligned", test_split[0][:16])
        np.testing.assert_array_equal(after["class_index"], before["class_index"])
    finally:  # the module's other tests, in whatever order, find the repository as it was
        shutil.rmtree(repo / "digits_logreg" / "2")
        client.load_model("digits_logreg")
    assert client.is_model_ready("digits_logreg")
