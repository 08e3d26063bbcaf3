"""Members anywhere (issue 39): an ensemble on server C whose members are served by servers A and
B, all real servers on loopback, called with stock clients (tritonclient, TF Serving's stubs) and
quorum.v1. C asks each remote member once per batch over KServe v2 gRPC, with the batch's
deadline, and votes as it votes with local members: bitwise the same answers, the same straggler
cutoff, quorum and members-left-out, and a new version on A picked up and recalibrated."""

from __future__ import annotations

import json
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2
from tritonclient.utils import InferenceServerException

from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from tests.e2e.fixtures import module_server, vote_temperatures
from tests.e2e.remote_servers import STRICT, DelayProxy, infer, left_out, remote, repository, server_on
from tests.e2e.traffic import GoodClient
from tests.helpers import copy_variant, free_port, onnx_models, wait_until
from tests.server import EXPLICIT_CONTROL
from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
MEMBERS = ("digits_mlp_a", "digits_cnn_a", "digits_logreg")  # the bundled ONNX members, as onnx_models() orders them
POLICY = "stacked"  # the bundled digits ensemble's: its member weights are fitted when it loads


@pytest.fixture(scope="module")
def a(tmp_path_factory, grpc_engine):
    """Server A: digits_logreg, and a copy of it that C reaches through a delaying proxy."""
    repo = repository(tmp_path_factory.mktemp("repo-a") / "models",
                      {"digits_logreg": "digits_logreg", "digits_logreg_far": "digits_logreg"})
    with module_server(tmp_path_factory, "server-a", repository=repo, args=STRICT) as server:
        yield server


@pytest.fixture(scope="module")
def b(tmp_path_factory, grpc_engine):
    """Server B: digits_mlp_a and digits_cnn_a."""
    repo = repository(tmp_path_factory.mktemp("repo-b") / "models",
                      {"digits_mlp_a": "digits_mlp_a", "digits_cnn_a": "digits_cnn_a"})
    with module_server(tmp_path_factory, "server-b", repository=repo, args=STRICT) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(a):
    p = DelayProxy(a.grpc_port)
    yield p
    p.close()


def _trio(a_endpoint: str, b_endpoint: str, **config) -> dict:
    where = {"digits_mlp_a": b_endpoint, "digits_cnn_a": b_endpoint, "digits_logreg": a_endpoint}
    return {"members": [remote(m, where[m]) for m in MEMBERS], "policy": POLICY, **config}


@pytest.fixture(scope="module")
def c(tmp_path_factory, grpc_engine, a, b, proxy):
    """Server C: `digits` over A's and B's members; `slow`, whose third member is behind the proxy."""
    slow = {"members": [remote("digits_mlp_a", b.address), remote("digits_cnn_a", b.address),
                        remote("digits_logreg_far", proxy.endpoint, timeout_s=30)], "policy": POLICY,
            "deadline_margin_ms": 250}  # the vote and the reply, on a busy 2-core host, after the cutoff
    repo = repository(tmp_path_factory.mktemp("repo-c") / "models",
                      ensembles={"digits": _trio(a.address, b.address), "slow": slow})
    with module_server(tmp_path_factory, "server-c", repository=repo, args=STRICT) as server:
        yield server


@pytest.fixture(scope="module")
def local(tmp_path_factory, grpc_engine):
    """The same ensemble served locally: the bundled repository's ONNX members and its digits."""
    with module_server(tmp_path_factory, "server-local", repository=onnx_models(), args=STRICT) as server:
        yield server


def test_remote_members_answer_the_test_split_bitwise_as_local_ones(c, local, test_split):
    pixels = test_split[0].astype(np.float32)
    with grpcclient.InferenceServerClient(c.address) as far, grpcclient.InferenceServerClient(local.address) as near:
        assert far.get_model_metadata("digits").inputs[0].name == near.get_model_metadata("digits").inputs[0].name
        for rows in (pixels, pixels[:1], pixels[17:80]):  # the whole split in one request, one row, a batch
            got, want = infer(far, "digits", rows), infer(near, "digits", rows)
            assert left_out(got) == ""
            for output in ("probabilities", "class_index", "confidence", "agreement", "label"):
                assert np.array_equal(got.as_numpy(output), want.as_numpy(output)), output
        # conformal sets from the remote members' validation replay, as from the local ones'
        got, want = (infer(client, "digits", pixels, parameters={"coverage": 0.9}) for client in (far, near))
        for output in ("prediction_set", "set_size"):
            assert np.array_equal(got.as_numpy(output), want.as_numpy(output)), output
    # drift: the same rows seen against the same references (the members' manifests, fetched from A and B)
    assert _metric(c, 'quorum_drift_window_fill{model="digits"}') == _metric(local, 'quorum_drift_window_fill{model="digits"}') > 0
    assert vote_temperatures(c)[("digits", POLICY)] == vote_temperatures(local)[("digits", POLICY)]
    with grpc.insecure_channel(c.address) as channel:
        response = pb_grpc.EnsembleServiceStub(channel).Predict(pb.PredictRequest(model="digits", return_member_votes=True, inputs=pb.Tensor(
            dtype="FP32", shape=[2, 64], content=pixels[:2].tobytes())), timeout=30)
    assert [(v.member, v.version, v.in_time) for v in response.predictions[0].member_votes] == [
        (m, 1, True) for m in MEMBERS]


def test_a_slowed_remote_member_is_left_out_at_the_straggler_cutoff(c, proxy, test_split):
    pixels = test_split[0][:4].astype(np.float32)
    with grpc.insecure_channel(c.address) as channel:
        stub = pb_grpc.EnsembleServiceStub(channel)
        request = pb.PredictRequest(model="slow", return_member_votes=True, inputs=pb.Tensor(dtype="FP32", shape=[4, 64],
                                                                  content=pixels.tobytes()))
        whole = stub.Predict(request, timeout=30)
        assert list(whole.members_left_out) == []
        proxy.delay = 4.0  # what A sends back through the proxy now arrives 4 s late
        try:
            answer = stub.Predict(request, timeout=1.5)  # answered by its deadline: not DEADLINE_EXCEEDED
        finally:
            proxy.delay = 0.0
    assert list(answer.members_left_out) == ["digits_logreg_far"]
    votes = {v.member: v for v in answer.predictions[0].member_votes}
    late = votes["digits_logreg_far"]
    assert (late.version, late.in_time) == (1, False)  # asked (version 1), and cut off: not a missing member
    assert all(votes[m].in_time for m in ("digits_mlp_a", "digits_cnn_a"))
    assert [p.label for p in answer.predictions] == [p.label for p in whole.predictions]


def test_server_a_stopped_under_traffic_then_back(tmp_path, b, test_split):
    port = free_port()
    repo_a = repository(tmp_path / "a" / "models", {"digits_logreg": "digits_logreg"})
    endpoint = f"127.0.0.1:{port}"
    repo_c = repository(tmp_path / "c" / "models", ensembles={
        "digits": _trio(endpoint, b.address), "digits_all": _trio(endpoint, b.address, quorum=3)})
    with server_on(tmp_path, repo_a, port, STRICT) as server_a, \
            module_server_here(tmp_path, repo_c) as c2, grpcclient.InferenceServerClient(c2.address) as client:
        pixels = _unanimous(c2.address, test_split[0][:64].astype(np.float32))
        expected = infer(client, "digits", pixels).as_numpy("class_index")
        assert len(pixels) == 8 and c2.health("digits/complete") == SERVING
        good = GoodClient(c2.address, pixels, expected, model="digits")
        good.start()
        try:
            wait_until(lambda: good.successes >= 20, "answering")
            server_a.stop()  # SIGTERM: A drains and goes
            wait_until(lambda: c2.health("digits/complete") == NOT_SERVING, "reported degraded")
            assert c2.health("digits") == SERVING and c2.health() == SERVING
            answer = infer(client, "digits", pixels)
            assert left_out(answer) == "digits_logreg"
            assert np.array_equal(answer.as_numpy("class_index"), expected)
            with pytest.raises(InferenceServerException) as below:
                infer(client, "digits_all", pixels)
            assert below.value.status() == "StatusCode.UNAVAILABLE"
            assert f"2 of its 3 members serve, fewer than its quorum 3; member 'digits_logreg': at {endpoint}: " \
                   "it does not answer (UNAVAILABLE" in below.value.message()
            answered = good.successes
            wait_until(lambda: good.successes >= answered + 20, "answering at its quorum")
            with server_on(tmp_path, repo_a, port, STRICT):  # A is back, on the same port
                wait_until(lambda: c2.health("digits/complete") == SERVING, "whole again", timeout=60)
                assert c2.health("digits_all") == SERVING
                assert left_out(infer(client, "digits", pixels)) == ""
                answered = good.successes
                wait_until(lambda: good.successes >= answered + 20, "answering whole")
        finally:
            good.finish(min_successes=60)  # not one failed request while the quorum held
    log = c2.output()
    assert f"ensemble digits: degraded: answering without member 'digits_logreg' (at {endpoint}: " in log
    assert "ensemble digits: every member serves again" in log


def test_a_new_version_on_a_is_recalibrated_and_another_label_set_refused(tmp_path, b, test_split):
    port = free_port()
    repo_a = repository(tmp_path / "a" / "models", {"digits_logreg": "digits_logreg"})
    (repo_a / "digits_logreg" / "model.yaml").write_text("version_policy:\n  all: {}\n")
    endpoint = f"127.0.0.1:{port}"
    repo_c = repository(tmp_path / "c" / "models", ensembles={"digits": _trio(endpoint, b.address)})
    pixels = test_split[0][:8].astype(np.float32)
    with server_on(tmp_path, repo_a, port, [*STRICT, "--model-control", "poll"]), \
            module_server_here(tmp_path, repo_c) as c2, grpc.insecure_channel(c2.address) as channel:
        stub = pb_grpc.EnsembleServiceStub(channel)
        request = pb.PredictRequest(model="digits", return_member_votes=True, inputs=pb.Tensor(dtype="FP32", shape=[8, 64],
                                                                    content=pixels.tobytes()))

        def logreg_version() -> int:
            votes = stub.Predict(request, timeout=30).predictions[0].member_votes
            return next(v.version for v in votes if v.member == "digits_logreg" and v.in_time)

        before = vote_temperatures(c2)[("digits", POLICY)]
        assert logreg_version() == 1
        copy_variant("digits_mlp_a", repo_a, version=2, as_name="digits_logreg")  # another model as version 2
        wait_until(lambda: logreg_version() == 2, "serving version 2 of digits_logreg")
        assert vote_temperatures(c2)[("digits", POLICY)] != before  # the vote was fitted again

        relabelled = copy_variant("digits_logreg", repo_a, version=3)
        manifest = json.loads((relabelled / "variant.json").read_text())
        manifest["labels"] = [f"class {label}" for label in manifest["labels"]]
        (relabelled / "variant.json").write_text(json.dumps(manifest))
        wait_until(lambda: "digits_logreg version 3: refused: it would break ensemble 'digits'" in c2.output(),
                   "version 3 refused")
        assert logreg_version() == 2 and c2.health("digits/complete") == SERVING
    assert f"remote member digits_logreg at {endpoint}: serving version 2" in c2.output()


def test_reload_config_keeps_an_ensemble_whose_members_are_elsewhere(tmp_path, a, b, test_split):
    """TF Serving's HandleReloadConfigRequest (--model-control explicit) listing the ensemble:
    its remote members are not this repository's, and what is not listed is unloaded."""
    repo = repository(tmp_path / "c" / "models", {"local_logreg": "digits_logreg"},
                      ensembles={"digits": _trio(a.address, b.address)})
    request = model_management_pb2.ReloadConfigRequest()
    request.config.model_config_list.config.add(name="digits", model_platform="onnx")
    with server_on(tmp_path, repo, free_port(), [*STRICT, *EXPLICIT_CONTROL]) as c2, \
            grpc.insecure_channel(c2.address) as channel:
        assert c2.health("local_logreg") == SERVING
        answer = model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, timeout=60)
        assert answer.status.error_code == 0, answer.status.error_message
        wait_until(lambda: c2.health("local_logreg") == NOT_SERVING, "local_logreg unloaded")  # health follows in 0.5 s
        assert c2.health("digits/complete") == SERVING
        with grpcclient.InferenceServerClient(c2.address) as client:
            assert left_out(infer(client, "digits", test_split[0][:4].astype(np.float32))) == ""


def _metric(server, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).rsplit(" ", 1)[1])


def _unanimous(address: str, pixels: np.ndarray) -> np.ndarray:
    """Rows every member classifies alike (any vote of any subset answers them the same)."""
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.EnsembleServiceStub(channel).Predict(pb.PredictRequest(model="digits_all", return_member_votes=True, inputs=pb.Tensor(
            dtype="FP32", shape=list(pixels.shape), content=pixels.tobytes())), timeout=30)
    alike = [len({v.class_index for v in p.member_votes}) == 1 for p in response.predictions]
    return pixels[np.asarray(alike)][:8]


def module_server_here(tmp_path, repo):
    """A server C of the test's own (it sees its members come and go)."""
    return server_on(tmp_path, repo, free_port(), STRICT)
