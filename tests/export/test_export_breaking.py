"""`quorum export` refuses a version that would break an ensemble of the target repository
(the version a server would refuse, by the server's own check), and writes it with a warning
under --allow-breaking; a server started on that repository then serves the member's version
before it, and names the refused one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tests.helpers import ROOT
from tests.server import running_server

LABELS = ("benign", "malignant")


def quorum(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """A repository of two exported scikit-learn members and an ensemble of them, and what to
    export next: the data and a pickled model."""
    bc = load_breast_cancer()
    x, y = bc.data.astype(np.float32), np.asarray(LABELS)[bc.target]
    idx = np.random.default_rng(3).permutation(len(x))
    tr, va = idx[:400], idx[400:]
    folder = tmp_path_factory.mktemp("breaking")
    npz = folder / "splits.npz"
    np.savez(npz, x_train=x[tr], y_train=y[tr], x_val=x[va], y_val=y[va], val_indices=va)
    model = folder / "model.joblib"
    joblib.dump(make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x[tr], y[tr]), model)
    repo = folder / "repo"
    for name in ("cancer_a", "cancer_b"):
        done = quorum("export", "--model", str(model), "--data", str(npz), "--repository", str(repo),
                      "--name", name, "--quiet")
        assert done.returncode == 0, done.stderr
    done = quorum("ensemble", "create", "cancer", "--members", "cancer_a,cancer_b", "--repository", str(repo))
    assert done.returncode == 0, done.stderr
    return {"repo": repo, "npz": npz, "model": model}


@pytest.fixture
def repo(made, tmp_path):
    """The repository as made, for this test alone (in any order)."""
    return Path(shutil.copytree(made["repo"], tmp_path / "repo"))


def _export_relabelled(made: dict, repo: Path, *flags: str) -> subprocess.CompletedProcess:
    return quorum("export", "--model", str(made["model"]), "--data", str(made["npz"]), "--repository",
                  str(repo), "--name", "cancer_b", "--labels", "no,yes", "--quiet", *flags)


def test_a_version_that_would_break_an_ensemble_is_refused_and_nothing_is_written(made, repo) -> None:
    done = _export_relabelled(made, repo)
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("quorum export: error: cancer_b version 2 would break ensemble 'cancer': "
                           "member 'cancer_b' predicts labels that 'cancer_a' does not: ['no' at 0, 'yes' at 1]")
    assert "a server refuses it and keeps serving the cancer_b version before it" in line
    assert "--allow-breaking" in line
    assert sorted(p.name for p in (repo / "cancer_b").iterdir()) == ["1"]
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no staging left


def test_with_allow_breaking_it_is_written_with_a_warning_and_a_server_refuses_it(made, repo, tmp_path) -> None:
    done = _export_relabelled(made, repo, "--allow-breaking")
    assert done.returncode == 0, done.stderr
    version = repo / "cancer_b" / "2"
    assert done.stdout.strip() == str(version)
    warnings = [w for w in done.stderr.strip().splitlines() if "would break" in w]
    assert len(warnings) == 1 and warnings[0].startswith(
        "quorum export: warning: cancer_b version 2 would break ensemble 'cancer': "), done.stderr
    manifest = json.loads((version / "variant.json").read_text())
    assert manifest["labels"] == ["no", "yes"] and any("would break ensemble 'cancer'" in w
                                                       for w in manifest["warnings"])
    # a server started on it now refuses the version as one running before it arrived would
    with running_server(tmp_path, repo) as server:
        client = grpcclient.InferenceServerClient(server.address)
        try:
            index = {(m["name"], m.get("version", "")): m
                     for m in client.get_model_repository_index(as_json=True)["models"]}
            refused = index[("cancer_b", "2")]
            assert refused["state"] == "UNAVAILABLE"
            assert "cancer_b version 2: refused: it would break ensemble 'cancer': member 'cancer_b' " \
                   "predicts labels that 'cancer_a' does not" in refused["reason"]
            assert client.is_model_ready("cancer_b", "1") and client.is_model_ready("cancer")
            assert client.get_model_metadata("cancer_b", as_json=True)["versions"] == ["1"]
        finally:
            client.close()
