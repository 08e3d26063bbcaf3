"""Shared fixtures: the bundled digits data, its saved split, scratch repositories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests.helpers import SPLIT


def pytest_addoption(parser):
    parser.addoption("--grpc-engines", default="grpcio,native",
                     help="comma-separated gRPC engines the end-to-end tests run on (tests/e2e/conftest.py)")


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return data.data.astype(np.float32), data.target.astype(np.int64)


@pytest.fixture(scope="session")
def split() -> dict[str, list[int]]:
    return json.loads(SPLIT.read_text())


@pytest.fixture(scope="session")
def test_split(digits, split) -> tuple[np.ndarray, np.ndarray]:
    x, y = digits
    idx = np.asarray(split["test"])
    return x[idx], y[idx]


@pytest.fixture
def scratch_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    return repo
