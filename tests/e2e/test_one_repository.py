"""One repository, one meaning: a server started before a refused member version arrived and
one started after it serve the same versions, and report the refused ones the same way.

The repository holds a new `digits_mlp_a` version of another label set (a running server
refuses it: it would break `digits`) and a new `digits_logreg` version without its
variant.json. Both servers are real (`--model-control poll`), spoken to with tritonclient,
TF Serving's stubs and grpc.health.v1."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from tests.helpers import copy_variant, onnx_ensemble, wait_until
from tests.server import running_server

POLL = ["--model-control", "poll"]
ENSEMBLE = "digits"
REFUSED = (("digits_mlp_a", "2"), ("digits_logreg", "2"))


def _publish_breaking_versions(repo: Path) -> None:
    """What an operator might do: export versions the ensemble cannot take, renamed into place."""
    relabelled = copy_variant("digits_mlp_a", repo / ".staging", version=2)
    manifest = json.loads((relabelled / "variant.json").read_text())
    manifest["labels"] = [f"c{i}" for i in range(10)]
    (relabelled / "variant.json").write_text(json.dumps(manifest))
    os.rename(relabelled, repo / "digits_mlp_a" / "2")
    unlabelled = copy_variant("digits_logreg", repo / ".staging", version=2)
    (unlabelled / "variant.json").unlink()
    os.rename(unlabelled, repo / "digits_logreg" / "2")


def _index(client: grpcclient.InferenceServerClient) -> list[dict]:
    return sorted(client.get_model_repository_index(as_json=True)["models"],
                  key=lambda m: (m["name"], m.get("version", "")))




def _seen(server) -> dict:
    """What a user sees of a server: index, metadata, readiness (health and per version),
    model status, and answers of every model to the same rows."""
    client = grpcclient.InferenceServerClient(server.address)
    try:
        index = _index(client)
        names = sorted({m["name"] for m in index})
        seen: dict = {"index": index}
        seen["metadata"] = {n: client.get_model_metadata(n, as_json=True) for n in names}
        seen["ready"] = {(m["name"], m.get("version", "")): client.is_model_ready(m["name"], m.get("version", ""))
                         for m in index}
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            seen["health"] = {n: health.Check(health_pb2.HealthCheckRequest(service=n), timeout=5).status
                              for n in ["", *names, f"{ENSEMBLE}/complete"]}
            statuses = {}
            for name in names:
                request = get_model_status_pb2.GetModelStatusRequest()
                request.model_spec.name = name
                response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=10)
                statuses[name] = response.SerializeToString(deterministic=True)
            seen["tf_status"] = statuses
        return seen
    finally:
        client.close()


def _answers(server, pixels: np.ndarray) -> dict:
    client = grpcclient.InferenceServerClient(server.address)
    try:
        out = {}
        for name in ("digits", "digits_mlp_a", "digits_logreg", "digits_cnn_a"):
            tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
            tensor.set_data_from_numpy(pixels)
            result = client.infer(name, [tensor])
            response = result.get_response(as_json=True)
            out[name] = (response["model_version"], response.get("parameters", {}),
                         result.as_numpy("class_index").tolist(), result.as_numpy("probabilities"))
        return out
    finally:
        client.close()


def test_a_server_started_after_refused_versions_serves_what_one_running_before_serves(
        tmp_path, scratch_repo, test_split):
    repo = onnx_ensemble(scratch_repo)
    pixels = test_split[0][:16].astype(np.float32)
    with running_server(tmp_path, repo, args=POLL) as before:
        _publish_breaking_versions(repo)
        client = grpcclient.InferenceServerClient(before.address)
        try:  # the running server has seen both: each refused, the version before serving on
            wait_until(lambda: all(any((m["name"], m.get("version")) == r and m["state"] == "UNAVAILABLE"
                                   for m in _index(client)) for r in REFUSED), "both refused by the running server")
        finally:
            client.close()
        with running_server(tmp_path, repo, args=POLL) as after:
            old, new = _seen(before), _seen(after)
            assert new == old
            answers_old, answers_new = _answers(before, pixels), _answers(after, pixels)
    index = {(m["name"], m.get("version", "")): m for m in new["index"]}
    assert index[("digits_mlp_a", "2")]["reason"].startswith(
        "digits_mlp_a version 2: refused: it would break ensemble 'digits': ")
    assert "variant.json" in index[("digits_logreg", "2")]["reason"]
    assert index[("digits_mlp_a", "1")]["state"] == index[("digits_logreg", "1")]["state"] == "READY"
    assert index[(ENSEMBLE, "1")] == {"name": ENSEMBLE, "version": "1", "state": "READY"}
    assert new["metadata"]["digits_mlp_a"]["versions"] == ["1"] == new["metadata"]["digits_logreg"]["versions"]
    assert set(new["health"].values()) == {health_pb2.HealthCheckResponse.SERVING}
    assert answers_new.keys() == answers_old.keys()
    for name, (version, parameters, classes, probabilities) in answers_new.items():
        assert (version, parameters, classes) == answers_old[name][:3], name
        np.testing.assert_allclose(probabilities, answers_old[name][3], rtol=1e-6, atol=1e-7)
        assert version == "1" and "members_left_out" not in parameters
    for server in (before, after):  # the same line in both logs
        log = server.output()
        assert "failed to load digits_mlp_a version 2: digits_mlp_a version 2: refused: it would break " \
               "ensemble 'digits': member" in log
        assert "failed to load digits_logreg version 2: " in log
