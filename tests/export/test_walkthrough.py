"""docs/walkthrough.md, run as written: its code blocks in order, in a new shell without the
virtual environment on its PATH (tests/docs/commands.py fresh_shell) whose home is a folder
of this test's, from the repository root as commands see it. The page's set-up block
(`source .venv/bin/activate`, then to an empty folder under ~) runs first, literally; each
later block runs in a shell in the state it left (its environment and folder), as the page's
"another shell, the two set-up lines again" does. The `quorum serve` line runs as written
too, with only its ports changed (tests/docs/commands.py serving), and the clients' `localhost:8500`
is pointed at it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np

from tests.docs.commands import Command, checkout, commands, fresh_shell, serving
from tests.helpers import ROOT

DOC = ROOT / "docs" / "walkthrough.md"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
SERVE = "quorum serve --model-repository my_models"


def blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall(DOC.read_text())]


def documented() -> list[Command]:
    """The documented commands this module runs (tests/docs/test_every_command.py)."""
    return commands(DOC)


def set_up(setup: str, root: Path, home: Path) -> tuple[dict[str, str], Path]:
    """The page's set-up lines, run in a new shell in the repository root: the environment
    and the folder they leave that shell in."""
    env = {**fresh_shell(), "HOME": str(home)}
    assert subprocess.run(["bash", "-c", "command -v quorum"], env=env, capture_output=True).returncode == 1
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", f"{setup}\nenv -0"], cwd=root, env=env,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    state = dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)
    return state, Path(state["PWD"])


def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    found = blocks()
    langs = [lang for lang, _ in found]
    assert langs == ["bash", "python", "bash", "bash", "bash", "python", "bash"], langs
    (_, setup), (_, train), (_, export), (_, ensemble), (_, serve), (_, query), (_, predict) = found
    env, work = set_up(setup, checkout(tmp_path / "root"), home)
    assert work.parent == home and not any(work.iterdir())  # an empty folder
    assert Path(env["VIRTUAL_ENV"]).resolve() == (ROOT / ".venv").resolve()

    def sh(command: str) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        return done

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
    with serving(serve, work, tmp_path / "server.log", shell_env=env) as server:
        address = f"localhost:{server.grpc_port}"
        (work / "query.py").write_text(query.replace("localhost:8500", address))
        answer = sh("python query.py").stdout.splitlines()
        assert 'name: "features"' in answer[0]
        labels = re.findall(r"b'(\w+)'", answer[-1])
        truth = _test_labels()
        assert len(labels) == 5 and np.mean(np.asarray(labels) == truth) >= 0.8
        table = sh(predict.replace("localhost:8500", address)).stdout
        assert table.count("cancer: ") == 5 and table.count("cancer_softmax") == 5
        assert server.stop() == 0


def _test_labels() -> np.ndarray:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    order = np.random.default_rng(0).permutation(len(data.target))
    return np.asarray(data.target_names)[data.target[order[455:460]]]
