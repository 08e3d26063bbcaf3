"""ONNX Runtime: CUDAExecutionProvider when a GPU is asked for and present, else the CPU."""

from __future__ import annotations

import logging

import numpy as np

from service.errors import ModelLoadError
from service.runtimes.base import Runtime
from service.runtimes.devices import gpu_index

log = logging.getLogger(__name__)


class OnnxRuntime(Runtime):
    framework = "onnx"

    def _load(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.options.intra_op_threads:
            options.intra_op_num_threads = self.options.intra_op_threads
        options.inter_op_num_threads = 1
        # No busy-waiting intra-op threads between runs: they steal the cores the event loop,
        # the other members and the client need (MobileNetV2 x3 on 2 cores: 16 -> 58 rows/s).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        index = gpu_index(self.options.device)
        if index is not None:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        path = self.folder / self.manifest.artifact
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(str(self.folder), f"'{self.manifest.artifact}' is not a loadable ONNX model: {exc}") from exc
        got = self._session.get_providers()[0]
        self.device = f"gpu:{index}" if got == "CUDAExecutionProvider" else "cpu"
        if index is not None and self.device == "cpu":
            log.warning("%s: CUDAExecutionProvider unavailable, running on the CPU", self.name)
        log.info("%s version %d: ONNX Runtime provider %s", self.name, self.version, got)
        names = {i.name for i in self._session.get_inputs()}
        if self.manifest.input.name not in names:
            raise ModelLoadError(str(self.folder), f"manifest input '{self.manifest.input.name}' not in graph inputs {sorted(names)}")
        self._input = self.manifest.input.name
        self._outputs = [self.manifest.output.name]

    def _run(self, rows: np.ndarray) -> np.ndarray:
        return self._session.run(self._outputs, {self._input: rows})[0]

    def _unload(self) -> None:
        self._session = None
