"""Test helpers shared across modules: where the bundled models are, copying variants."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
SPLIT = MODELS / "digits_split.json"
VARIANTS = sorted(p.name for p in MODELS.iterdir() if p.is_dir() and (p / "1").is_dir())


def _framework(name: str) -> str:
    return json.loads((MODELS / name / "1" / "variant.json").read_text())["framework"]


ONNX_VARIANT = next(v for v in VARIANTS if _framework(v) == "onnx")
SAVEDMODEL_VARIANT = next(v for v in VARIANTS if _framework(v) == "savedmodel")


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


async def monitored_data_plane():
    """The bundled repository loaded on the CPU and served by a data plane the monitor
    observes, as the server wires them: (data plane, monitor). Stop data.manager after."""
    from service.dataplane import DataPlane
    from service.monitoring.monitor import Monitor
    from service.monitoring.statistics import Statistics
    from service.repository.manager import ModelManager
    from service.settings import Settings

    settings = Settings(model_repository=MODELS, poll_interval_s=0, device="cpu")
    monitor = Monitor(settings, Statistics())
    manager = ModelManager(settings, monitor)
    await manager.start()
    data = DataPlane(manager, observer=monitor)
    monitor.attach(manager, data.feedback, data.trackers, data.queued)
    return data, monitor
