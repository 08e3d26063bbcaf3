"""The pins the image's dependency layer installs (scripts/image_requirements.py), against
pyproject.toml: the CPU image gets the main dependencies, the GPU image the same with
onnxruntime-gpu in place of onnxruntime (one `onnxruntime` module per environment)."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from tests.deploy.manifests import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "image_requirements.py"), *args],
                         stdin=open(ROOT / "pyproject.toml", "rb"), capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_cpu_image_installs_the_main_dependencies():
    assert _pins() == PYPROJECT["dependencies"]


def test_gpu_image_swaps_onnxruntime_for_the_gpu_extra():
    pins = _pins("--gpu")
    names = {p.split("==")[0] for p in pins}
    assert "onnxruntime" not in names and "onnxruntime-gpu" in names
    assert set(pins) == {p for p in PYPROJECT["dependencies"] if not p.startswith("onnxruntime==")} | set(
        PYPROJECT["optional-dependencies"]["gpu"])
