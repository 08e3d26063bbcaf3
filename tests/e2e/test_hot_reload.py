"""Hot reload against a real server: versions swap under load without a failed request, and
a corrupt new version leaves the serving one in place."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.helpers import copy_variant
from tests.server import running_server

POLL = ["--model-control", "poll"]  # hot reload: the repository is rescanned


class Load(threading.Thread):
    """A client that keeps sending requests and records (version, probabilities) answers."""

    def __init__(self, address: str, model: str, rows: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.client = grpcclient.InferenceServerClient(address)
        self.model, self.rows = model, rows
        self.answers: list[tuple[str, np.ndarray]] = []
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            data = grpcclient.InferInput("pixels", list(self.rows.shape), "FP32")
            data.set_data_from_numpy(self.rows)
            try:
                result = self.client.infer(self.model, [data])
                self.answers.append((result.get_response().model_version, result.as_numpy("probabilities")))
            except InferenceServerException as exc:
                self.failures.append(str(exc))

    def wait_for(self, version: str, timeout: float = 60) -> int:
        """Index of the first answer from `version`."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for i, (v, _) in enumerate(list(self.answers)):
                if v == version:
                    return i
            time.sleep(0.05)
        raise TimeoutError(f"no answer from version {version}; failures: {self.failures[:3]}")


def _publish(repo: Path, variant: str, version: int) -> Path:
    """Write a version to the side, then rename it into place (what the export tool does)."""
    staging = copy_variant(variant, repo / ".staging", version=version, as_name="m")
    target = repo / "m" / str(version)
    os.rename(staging, target)
    return target


def test_new_version_swaps_in_under_load_without_a_failed_request(tmp_path, scratch_repo, test_split):
    x, _ = test_split
    copy_variant("digits_mlp_a", scratch_repo, as_name="m")
    with running_server(tmp_path, scratch_repo, args=POLL) as server:
        load = Load(server.address, "m", x[:4])
        load.start()
        time.sleep(1.0)
        _publish(scratch_repo, "digits_cnn_a", 2)  # a different checkpoint: answers differ
        first_new = load.wait_for("2")
        shutil.rmtree(scratch_repo / "m" / "1")  # the old version disappears from disk too
        time.sleep(2.0)
        load.halt.set()
        load.join(timeout=30)
    assert not load.failures, load.failures[:3]
    versions = [v for v, _ in load.answers]
    assert versions[0] == "1" and len(versions) > first_new + 5
    assert set(versions[first_new:]) == {"2"}, "an answer came from the old version after the swap"
    old, new = load.answers[0][1], load.answers[-1][1]
    assert not np.allclose(old, new), "versions 1 and 2 should be different checkpoints"


def test_corrupt_new_version_leaves_the_old_one_serving(tmp_path, scratch_repo, test_split):
    x, _ = test_split
    copy_variant("digits_mlp_a", scratch_repo, as_name="m")
    with running_server(tmp_path, scratch_repo, args=POLL) as server:
        load = Load(server.address, "m", x[:4])
        load.start()
        broken = copy_variant("digits_mlp_a", scratch_repo / ".staging", version=2, as_name="m")
        (broken / "model.onnx").write_bytes(b"not an onnx graph")
        os.rename(broken, scratch_repo / "m" / "2")
        client = grpcclient.InferenceServerClient(server.address)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
            if ("m", "2") in index:
                break
            time.sleep(0.2)
        time.sleep(1.0)
        load.halt.set()
        load.join(timeout=30)
        assert index[("m", "2")].state == "UNAVAILABLE"
        assert "not a loadable ONNX model" in index[("m", "2")].reason
        assert index[("m", "1")].state == "READY"
        assert client.is_model_ready("m")
        assert "failed to load m version 2" in server.output()
    assert not load.failures, load.failures[:3]
    assert {v for v, _ in load.answers} == {"1"}
