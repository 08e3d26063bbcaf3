"""The image's dependency pins, read from pyproject.toml, one per line.

    python scripts/image_requirements.py [--gpu] < pyproject.toml > requirements.txt

The Dockerfile installs these before copying the sources, so that layer (the slow one:
TensorFlow) is rebuilt only when pyproject.toml changes. `--gpu` adds the `gpu` extra and
drops `onnxruntime`: the CPU and GPU wheels both install the `onnxruntime` module and
cannot share one environment, so the GPU image never installs the CPU one.
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(pyproject: dict, gpu: bool) -> list[str]:
    project = pyproject["project"]
    pins = list(project["dependencies"])
    if gpu:
        pins = [p for p in pins if re.split(r"[=<>!~\[; ]", p, maxsplit=1)[0] != "onnxruntime"]
        pins += project["optional-dependencies"]["gpu"]
    return pins


if __name__ == "__main__":
    print("\n".join(requirements(tomllib.load(sys.stdin.buffer), gpu="--gpu" in sys.argv[1:])))
