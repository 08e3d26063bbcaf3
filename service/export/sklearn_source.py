"""Fitted scikit-learn classifiers (a pickle or joblib file, or the object), converted to ONNX
by skl2onnx and then rewired like any ONNX graph (see onnx_source).

Unpickling runs code from the file: export only files you made or trust.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from service.export.errors import ExportError
from service.export.onnx_source import OnnxSource, from_onnx_proto
from service.export.source import ONNX_OPSET, Hints

ML_OPSET = 3
DEFAULT_INPUT = "features"


def from_estimator(estimator: Any, *, input_name: str | None, sample: np.ndarray,
                   output: str | None = None, origin: str = "the scikit-learn model") -> OnnxSource:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    if not hasattr(estimator, "classes_"):
        raise ExportError(f"{origin}: {type(estimator).__name__} is not a fitted classifier "
                          "(it has no classes_: call fit first, or export a classifier)")
    if not hasattr(estimator, "predict_proba"):
        raise ExportError(f"{origin}: {type(estimator).__name__} has no predict_proba "
                          "(e.g. SVC needs probability=True)")
    n_features = getattr(estimator, "n_features_in_", None)
    if n_features is None:
        n_features = int(np.prod(np.asarray(sample).shape[1:]))
    name = input_name or DEFAULT_INPUT
    try:
        proto = to_onnx(estimator, initial_types=[(name, FloatTensorType([None, int(n_features)]))],
                        target_opset={"": ONNX_OPSET, "ai.onnx.ml": ML_OPSET})
    except Exception as exc:  # skl2onnx raises RuntimeError/NotImplementedError/...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{origin}: skl2onnx cannot convert {type(estimator).__name__}: {first}") from exc
    hints = Hints(classes=tuple(estimator.classes_.tolist()), default_model_input="raw")
    return from_onnx_proto(proto, origin=origin, input_name=None, output=output, sample=sample,
                           family="sklearn", hints=hints)


def from_file(path: Path, *, input_name: str | None, output: str | None, sample: np.ndarray) -> OnnxSource:
    import joblib  # reads plain pickles too

    try:
        estimator = joblib.load(path)
    except Exception as exc:  # whatever unpickling raises
        raise ExportError(f"--model {path}: cannot unpickle it ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    return from_estimator(estimator, input_name=input_name, sample=sample, output=output,
                          origin=f"--model {path}")
