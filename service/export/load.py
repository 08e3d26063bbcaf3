"""Which Source a model becomes: dispatch on what `quorum export --model` names (a path by its
suffix, a Keras model or a fitted scikit-learn estimator) to the module that reads it. Above
the sources, so that source.py (what they share) imports none of them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from service.export.errors import UsageError
from service.export.source import Source, import_tensorflow

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
ONNX_SUFFIXES = (".onnx",)
SKLEARN_SUFFIXES = (".pkl", ".pickle", ".joblib")
KINDS = ("a .keras file, a SavedModel folder, an .onnx file, or a fitted scikit-learn "
         "classifier saved with pickle/joblib (.pkl, .pickle, .joblib)")


def load_source(model: Any, *, fmt: str, input_name: str | None, output: str | None,
                sample: np.ndarray) -> Source:
    """The model as a Source. `model` is a path, a Keras model or a fitted scikit-learn
    estimator; `sample` (raw training rows) tells probabilities from logits."""
    if not isinstance(model, (str, os.PathLike)):
        if hasattr(model, "predict_proba") or hasattr(model, "classes_"):
            from service.export.sklearn_source import from_estimator

            return from_estimator(model, input_name=input_name, sample=sample, output=output)
        from service.export.tf_source import from_keras

        return from_keras(model, input_name=input_name, sample=sample)
    path = Path(model)
    if not path.exists():
        raise UsageError(f"--model {path}: no such file or folder")
    suffix = path.suffix.lower()
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise UsageError(f"--model {path}: a folder, but not a SavedModel (no saved_model.pb); "
                             f"export reads {KINDS}")
        import_tensorflow()
        from service.export.tf_source import from_savedmodel

        return from_savedmodel(path, fmt=fmt, input_name=input_name, output=output, sample=sample)
    if suffix in ONNX_SUFFIXES:
        from service.export.onnx_source import from_onnx_file

        return from_onnx_file(path, input_name=input_name, output=output, sample=sample)
    if suffix in SKLEARN_SUFFIXES:
        from service.export.sklearn_source import from_file

        return from_file(path, input_name=input_name, output=output, sample=sample)
    if suffix in KERAS_SUFFIXES:
        import_tensorflow()
        from service.export.tf_source import from_keras_file

        return from_keras_file(path, input_name=input_name, sample=sample)
    raise UsageError(f"--model {path}: unknown kind of file '{suffix or path.name}'; export reads {KINDS}")
