"""`cp -r MODEL/1 MODEL/2` under poll: version 2 serves (the folder's name is the version; the
manifest, still saying version 1, is kept as provenance). A real server with
`--model-control poll`, spoken to by tritonclient.http and quorum.v1."""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import tritonclient.http as httpclient

from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from tests.e2e.fixtures import ENSEMBLE, MEMBER, Reference, as_text
from tests.helpers import onnx_ensemble, wait_until
from tests.server import running_server

POLL = ["--model-control", "poll"]  # tests/server.py polls every 0.5 s


def _infer(client: httpclient.InferenceServerClient, model: str, version: str, pixels: np.ndarray) -> dict:
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    result = client.infer(model, [tensor], model_version=version)
    response = result.get_response()
    return {"version": response["model_version"],
            **{o["name"]: result.as_numpy(o["name"]) for o in response["outputs"]}}




def _same(got: dict, expected: dict) -> None:
    np.testing.assert_array_equal(got["class_index"], expected["class_index"])
    assert as_text(got["label"]) == as_text(expected["label"])
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], atol=1e-6)
    np.testing.assert_allclose(got["logits"], expected["logits"], rtol=1e-5, atol=1e-5)


def test_a_version_folder_copied_while_serving_serves_as_its_new_number(tmp_path, scratch_repo, test_split):
    repo = onnx_ensemble(scratch_repo)  # the bundled ONNX members, manifests as exported, and an ensemble
    pixels = test_split[0][:8].astype(np.float32)
    expected = Reference(repository=repo).outputs(MEMBER, pixels)  # computed apart from the server
    with running_server(tmp_path, repo, args=POLL) as server:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        try:
            first = _infer(client, MEMBER, "1", pixels)
            assert first["version"] == "1"
            _same(first, expected)
            assert client.is_model_ready(MEMBER, "2") is False  # no such version yet: 404

            shutil.copytree(repo / MEMBER / "1", repo / MEMBER / "2")  # cp -r, while it serves
            wait_until(lambda: client.is_model_ready(MEMBER, "2"), f"{MEMBER} version 2 ready")

            second = _infer(client, MEMBER, "2", pixels)
            assert second["version"] == "2"
            _same(second, expected)
            for name in ("class_index", "probabilities", "logits"):
                np.testing.assert_array_equal(second[name], first[name])
            newest = _infer(client, MEMBER, "", pixels)  # no version asked: the newest, the copy
            assert newest["version"] == "2"
            assert client.is_model_ready(ENSEMBLE)  # its member's new version keeps the contract
            assert client.get_model_metadata(MEMBER)["versions"][-1] == "2"
        finally:
            client.close()
        with grpc.insecure_channel(server.address) as channel:
            [status] = pb_grpc.EnsembleServiceStub(channel).GetStatus(
                pb.GetStatusRequest(model=MEMBER), timeout=10).models
        copies = [(v.version, v.copied_from) for v in status.versions if v.version == 2]
        assert copies == [(2, f"{MEMBER} version 1")], status
        log = server.output()
        assert f"{MEMBER}/2 is a copy of {MEMBER} version 1 (its variant.json says so): " \
               f"served as {MEMBER} version 2" in log
        assert "but the folder is" not in log
