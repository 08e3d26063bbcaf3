"""Test helpers shared across modules: where the bundled models are, copying variants."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

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
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
