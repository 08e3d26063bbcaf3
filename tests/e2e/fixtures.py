"""End-to-end helpers: one real server per test module, and the expected answers.

The expected answers are computed in the test process, independently of the server's
runtimes: each member folder is loaded with onnxruntime or tf.saved_model, its input
normalised with the manifest's frozen statistics, its logits temperature-scaled, and
the members combined by tests/e2e/oracle.py, a row-by-row restatement of each policy
written apart from service.ensemble.voting.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from tests.e2e.oracle import ExpectedVote, expected_vote, recalibrated, stacked_weights
from tests.helpers import onnx_models
from tests.server import RunningServer, running_server

ENSEMBLE = "digits"
MEMBER = "digits_mlp_a"


def repository_models(root: Path | None = None) -> set[str]:
    """Names of the models and ensembles in a repository folder, as the server should list them."""
    root = onnx_models() if root is None else root
    return {p.name for p in root.iterdir()
            if p.is_dir() and ((p / "ensemble.yaml").exists() or any(c.name.isdigit() for c in p.iterdir()))}


@contextmanager
def module_server(tmp_path_factory, name: str, **kwargs) -> Iterator[RunningServer]:
    """A server for a whole test module; its log is shown if the module fails to start it."""
    with running_server(tmp_path_factory.mktemp(name), **kwargs) as server:
        yield server
        server.stop()


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class _Member:
    def __init__(self, folder: Path) -> None:
        self.manifest = json.loads((folder / "variant.json").read_text())
        m = self.manifest
        self.name = m["name"]
        self.labels = tuple(m["labels"])
        self.temperature = float(m["calibration"]["temperature"])
        self.accuracy = float(m["validation"]["calibrated"]["accuracy"])
        self.mean = np.asarray(m["normalization"]["mean"], dtype=np.float32)
        std = np.asarray(m["normalization"]["std"], dtype=np.float64)
        self.scale = (1.0 / std).astype(np.float32)
        self.input = m["inputs"][0]
        self.output = m["outputs"][0]["name"]
        path = folder / m["artifact"]
        if m["framework"] == "onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self._run = lambda x: session.run([self.output], {self.input["name"]: x})[0]
        else:
            import tensorflow as tf

            fn = tf.saved_model.load(str(path)).signatures[m["signature"]]
            self._run = lambda x: fn(**{self.input["name"]: tf.constant(x)})[self.output].numpy()

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        flat = pixels.reshape(pixels.shape[0], -1).astype(np.float32)
        x = ((flat - self.mean) * self.scale).reshape((pixels.shape[0], *self.input["shape"][1:]))
        return self._run(x)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        return _softmax(self.logits(pixels), self.temperature)


@dataclass
class Reference:
    """Loads the repository's models in this process; answers as the server should."""

    repository: Path = field(default_factory=onnx_models)
    """The repository the server under test serves (tests/server.py's default unless given)."""
    vote_temperatures: dict[tuple[str, str], float] = field(default_factory=dict)
    """(ensemble, policy) -> the vote temperature the server fitted (see vote_temperatures());
    the fit itself is checked by tests/e2e/test_vote_calibration.py."""
    _members: dict[str, _Member] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def member(self, name: str) -> _Member:
        with self._lock:
            if name not in self._members:
                self._members[name] = _Member(self.repository / name / "1")
            return self._members[name]

    def ensemble_config(self, name: str = ENSEMBLE) -> dict:
        return yaml.safe_load((self.repository / name / "ensemble.yaml").read_text())

    def labels(self, name: str) -> tuple[str, ...]:
        if (self.repository / name / "ensemble.yaml").exists():
            return self.member(self.ensemble_config(name)["members"][0]).labels
        return self.member(name).labels

    def vote(self, name: str, pixels: np.ndarray, policy: str | None = None) -> ExpectedVote:
        if (self.repository / name / "ensemble.yaml").exists():
            config = self.ensemble_config(name)
            members = [self.member(m) for m in config["members"]]
            policy = policy or config["policy"]
            weights = stacked_weights([m.manifest["validation"] for m in members]) if policy == "stacked" else None
            result = expected_vote(policy, [m.probabilities(pixels) for m in members],
                                   [m.accuracy for m in members], weights)
            return recalibrated(result, self.vote_temperatures.get((name, policy), 1.0))
        member = self.member(name)
        return expected_vote(policy or "soft", [member.probabilities(pixels)], [member.accuracy])

    def outputs(self, name: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The output tensors the server should answer with (as the v2 / TF APIs name them)."""
        v = self.vote(name, pixels)
        labels = self.labels(name)
        out = {"probabilities": v.probabilities, "class_index": v.label_index,
               "label": np.asarray([labels[i] for i in v.label_index], dtype=object),
               "confidence": v.confidence, "agreement": v.agreement}
        if not (self.repository / name / "ensemble.yaml").exists():
            del out["agreement"]
            out["logits"] = self.member(name).logits(pixels)
        return out


def vote_temperatures(server: RunningServer) -> dict[tuple[str, str], float]:
    """(ensemble, policy) -> vote temperature, as the server reports them (quorum.v1 GetStatus)."""
    import grpc

    from service._proto.quorum.v1 import ensemble_pb2 as pb
    from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc

    names = {v: k.removeprefix("VOTING_POLICY_").lower() for k, v in pb.VotingPolicy.items()}
    with grpc.insecure_channel(server.address) as channel:
        status = pb_grpc.EnsembleServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)
    return {(m.name, names[c.policy]): c.temperature for m in status.models for c in m.vote_calibration}


def as_text(array: np.ndarray) -> list[str]:
    return [a.decode() if isinstance(a, bytes) else str(a) for a in np.asarray(array).ravel()]
