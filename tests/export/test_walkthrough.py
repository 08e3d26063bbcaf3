"""docs/walkthrough.md, run as written: its code blocks in order, in an empty folder, with
`quorum` on the PATH. The `quorum serve` line is the one exception: the real server is started
on free ports by tests/server.py with the walkthrough's repository, and the walkthrough's
`localhost:8500` is pointed at it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers import ROOT
from tests.server import running_server

DOC = ROOT / "docs" / "walkthrough.md"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
SERVE = "quorum serve --model-repository my_models"


def blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall(DOC.read_text())]


def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "quorum"  # the console script, running this checkout's code
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m service.cli "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}

    def sh(command: str) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        return done

    found = blocks()
    langs = [lang for lang, _ in found]
    assert langs == ["python", "bash", "bash", "bash", "python", "bash"], langs
    (_, train), (_, export), (_, ensemble), (_, serve), (_, query), (_, predict) = found
    (work / "train.py").write_text(train)
    sh("python train.py")
    exported = sh(export)
    assert exported.stdout.count("exported cancer_") == 3
    assert "logits before the softmax head" in exported.stdout
    assert "warning" not in exported.stderr, exported.stderr  # --model-input raw: normalised once
    checked = sh(ensemble)
    assert "wrote my_models/cancer/ensemble.yaml: 3 members" in checked.stdout
    assert "4 models, 0 with something the server would refuse" in checked.stdout
    assert serve.strip() == SERVE
    with running_server(tmp_path, work / "my_models") as server:
        (work / "query.py").write_text(query.replace("localhost:8500", server.address))
        answer = sh("python query.py").stdout.splitlines()
        assert 'name: "features"' in answer[0]
        labels = re.findall(r"b'(\w+)'", answer[-1])
        truth = _test_labels()
        assert len(labels) == 5 and np.mean(np.asarray(labels) == truth) >= 0.8
        table = sh(predict.replace("localhost:8500", server.address)).stdout
        assert table.count("cancer: ") == 5 and table.count("cancer_softmax") == 5
        assert server.stop() == 0


def _test_labels() -> np.ndarray:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    order = np.random.default_rng(0).permutation(len(data.target))
    return np.asarray(data.target_names)[data.target[order[455:460]]]
