"""Finding the Prometheus binaries (`make test` installs Debian's `prometheus` package)."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import ROOT

DEPLOY = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "quorum-dashboard.json"


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make test` installs Debian's prometheus package")
    return path
