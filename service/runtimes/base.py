"""The one runtime interface: load / predict / unload, with a ready flag.

A runtime owns one checkpoint on one device. It applies the manifest's frozen input
normalisation row-wise before the model and returns the model's logits; calibration and
voting happen above it. Compute runs on the runtime's own executor thread, never on the
event loop (ONNX Runtime and TensorFlow release the GIL while they compute).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from abc import ABC, abstractmethod
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from service.errors import InvalidInput, ModelNotReady
from service.repository.manifest import VariantManifest, feature_count

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "cpu"
    """Concrete device asked for: "cpu" or "gpu:N" (see devices.place)."""
    intra_op_threads: int = 0
    """Intra-op threads (0: the library's default)."""
    batch_invariance: Literal["strict", "tolerant"] = "tolerant"
    """strict: every batch is padded to `max_batch_size` rows, so each row's output is
    bitwise independent of the other rows; tolerant: batches run at their own size."""
    max_batch_size: int = 64
    executor: Executor | None = None
    """Where batches run, when shared with other models (compute_threads); None: the
    runtime's own thread."""


class Runtime(ABC):
    framework: str = ""

    def __init__(self, folder: Path, manifest: VariantManifest, options: RuntimeOptions) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.options = options
        self.device = options.device  # the device actually obtained, set by _load
        self.ready = False
        self.warmup_latency_s = 0.0
        spec = manifest.input
        self._row_shape = tuple(spec.shape[1:])
        self._features = feature_count(spec)
        self._dtype = np.dtype(spec.dtype)
        self._mean = np.asarray(manifest.normalization.mean, dtype=self._dtype)
        self._scale = (1.0 / np.asarray(manifest.normalization.std, dtype=np.float64)).astype(self._dtype)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rt-{manifest.name}")

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    # -- lifecycle -------------------------------------------------------------------------
    async def load(self) -> None:
        """Load the checkpoint onto its device and warm it up, off the event loop."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load_and_warm)
        self.ready = True
        log.info("loaded %s version %d (%s) on %s", self.name, self.version, self.framework, self.device)

    async def unload(self) -> None:
        self.ready = False
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._unload)
        self._executor.shutdown(wait=True)

    def _load_and_warm(self) -> None:
        self._load()
        # Warm-up compiles kernels and allocates arenas for the shapes traffic will use.
        for rows in {1, self.options.max_batch_size}:
            self._run_padded(np.zeros((rows, *self._row_shape), dtype=self._dtype))
        # One timed single-row run: the latency estimate until live measurements exist.
        start = time.perf_counter()
        self._run_padded(np.zeros((1, *self._row_shape), dtype=self._dtype))
        self.warmup_latency_s = time.perf_counter() - start

    def rows_within(self, seconds: float) -> int:
        """Most rows one batch may hold and still compute within `seconds`, by the warm-up's
        timing (0: not even one). Strict mode pads every batch to one shape, so any batch up to
        the max batch size costs the warm-up's run; tolerant mode is taken to grow with the
        rows (an upper bound: a row costs less in a larger batch)."""
        once = self.warmup_latency_s
        if not 0 < once < seconds:
            return 0
        size = self.options.max_batch_size
        return size if self.options.batch_invariance != "tolerant" else min(size, math.ceil(seconds / once) - 1)

    @property
    def artifact_mb(self) -> float:
        """Size of the checkpoint on disk: the memory estimate for satisficing."""
        path = self.folder / self.manifest.artifact
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        return sum(p.stat().st_size for p in files) / 2**20

    # -- inference -------------------------------------------------------------------------
    async def predict(self, rows: np.ndarray) -> np.ndarray:
        """Logits for `rows` (shape (n, *input_shape)), computed on the executor."""
        self._check_ready()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.options.executor or self._executor, self.predict_sync, rows)

    def predict_here(self, rows: np.ndarray) -> np.ndarray:
        """What predict computes, on the calling thread (a lone request to a fast model, on
        the event loop: settings.inline_compute_us)."""
        self._check_ready()
        return self.predict_sync(rows)

    def _check_ready(self) -> None:
        if not self.ready:
            raise ModelNotReady(f"model '{self.name}' version {self.version} is not loaded")

    def predict_sync(self, rows: np.ndarray) -> np.ndarray:
        return self._run_padded(self.normalize(self.check_input(rows)))

    def check_input(self, rows: np.ndarray) -> np.ndarray:
        spec = self.manifest.input
        # Rows arrive either in the input's own shape or flattened to (n, features).
        if rows.ndim == 2 and rows.shape[1] == self._features:
            rows = rows.reshape((rows.shape[0], *self._row_shape))
        if rows.shape[1:] != self._row_shape:
            raise InvalidInput(
                f"model '{self.name}' input '{spec.name}' expects shape "
                f"{list(spec.shape)}, got {list(rows.shape)}")
        if rows.shape[0] == 0:
            raise InvalidInput(f"model '{self.name}' input '{spec.name}': empty batch")
        return rows

    def normalize(self, rows: np.ndarray) -> np.ndarray:
        """(x - mean) / std with the training split's frozen statistics, row by row."""
        flat = rows.reshape(rows.shape[0], self._features).astype(self._dtype, copy=False)
        out = np.subtract(flat, self._mean)  # one new array, scaled in place: same values
        np.multiply(out, self._scale, out=out)
        return out.reshape(rows.shape)

    def _run_padded(self, rows: np.ndarray) -> np.ndarray:
        if self.options.batch_invariance == "tolerant":
            return self._run(rows)
        size = self.options.max_batch_size
        out = []
        for start in range(0, rows.shape[0], size):
            chunk = rows[start:start + size]
            padded = np.zeros((size, *chunk.shape[1:]), dtype=chunk.dtype)
            padded[: chunk.shape[0]] = chunk
            out.append(self._run(padded)[: chunk.shape[0]])
        return out[0] if len(out) == 1 else np.concatenate(out)

    # -- framework hooks -------------------------------------------------------------------
    @abstractmethod
    def _load(self) -> None:
        """Load the checkpoint; set self.device to the device actually obtained."""

    @abstractmethod
    def _run(self, rows: np.ndarray) -> np.ndarray:
        """Run the graph on normalised rows; return float logits (n, classes)."""

    def _unload(self) -> None:
        """Release the checkpoint."""
