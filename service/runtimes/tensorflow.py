"""TensorFlow SavedModel: the manifest's serving signature, placed with tf.device."""

from __future__ import annotations

import logging
import threading

import numpy as np

from service.errors import ModelLoadError
from service.runtimes.base import Runtime
from service.runtimes.devices import gpu_index

log = logging.getLogger(__name__)

_configured = threading.Lock()
_done = False


def _configure_tensorflow(intra_op_threads: int):
    """Process-wide TF settings, applied once before TF initialises its devices."""
    global _done
    import tensorflow as tf

    with _configured:
        if not _done:
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)  # share GPUs with ORT
            if intra_op_threads:
                tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
            _done = True
    return tf


class SavedModelRuntime(Runtime):
    framework = "savedmodel"

    def _load(self) -> None:
        tf = _configure_tensorflow(self.options.intra_op_threads)
        index = gpu_index(self.options.device)
        has_gpu = index is not None and index < len(tf.config.list_physical_devices("GPU"))
        self.device = f"gpu:{index}" if has_gpu else "cpu"
        self._tf_device = f"/GPU:{index}" if has_gpu else "/CPU:0"
        if index is not None and not has_gpu:
            log.warning("%s: TensorFlow sees no GPU %d, running on the CPU", self.name, index)
        path = self.folder / self.manifest.artifact
        try:
            with tf.device(self._tf_device):
                self._model = tf.saved_model.load(str(path))
        except Exception as exc:  # TF raises many types for a bad SavedModel
            raise ModelLoadError(str(self.folder), f"'{self.manifest.artifact}' is not a loadable SavedModel: {exc}") from exc
        signature = self.manifest.signature
        if signature not in self._model.signatures:
            raise ModelLoadError(str(self.folder), f"signature '{signature}' not in {sorted(self._model.signatures)}")
        self._fn = self._model.signatures[signature]
        inputs = set(self._fn.structured_input_signature[1])
        if self.manifest.input.name not in inputs:
            raise ModelLoadError(str(self.folder), f"manifest input '{self.manifest.input.name}' not in signature inputs {sorted(inputs)}")
        self._input = self.manifest.input.name
        self._output = self.manifest.output.name
        self._tf = tf

    def _run(self, rows: np.ndarray) -> np.ndarray:
        with self._tf.device(self._tf_device):
            return self._fn(**{self._input: self._tf.constant(rows)})[self._output].numpy()

    def _unload(self) -> None:
        self._fn = None
        self._model = None
