"""What an operator sees of loads under --model-control poll: one log line when the server
serves (naming what it serves and what is not ready), one per load, unload, refusal and
recovery of a model or an ensemble; quorum_model_load_failures_total at 0 for every model
and ensemble of the repository from the first scrape, then 1 after a first failure; a version
folder without variant.json named as such, with its path, in the log and in the answer to a
request for that model.

One server on a scratch repository of two ONNX members and their ensemble, changed on disk
step by step; each step waits (with a deadline) for what it should produce. Under
--model-control explicit, the load and unload RPCs log theirs, and a request for an unloaded
model says it was unloaded."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from tritonclient.utils import InferenceServerException

from tests.helpers import MODELS, copy_variant
from tests.server import EXPLICIT_CONTROL, RunningServer, running_server

MEMBERS = ("digits_logreg", "digits_mlp_a")


def _until(condition: Callable[[], bool], what: str, server: RunningServer, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"{what}:\n{server.output()[-4000:]}")
        time.sleep(0.2)


def _lines(server: RunningServer, pattern: str) -> list[str]:
    return [line for line in server.output().splitlines() if re.search(pattern, line)]


def _failures(server: RunningServer) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return {m: float(v) for m, v in re.findall(r'^quorum_model_load_failures_total\{model="([^"]+)"\} (\S+)$',
                                               text, re.M)}


def _ensemble(root: Path, name: str, members: tuple[str, ...], policy: str = "confidence") -> None:
    (root / name).mkdir(exist_ok=True)
    (root / name / "ensemble.yaml").write_text(yaml.safe_dump({"members": list(members), "policy": policy}))


def _without_manifest(root: Path, name: str, version: int) -> Path:
    folder = copy_variant("digits_mlp_a", root, version=version, as_name=name)
    (folder / "variant.json").unlink()
    return folder


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    for member in MEMBERS:
        copy_variant(member, root)
    _ensemble(root, "pair", MEMBERS)
    _without_manifest(root, "nomanifest", 1)
    return root


def test_poll_mode_logs_each_change_and_counts_failures_from_zero(tmp_path, repo):
    with running_server(tmp_path, repo, args=["--model-control", "poll"]) as server:
        # Serving: one line, what is served and what is not.
        [serving] = _lines(server, r" serving \d+ models and ensembles from ")
        assert serving.endswith(f"serving 3 models and ensembles from {repo}: digits_logreg, digits_mlp_a, pair; "
                                "not ready: nomanifest (why: above)"), serving
        # A version folder without variant.json: the log and the answer say so, with the path.
        missing = f"variant.json is missing: there is no file {repo / 'nomanifest' / '1' / 'variant.json'}"
        assert len(_lines(server, re.escape(missing))) == 1, server.output()[-3000:]
        client = grpcclient.InferenceServerClient(server.address)
        try:
            rows = grpcclient.InferInput("input", [1, 64], "FP32")
            rows.set_data_from_numpy(np.zeros((1, 64), np.float32))
            with pytest.raises(InferenceServerException) as refused:
                client.infer("nomanifest", [rows])
            assert "has no version ready: version 1 failed to load: " in str(refused.value), refused.value
            assert missing in str(refused.value), refused.value
        finally:
            client.close()
        # Counters: 0 for every model and ensemble from the first scrape; the one that failed is 1.
        assert _failures(server) == {"digits_logreg": 0, "digits_mlp_a": 0, "pair": 0, "nomanifest": 1}

        # A refusal: a new version without its manifest. One line, and the counter goes 0 -> 1.
        _without_manifest(repo, "digits_mlp_a", 2)
        refusal = r"failed to load digits_mlp_a version 2: .*variant\.json is missing"
        _until(lambda: _lines(server, refusal), "no line for the refused version", server)
        _until(lambda: _failures(server)["digits_mlp_a"] == 1, "digits_mlp_a's failures not 1", server)
        # A recovery: the manifest arrives; the retried version loads, in one line each.
        manifest = json.loads((MODELS / "digits_mlp_a" / "1" / "variant.json").read_text())
        (repo / "digits_mlp_a" / "2" / "variant.json").write_text(json.dumps({**manifest, "version": 2}))
        _until(lambda: _lines(server, r"digits_mlp_a/2: loads again, after 1 failed attempt$"),
               "no recovery line", server)
        assert len(_lines(server, r"loaded digits_mlp_a version 2 \(onnx\) on cpu")) == 1
        assert len(_lines(server, refusal)) == 1  # the poller's retries of the same error were not logged again

        # A new model loads, a new ensemble loads, each in one line; each has its counter at 0.
        copy_variant("digits_logreg", repo, as_name="late")
        _ensemble(repo, "trio", ("digits_logreg", "digits_mlp_a", "late"))
        _until(lambda: _lines(server, r"ensemble trio loaded \(confidence vote of digits_logreg, digits_mlp_a, "
                                      r"late\)$"), "no line for the new ensemble", server)
        assert len(_lines(server, r"loaded late version 1 \(onnx\) on cpu")) == 1
        _until(lambda: {"late", "trio"} <= set(_failures(server)), "no counters for late and trio", server)
        assert _failures(server)["late"] == _failures(server)["trio"] == 0

        # An ensemble that fails as it appears: its line, its counter at 1; fixed, it recovers.
        _ensemble(repo, "ghost", MEMBERS, policy="majorityy")
        _until(lambda: _lines(server, r"ensemble ghost: .*ensemble.yaml: field 'policy'"),
               "no line for the broken ensemble", server)
        _until(lambda: _failures(server).get("ghost") == 1, "ghost's failures not 1", server)
        _ensemble(repo, "ghost", MEMBERS)
        _until(lambda: _lines(server, r"ensemble ghost loaded \(confidence vote of digits_logreg, digits_mlp_a\)$"),
               "ghost did not recover", server)
        assert not _lines(server, r"ghost: loads again")  # one line for its recovery: it loaded

        # Unloads: a model and an ensemble moved out of the repository.
        shutil.move(repo / "trio", tmp_path / "trio")
        shutil.move(repo / "late", tmp_path / "late")
        _until(lambda: _lines(server, r"unloaded late version 1$"), "no line for the unloaded model", server)
        _until(lambda: _lines(server, r"ensemble trio: removed from the repository, unloaded$"),
               "no line for the removed ensemble", server)
        assert server.stop() == 0
    assert "repeated 0 times" not in server.output()


def test_explicit_mode_logs_each_load_and_unload_and_says_why_a_model_is_not_ready(tmp_path, repo):
    with running_server(tmp_path, repo, args=EXPLICIT_CONTROL) as server:
        client = grpcclient.InferenceServerClient(server.address)
        try:
            client.unload_model("pair")
            client.unload_model("digits_mlp_a")
            assert len(_lines(server, r"ensemble pair unloaded by request")) == 1
            assert len(_lines(server, r"unloaded digits_mlp_a version 1\b")) == 1
            rows = grpcclient.InferInput("input", [1, 64], "FP32")
            rows.set_data_from_numpy(np.zeros((1, 64), np.float32))
            with pytest.raises(InferenceServerException, match=r"has no version ready: it was unloaded "
                                                                r"\(RepositoryModelUnload\); load it to serve it again"):
                client.infer("digits_mlp_a", [rows])
            client.load_model("digits_mlp_a")
            client.load_model("pair")
            assert len(_lines(server, r"loaded digits_mlp_a version 1 \(onnx\) on cpu")) == 2  # at start, and now
            assert len(_lines(server, r"ensemble pair loaded by request")) == 1
            assert client.is_model_ready("pair")
        finally:
            client.close()
