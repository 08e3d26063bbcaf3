"""What every kind of model becomes before export: one graph from one float32 input to logits.

A `Source` predicts logits for rows (already normalised or raw, as the model takes them),
says what its logits are (`output_kind`), and writes itself as a checkpoint in the formats it
supports. `load_source` picks the reader from what the user passed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.export.errors import ExportError

OUTPUT_NAME = "logits"
ONNX_OPSET = 17
PROB_EPSILON = 1e-12
"""Probabilities are floored here before the log, so a class a model gives exactly 0 (a tree
ensemble's leaf) keeps a finite logit, log(1e-12) = -27.6."""



@dataclass(frozen=True)
class Hints:
    """What a source knows beyond its graph, used for defaults and warnings."""

    classes: tuple[Any, ...] | None = None
    """The model's own class values in output order (scikit-learn's classes_)."""
    default_model_input: str = "normalised"
    """What the model takes unless told: scikit-learn estimators are fitted on raw features."""
    normalisation_layers: tuple[str, ...] = field(default_factory=tuple)
    """Layers that normalise inside the graph (a Keras Normalization layer)."""


class Source(Protocol):
    family: str
    """keras, savedmodel, onnx or sklearn."""
    formats: tuple[str, ...]
    """Checkpoint formats this source can be written as."""
    input_name: str
    input_shape: tuple[int, ...]
    output_kind: str
    """What the logits are, for the output and the manifest's provenance."""
    hints: Hints

    def predict(self, x: np.ndarray) -> np.ndarray: ...

    def write(self, fmt: str, path: Path) -> tuple[str, str]:
        """Write the checkpoint; returns the graph's (input name, output name)."""
        ...


def import_tensorflow() -> Any:
    """TensorFlow and Keras, imported with native stderr silenced: their C++ start-up chatter
    (no CUDA drivers, absl's log preamble) would bury an export's one-line messages."""
    import sys

    from service.tf_protos import tensorflow_loaded

    if not tensorflow_loaded():
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            import keras  # noqa: F401  (imports tensorflow)
            import tensorflow as tf
            tf.config.list_physical_devices()  # the device probe logs too
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
    import tensorflow as tf

    return tf


def looks_like_probabilities(values: np.ndarray) -> bool:
    """Non-negative rows summing to 1 (softmax), or one column within [0, 1] (sigmoid)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or len(values) == 0 or not np.all(np.isfinite(values)):
        return False
    # float32 sums of tree leaves land a few ulps outside [0, 1]
    if values.shape[1] == 1:
        return bool(np.all((values >= -1e-5) & (values <= 1 + 1e-5)))
    return bool(np.all(values >= -1e-5) and np.allclose(values.sum(axis=1), 1.0, atol=1e-4))


def fit_rows(x: np.ndarray, shape: tuple[int | None, ...], input_name: str, array: str = "x_train") -> np.ndarray:
    """`x` reshaped to the model's input, or an error naming the array, its shape and the input's."""
    x = np.asarray(x)
    width = int(np.prod(x.shape[1:])) if x.ndim >= 2 else (1 if x.ndim == 1 else 0)
    static = [d for d in shape[1:] if d is not None]
    if len(static) != len(shape) - 1:  # np.prod would raise a TypeError on the None
        raise ExportError(f"the model's input '{input_name}' has shape {list(shape)}: export needs static "
                          "dimensions after the batch")
    want = int(np.prod(static))
    if x.ndim < 2 or width != want:
        raise ExportError(f"--data: {array} has shape {list(x.shape)}, rows of {width} values, but the "
                          f"model's input '{input_name}' takes {list((-1, *shape[1:]))}, {want} values per row")
    return x.reshape(len(x), *shape[1:]).astype(np.float32, copy=False)
