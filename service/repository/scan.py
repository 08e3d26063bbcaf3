"""Reading the repository's layout: which models exist, of which kind, with which versions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from service.repository.config import ENSEMBLE_CONFIG

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    kind: Literal["variant", "ensemble"]
    versions: frozenset[int] = frozenset()


def valid_model_name(name: str) -> bool:
    """Names come from clients too: a plain folder name, no separators, no '..'."""
    return bool(MODEL_NAME.match(name)) and ".." not in name


def scan_model(root: Path, name: str) -> ModelEntry | None:
    path = root / name
    if not valid_model_name(name) or not path.is_dir():
        return None
    if (path / ENSEMBLE_CONFIG).is_file():
        return ModelEntry(name, path, "ensemble")
    # Versions are integer folder names; a folder being written (e.g. '.tmp-3') is not one.
    versions = frozenset(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
    return ModelEntry(name, path, "variant", versions) if versions else None


def scan_repository(root: Path) -> dict[str, ModelEntry]:
    if not root.is_dir():
        raise FileNotFoundError(f"model repository '{root}' is not a folder")
    entries = (scan_model(root, p.name) for p in sorted(root.iterdir()))
    return {e.name: e for e in entries if e is not None}
