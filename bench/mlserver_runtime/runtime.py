"""A minimal MLServer 1.7.1 runtime for a Quorum ONNX variant: the same work as Quorum's
ONNX runtime (frozen normalisation from variant.json, then ONNX Runtime), no more.

Loaded by MLServer from bench/.venv-mlserver (see bench/setup_mlserver.sh); it imports
nothing from Quorum, whose protobuf pins conflict with MLServer's.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class QuorumOnnxRuntime(MLModel):
    async def load(self) -> bool:
        folder = Path(await get_model_uri(self._settings))
        manifest = json.loads((folder / "variant.json").read_text())
        self._mean = np.asarray(manifest["normalization"]["mean"], dtype=np.float32)
        self._scale = (1.0 / np.asarray(manifest["normalization"]["std"], dtype=np.float64)).astype(np.float32)
        self._shape = tuple(manifest["inputs"][0]["shape"][1:])
        self._input = manifest["inputs"][0]["name"]
        self._output = manifest["outputs"][0]["name"]
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as Quorum
        self._session = ort.InferenceSession(str(folder / manifest["artifact"]), options,
                                             providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        n = rows.shape[0]
        flat = (rows.reshape(n, -1) - self._mean) * self._scale
        logits = self._session.run([self._output], {self._input: flat.reshape(n, *self._shape)})[0]
        return InferenceResponse(model_name=self.name, model_version=self.version,
                                 outputs=[NumpyCodec.encode_output(self._output, logits)])
