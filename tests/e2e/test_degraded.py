"""Degrade, never surprise: a member folder moved out of the repository (`mv`) while a client
sends traffic leaves its ensemble answering without it, reported as degraded (health
`<ensemble>/complete`, quorum.v1 GetStatus, the `quorum_ensemble_members_missing` metric, the
answers' members left out), and whole again once the folder is back; below its quorum the
ensemble answers UNAVAILABLE naming the missing members, and recovers by itself.

A real server with `--model-control poll`, tritonclient, TF Serving's stubs, quorum.v1 and
grpc.health.v1; the good client (tests/e2e/traffic.py) checks every answer throughout."""

from __future__ import annotations

import shutil
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2
from tritonclient.utils import InferenceServerException

from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from tests.e2e.traffic import GoodClient
from tests.helpers import onnx_ensemble, wait_until
from tests.server import running_server

POLL = ["--model-control", "poll"]  # tests/server.py polls every 0.5 s
ENSEMBLE, GONE = "digits", "digits_logreg"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING




def _infer(client: grpcclient.InferenceServerClient, model: str, pixels: np.ndarray):
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    return client.infer(model, [tensor])


def _unanimous(client: grpcclient.InferenceServerClient, pixels: np.ndarray, members) -> np.ndarray:
    """Rows every member classifies alike: any vote of any subset of the members answers them
    the same, so the good client's expected answer holds while members come and go."""
    votes = np.stack([_infer(client, m, pixels).as_numpy("class_index") for m in members])
    return pixels[(votes == votes[0]).all(axis=0)][:8]


def _missing_metric(server) -> str:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return next(line for line in text.splitlines()
                if line.startswith(f'quorum_ensemble_members_missing{{ensemble="{ENSEMBLE}"}}'))


def test_a_member_moved_away_and_back_under_traffic_degrades_the_ensemble_and_it_recovers(
        tmp_path, scratch_repo, test_split):
    repo = onnx_ensemble(scratch_repo)  # digits_cnn_a, digits_logreg, digits_mlp_a: quorum 2
    aside = tmp_path / "aside"
    aside.mkdir()
    with running_server(tmp_path, repo, args=POLL) as server, grpc.insecure_channel(server.address) as channel:
        client = grpcclient.InferenceServerClient(server.address)
        quorum = pb_grpc.EnsembleServiceStub(channel)

        def status() -> pb.ModelStatus:
            [model] = quorum.GetStatus(pb.GetStatusRequest(model=ENSEMBLE), timeout=10).models
            return model

        members = list(status().members)
        pixels = _unanimous(client, test_split[0][:64].astype(np.float32), members)
        expected = _infer(client, ENSEMBLE, pixels).as_numpy("class_index")
        assert server.health(f"{ENSEMBLE}/complete") == SERVING
        good = GoodClient(server.address, pixels, expected, model=ENSEMBLE)
        good.start()
        try:
            wait_until(lambda: good.successes >= 20, "answering")
            shutil.move(repo / GONE, aside / GONE)  # mv repo/digits_logreg /tmp/
            wait_until(lambda: server.health(f"{ENSEMBLE}/complete") == NOT_SERVING, "reported degraded")
            assert server.health(ENSEMBLE) == SERVING and server.health() == SERVING
            degraded = status()
            assert degraded.degraded and list(degraded.members_missing) == [GONE]
            assert degraded.versions[0].state == pb.VERSION_STATE_READY
            assert degraded.versions[0].reason == (f"degraded: answering without member '{GONE}' "
                                                   "(it is not in the repository)")
            assert (degraded.quorum, degraded.serving_members) == (2, 2)
            assert _missing_metric(server) == f'quorum_ensemble_members_missing{{ensemble="{ENSEMBLE}"}} 1.0'
            answer = _infer(client, ENSEMBLE, pixels)
            assert answer.get_response().parameters["members_left_out"].string_param == GONE
            np.testing.assert_array_equal(answer.as_numpy("class_index"), expected)
            response = quorum.Predict(pb.PredictRequest(model=ENSEMBLE, inputs=pb.Tensor(
                dtype="FP32", shape=list(pixels.shape), content=pixels.tobytes())), timeout=30)
            assert list(response.members_left_out) == [GONE]
            answered_degraded = good.successes
            wait_until(lambda: good.successes >= answered_degraded + 20, "answering degraded")

            shutil.move(aside / GONE, repo / GONE)  # and back
            wait_until(lambda: server.health(f"{ENSEMBLE}/complete") == SERVING, "whole again")
            whole = status()
            assert not whole.degraded and list(whole.members_missing) == [] and whole.versions[0].reason == ""
            assert whole.serving_members == 3
            assert _missing_metric(server) == f'quorum_ensemble_members_missing{{ensemble="{ENSEMBLE}"}} 0.0'
            assert "members_left_out" not in _infer(client, ENSEMBLE, pixels).get_response().parameters
            answered_whole = good.successes
            wait_until(lambda: good.successes >= answered_whole + 20, "answering whole")
        finally:
            good.finish(min_successes=60)  # not one failed request while its quorum held
        log = server.output()
        assert f"ensemble {ENSEMBLE}: degraded: answering without member '{GONE}' (it is not in the repository)" in log
        assert f"ensemble {ENSEMBLE}: every member serves again" in log

        # Below its quorum (1 of 3 members): UNAVAILABLE, naming the missing members; then back.
        for name in (GONE, "digits_mlp_a"):
            shutil.move(repo / name, aside / name)
        wait_until(lambda: server.health(ENSEMBLE) == NOT_SERVING, "not ready below its quorum")
        with pytest.raises(InferenceServerException) as err:
            _infer(client, ENSEMBLE, pixels)
        assert err.value.status() == "StatusCode.UNAVAILABLE"
        assert ("1 of its 3 members serve, fewer than its quorum 2; member 'digits_logreg': it is not in the "
                "repository; member 'digits_mlp_a': it is not in the repository") in err.value.message()
        assert list(status().members_missing) == [GONE, "digits_mlp_a"] and not status().degraded
        for name in (GONE, "digits_mlp_a"):
            shutil.move(aside / name, repo / name)
        wait_until(lambda: server.health(f"{ENSEMBLE}/complete") == SERVING, "recovered by itself")
        np.testing.assert_array_equal(_infer(client, ENSEMBLE, pixels).as_numpy("class_index"), expected)
        client.close()
