"""What one bad model, one bad config or one careless call must not do: take the server down.

Against real servers on copies of the bundled repository, with a well-behaved client beside
each one that must see only right answers:
- the model-control RPCs are refused unless the server runs with --model-control explicit;
- a reload config naming a model that does not exist is refused and changes nothing;
- a corrupt new model, a broken ensemble.yaml and an unloaded member are reported under
  their own health names, and the server stays SERVING (not with --strict-readiness);
- liveness (health service "liveness") stays SERVING through all of it;
- the poller retries a failed version once its files change, and logs a repeated error once.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2
from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.e2e.fixtures import ENSEMBLE, MEMBER, Reference, repository_models
from tests.e2e.traffic import GoodClient
from tests.helpers import MODELS, copy_variant, wait_until
from tests.server import EXPLICIT_CONTROL, RunningServer, running_server

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING




def _repo(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(MODELS, root, ignore=shutil.ignore_patterns("*.py", "*.md", "digits_split.json"))
    return root


def _good(server: RunningServer, test_split, model: str = ENSEMBLE) -> GoodClient:
    pixels = np.ascontiguousarray(test_split[0][:8])
    client = GoodClient(server.address, pixels, Reference().vote(model, pixels).label_index, model)
    client.start()
    return client


def _finish(client: GoodClient) -> None:
    client.stopping.set()
    client.join(timeout=60)
    assert client.failures == [], client.failures[:3]
    assert client.successes > 0


def _reload(channel: grpc.Channel, *names: str) -> model_management_pb2.ReloadConfigResponse:
    request = model_management_pb2.ReloadConfigRequest()
    for name in names:
        request.config.model_config_list.config.add(name=name, model_platform="onnx")
    return model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, timeout=60)


def _failures(server: RunningServer, model: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    match = re.search(rf'^quorum_model_load_failures_total{{model="{model}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else -1.0


# -- model control off by default ---------------------------------------------------------------
def test_control_rpcs_refused_by_default(tmp_path, test_split):
    with running_server(tmp_path) as server, grpc.insecure_channel(server.address) as channel:
        client = grpcclient.InferenceServerClient(server.address)
        try:
            for call in (client.load_model, client.unload_model):
                with pytest.raises(InferenceServerException) as err:
                    call(MEMBER)
                assert err.value.status() == "StatusCode.PERMISSION_DENIED"
                assert "--model-control explicit" in err.value.message()
            with pytest.raises(grpc.RpcError) as err:
                _reload(channel, MEMBER)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "--model-control explicit" in err.value.details()
            assert client.is_model_ready(MEMBER) and client.is_model_ready(ENSEMBLE)
        finally:
            client.close()
        assert server.health() == SERVING
        assert "repository-poller" not in server.output()


# -- explicit control: a bad reload config changes nothing; an unloaded member --------------------
def test_reload_config_naming_an_unknown_model_changes_nothing(tmp_path, test_split):
    repo = _repo(tmp_path)
    with running_server(tmp_path, repo, args=EXPLICIT_CONTROL) as server, \
            grpc.insecure_channel(server.address) as channel:
        good = _good(server, test_split, MEMBER)  # the ensembles lose a member below
        client = grpcclient.InferenceServerClient(server.address)
        try:
            before = client.get_model_repository_index(as_json=True)["models"]
            with pytest.raises(grpc.RpcError) as err:
                _reload(channel, MEMBER, "no_such_model")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no_such_model" in err.value.details() and "nothing was changed" in err.value.details()
            time.sleep(1.0)  # a poller (there is none) or a late unload would show by now
            assert client.get_model_repository_index(as_json=True)["models"] == before
            assert all(client.is_model_ready(m) for m in repository_models(repo))
            assert server.health() == SERVING and server.health(ENSEMBLE) == SERVING

            # An unloaded member is reported under its own name, not the server's; the ensemble
            # stays ready while its quorum (a majority, 3 of 5) serves, and not below it.
            client.unload_model("digits_logreg")
            wait_until(lambda: server.health("digits_logreg") == NOT_SERVING, "member NOT_SERVING")
            assert server.health(ENSEMBLE) == SERVING and client.is_model_ready(ENSEMBLE)
            for member in ("digits_cnn_b", "digits_mlp_b"):
                client.unload_model(member)
            wait_until(lambda: server.health(ENSEMBLE) == NOT_SERVING, "ensemble NOT_SERVING below its quorum")
            assert server.health() == SERVING and client.is_server_ready()
            assert server.health("liveness") == SERVING
            for member in ("digits_logreg", "digits_cnn_b", "digits_mlp_b"):
                client.load_model(member)
            wait_until(lambda: server.health(ENSEMBLE) == SERVING, "ensemble SERVING again")
        finally:
            client.close()
            _finish(good)


# -- polling: a corrupt model, a broken ensemble; retried once fixed -------------------------------
def _break_things(repo) -> None:
    broken = copy_variant("digits_mlp_a", repo / ".staging", as_name="broken")
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    os.rename(broken.parent, repo / "broken")
    (repo / "typo").mkdir()
    (repo / "typo" / "ensemble.yaml").write_text("members: [digits_mlp_a\npolicy: confident\n")


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict-readiness"])
def test_bad_models_do_not_flip_the_server(tmp_path, test_split, strict):
    repo = _repo(tmp_path)
    args = ["--model-control", "poll"] + (["--strict-readiness"] if strict else [])
    with running_server(tmp_path, repo, args=args) as server:
        good = _good(server, test_split)
        client = grpcclient.InferenceServerClient(server.address)
        try:
            _break_things(repo)
            wait_until(lambda: _failures(server, "broken") >= 1 and _failures(server, "typo") >= 1,
                   "both failures counted")
            assert server.health("broken") == NOT_SERVING
            assert server.health("typo") == NOT_SERVING
            assert not client.is_model_ready("broken") and not client.is_model_ready("typo")
            assert server.health(ENSEMBLE) == SERVING and client.is_model_ready(ENSEMBLE)
            assert server.health("liveness") == SERVING
            if strict:
                wait_until(lambda: server.health() == NOT_SERVING, "strict readiness NOT_SERVING")
                assert not client.is_server_ready()
            else:
                assert server.health() == SERVING and client.is_server_ready()
            time.sleep(2.0)  # four more polls of the same broken files
            log = server.output()
            assert log.count("failed to load broken version 1") == 1, log[-3000:]
            assert log.count("ensemble typo:") == 1, log[-3000:]
            assert _failures(server, "broken") == 1 and _failures(server, "typo") == 1

            # The files change (a fixed upload): the poller retries, without an explicit load.
            shutil.copy(MODELS / "digits_mlp_a" / "1" / "model.onnx", repo / "broken" / "1" / "model.onnx")
            (repo / "typo" / "ensemble.yaml").write_text("members: [digits_mlp_a, digits_logreg]\npolicy: soft\n")
            wait_until(lambda: server.health("broken") == SERVING and server.health("typo") == SERVING,
                   "fixed models SERVING")
            assert server.health() == SERVING and server.health("liveness") == SERVING
        finally:
            client.close()
            _finish(good)
