"""Device discovery and placement: which device each variant runs on.

GPUs are counted through NVML (nvidia-ml-py, the `gpu` extra) so that discovery never has
to import a framework; without NVML or a driver, there are none.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

log = logging.getLogger(__name__)

_DEVICE = re.compile(r"^(auto|cpu|gpu)(?::(\d+))?$")


@lru_cache(maxsize=1)
def gpu_count() -> int:
    try:
        import pynvml  # nvidia-ml-py, in the gpu extra
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:  # no driver, no device: NVML raises its own error types
        return 0


def validate_device(spec: str) -> str:
    """Normalise and check a device spec: auto, cpu, gpu or gpu:N."""
    spec = spec.strip().lower()
    match = _DEVICE.match(spec)
    if not match or (match.group(1) != "gpu" and match.group(2) is not None):
        raise ValueError(f"device must be auto, cpu, gpu or gpu:N, got '{spec}'")
    return spec


def place(spec: str, slot: int, gpus: int | None = None) -> str:
    """The concrete device ("cpu" or "gpu:N") for the `slot`-th variant asking for `spec`.

    `auto` and `gpu` spread variants round-robin over the visible GPUs; `auto` falls back
    to the CPU when none is visible, `gpu` and `gpu:N` fail instead of silently degrading.
    """
    spec = validate_device(spec)
    gpus = gpu_count() if gpus is None else gpus
    if spec == "cpu" or (spec == "auto" and gpus == 0):
        return "cpu"
    if gpus == 0:
        raise ValueError(f"device '{spec}' asked for, but no GPU is visible")
    if spec in ("auto", "gpu"):
        return f"gpu:{slot % gpus}"
    index = int(spec.split(":")[1])
    if index >= gpus:
        raise ValueError(f"device '{spec}' asked for, but only {gpus} GPU(s) are visible")
    return spec


def gpu_index(device: str) -> int | None:
    return int(device.split(":")[1]) if device.startswith("gpu:") else None
