"""Test helpers shared across modules: where the bundled models are, copying variants."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
SPLIT = MODELS / "digits_split.json"
VARIANTS = sorted(p.name for p in MODELS.iterdir() if p.is_dir() and (p / "1").is_dir())


def _framework(name: str) -> str:
    return json.loads((MODELS / name / "1" / "variant.json").read_text())["framework"]


ONNX_VARIANT = next(v for v in VARIANTS if _framework(v) == "onnx")
SAVEDMODEL_VARIANT = next(v for v in VARIANTS if _framework(v) == "savedmodel")
ONNX_VARIANTS = tuple(v for v in VARIANTS if _framework(v) == "onnx")


@functools.cache
def onnx_models() -> Path:
    """The bundled repository less its SavedModel members: the ONNX variants unchanged, and
    each bundled ensemble (same policy, objective, batching) over the ONNX members it names.

    The default repository of the servers tests start (tests/server.py) and of the answers
    they expect (tests/e2e/fixtures.py Reference): a server of ONNX members alone never
    imports TensorFlow, so it is SERVING in about a second instead of several. TensorFlow's
    path keeps its own tests, on the bundled repository itself (test_tensorflow_on_demand,
    tests/runtimes). Built once per test process, removed at its exit."""
    root = Path(tempfile.mkdtemp(prefix="quorum-onnx-models-")) / "models"
    atexit.register(shutil.rmtree, root.parent, True)
    for name in ONNX_VARIANTS:
        shutil.copytree(MODELS / name, root / name)
    for ensemble in sorted(p.parent.name for p in MODELS.glob("*/ensemble.yaml")):
        config = yaml.safe_load((MODELS / ensemble / "ensemble.yaml").read_text())
        config["members"] = [m for m in config["members"] if m in ONNX_VARIANTS]
        (root / ensemble).mkdir()
        (root / ensemble / "ensemble.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def onnx_ensemble(root: Path, *, policy: str = "confidence", linger_s: float | None = None,
                  name: str = "digits") -> Path:
    """A repository at `root` of the bundled ONNX variants and one ensemble of them; with
    `linger_s`, the ensemble's batches wait that long to fill (requests pile up in its queue)."""
    for variant in ONNX_VARIANTS:
        shutil.copytree(MODELS / variant, root / variant)
    config: dict = {"members": list(ONNX_VARIANTS), "policy": policy}
    if linger_s is not None:
        config["batching"] = {"max_batch_size": 256, "max_queue_delay_us": int(linger_s * 1e6)}
    (root / name).mkdir()
    (root / name / "ensemble.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def copy_variant(name: str, repo: Path, version: int = 1, source_version: int = 1,
                 as_name: str | None = None) -> Path:
    """Copy a bundled variant into `repo` as `as_name/version`, rewriting its manifest."""
    target_name = as_name or name
    dst = repo / target_name / str(version)
    shutil.copytree(MODELS / name / str(source_version), dst)
    manifest = json.loads((dst / "variant.json").read_text())
    manifest["name"], manifest["version"] = target_name, version
    (dst / "variant.json").write_text(json.dumps(manifest))
    return dst


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free ports: the sockets are held open together while the kernel picks, so
    two of one server's ports can never come out the same (picked one by one, a port freed
    by the first pick could be handed out again by the next)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def batch_deviation(predict, rows: np.ndarray, seed: int = 0) -> float:
    """Does a row's output depend on what it was batched with? Each row run alone, then all
    together in a shuffled order: the largest absolute difference for the same row (0.0 means
    bitwise identical)."""
    alone = np.concatenate([predict(rows[i:i + 1]) for i in range(rows.shape[0])])
    order = np.random.default_rng(seed).permutation(rows.shape[0])
    together = np.empty_like(alone)
    together[order] = predict(rows[order])
    return float(np.max(np.abs(alone.astype(np.float64) - together.astype(np.float64))))


async def monitored_data_plane(repository: Path = MODELS, **manager):
    """`repository` (by default the bundled one) loaded on the CPU and served by a data
    plane the monitor observes, as the server wires them: (data plane, monitor). `manager`:
    ModelManager's keyword arguments (its clock). Stop data.manager after."""
    from service.dataplane import DataPlane
    from service.monitoring.monitor import Monitor
    from service.monitoring.statistics import Statistics
    from service.repository.manager import ModelManager
    from service.settings import Settings

    settings = Settings(model_repository=repository, poll_interval_s=0, device="cpu")
    monitor = Monitor(settings, Statistics())
    manager = ModelManager(settings, monitor, **manager)
    await manager.start()
    data = DataPlane(manager, observer=monitor)
    monitor.attach(manager, data.feedback, data.trackers, data.queued)
    return data, monitor


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60, interval: float = 0.1) -> Any:
    """condition()'s first truthy value, asked every `interval` s; TimeoutError naming `what`
    after `timeout` s (a failure, not a timing: the tests wait for a state, never a duration)."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"not {what} after {timeout:g} s")
        time.sleep(interval)
