"""Export a trained classifier as one repository version: checkpoint + variant.json.

The exported graph maps *normalised* input to logits; normalisation statistics, the fitted
temperature, validation results and the drift reference go into the manifest, so that the
server applies them outside the graph and a row's output never depends on its batch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from service import __version__
from service.export import calibration, reference
from service.repository.manifest import (
    SCHEMA_VERSION, Calibration, Normalization, Provenance, SplitMetrics, TensorSpec, Validation,
    VariantManifest)

STD_EPSILON = 1e-6
OUTPUT_NAME = "logits"
ONNX_OPSET = 17
ARTIFACTS = {"onnx": "model.onnx", "savedmodel": "model.savedmodel"}
_STEPS = ("load", "normalise", "predict", "calibrate", "reference", "checkpoint", "publish")


@dataclass(frozen=True)
class _Graph:
    """The model as one tf.function with a fixed signature (dynamic batch), plus the object
    owning its variables (tracked when writing a SavedModel)."""

    fn: Any
    owner: Any
    input_name: str
    input_shape: tuple[int, ...]

    def predict(self, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        parts = [self.fn(tf.constant(x[i:i + batch]))[OUTPUT_NAME].numpy()
                 for i in range(0, len(x), batch)]
        return np.concatenate(parts).astype(np.float32)


def _signature(name: str, shape: Sequence[int | None]) -> list[tf.TensorSpec]:
    # The TensorSpec name becomes the ONNX input name and the SavedModel signature key.
    return [tf.TensorSpec([None, *shape[1:]], tf.float32, name=name)]


def _from_keras(model: Any) -> _Graph:
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError("export needs a model with exactly one input and one output")
    name = model.inputs[0].name
    spec = _signature(name, model.inputs[0].shape)

    @tf.function(input_signature=spec)
    def fn(x: tf.Tensor) -> dict[str, tf.Tensor]:
        # training=False: BatchNormalization uses its moving statistics, not the batch's.
        return {OUTPUT_NAME: model(x, training=False)}

    return _Graph(fn, model, name, (-1, *model.inputs[0].shape[1:]))


def _from_savedmodel(path: Path) -> _Graph:
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures["serving_default"]
    inputs = signature.structured_input_signature[1]
    outputs = signature.structured_outputs
    if len(inputs) != 1:
        raise ValueError(f"{path}: serving_default must take one input, has {sorted(inputs)}")
    out_key = OUTPUT_NAME if OUTPUT_NAME in outputs else next(iter(outputs))
    if len(outputs) != 1 and OUTPUT_NAME not in outputs:
        raise ValueError(f"{path}: cannot tell the logits among outputs {sorted(outputs)}")
    (name, in_spec), = inputs.items()
    spec = _signature(name, in_spec.shape)

    @tf.function(input_signature=spec)
    def fn(x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {OUTPUT_NAME: signature(**{name: x})[out_key]}

    return _Graph(fn, loaded, name, (-1, *in_spec.shape[1:]))


def load_graph(model: Any) -> _Graph:
    """A Keras model, a .keras file or a SavedModel directory, as a _Graph."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.is_dir():
            return _from_savedmodel(path)
        import keras  # only here: loading a SavedModel needs no Keras

        return _from_keras(keras.models.load_model(path, compile=False))
    return _from_keras(model)


def normalization_stats(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean/std of the flattened training rows. A (near-)constant feature gets
    std 1, not a tiny floor: a never-seen value there (a rare digits pixel) must not be
    blown up by 1/epsilon into an input the model has never seen (StandardScaler does so too)."""
    rows = np.asarray(x_train, dtype=np.float64).reshape(len(x_train), -1)
    std = rows.std(axis=0)
    return rows.mean(axis=0), np.where(std < STD_EPSILON, 1.0, std)


def normalize(x: np.ndarray, mean: np.ndarray, std: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    rows = (np.asarray(x, dtype=np.float64).reshape(len(x), -1) - mean) / std
    return rows.astype(np.float32).reshape(len(x), *shape[1:])


def next_version(model_dir: Path) -> int:
    """One more than the highest numeric version folder (versions only ever increase)."""
    versions = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def _write_onnx(graph: _Graph, path: Path) -> tuple[str, str]:
    import tf2onnx  # heavy; only needed for this format

    # Keras 3 models are not what tf2onnx.convert.from_keras expects; a tf.function with a
    # fixed input signature converts cleanly and keeps the batch dimension dynamic.
    proto, _ = tf2onnx.convert.from_function(graph.fn, input_signature=graph.fn.input_signature,
                                             opset=ONNX_OPSET, output_path=str(path))
    return proto.graph.input[0].name, proto.graph.output[0].name


def _write_savedmodel(graph: _Graph, path: Path) -> tuple[str, str]:
    module = tf.Module()
    module.owner = graph.owner  # tracks the variables the function captures
    tf.saved_model.save(module, str(path),
                        signatures={"serving_default": graph.fn.get_concrete_function()})
    return graph.input_name, OUTPUT_NAME


def _exported_at() -> str:
    # SOURCE_DATE_EPOCH (reproducible-builds convention) pins the timestamp for bundles.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return moment.isoformat(timespec="seconds")


def _check_logits(logits: np.ndarray) -> None:
    if np.all(logits >= 0) and np.allclose(logits.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("the model seems to output probabilities; export a graph that returns logits")


def export_variant(model: Any, *, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                   y_val: np.ndarray, val_indices: Sequence[int] | None, repository: str | Path,
                   name: str, labels: Sequence[str] | None, fmt: Literal["onnx", "savedmodel"],
                   version: int | None = None, architecture: str = "", seed: int | None = None,
                   source: str = "keras") -> Path:
    """Write `<repository>/<name>/<version>/` (checkpoint + variant.json) and return it.

    `model` takes normalised input and returns logits: a Keras model, a .keras file or a
    SavedModel directory. The version appears atomically (rename of a finished folder)."""
    if fmt not in ARTIFACTS:
        raise ValueError(f"format must be one of {sorted(ARTIFACTS)}, got {fmt!r}")
    if len(x_train) != len(y_train) or len(x_val) != len(y_val) or len(y_val) == 0:
        raise ValueError("x_train/y_train and x_val/y_val must pair up, and val must not be empty")
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(model_dir) if version is None else version
    target = model_dir / str(version)
    if target.exists():
        raise FileExistsError(f"{target} exists; versions are immutable, pick a new one")
    with tqdm(total=len(_STEPS), desc=f"export {name}/{version}", unit="step") as bar:
        def step(done: str) -> None:
            bar.set_postfix_str(done, refresh=False)  # the step just finished
            bar.update(1)

        graph = load_graph(model)
        step("load")
        mean, std = normalization_stats(x_train)
        xt, xv = (normalize(x, mean, std, graph.input_shape) for x in (x_train, x_val))
        step("normalise")
        val_logits, train_logits = graph.predict(xv), graph.predict(xt)
        _check_logits(val_logits)
        n_classes = val_logits.shape[1]
        if max(int(np.max(y_train)), int(np.max(y_val))) >= n_classes:
            raise ValueError(f"labels in y exceed the model's {n_classes} outputs")
        labels = tuple(labels) if labels is not None else tuple(str(i) for i in range(n_classes))
        if len(labels) != n_classes:
            raise ValueError(f"{len(labels)} labels for {n_classes} model outputs")
        step("predict")
        y_val = np.asarray(y_val, dtype=np.int64)
        temperature = calibration.fit_temperature(val_logits, y_val)
        val_probs = calibration.softmax(val_logits, temperature)
        validation = Validation(
            n=len(y_val),
            uncalibrated=SplitMetrics(**calibration.metrics(val_logits, y_val)),
            calibrated=SplitMetrics(**calibration.metrics(val_logits, y_val, temperature)),
            indices=tuple(int(i) for i in (range(len(y_val)) if val_indices is None else val_indices)),
            labels=tuple(int(y) for y in y_val),
            probabilities=tuple(tuple(float(p) for p in row) for row in val_probs))
        step("calibrate")
        drift = reference.build_reference(x_train, calibration.softmax(train_logits, temperature),
                                          input_name=graph.input_name, seed=seed or 0)
        step("reference")
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.staging-", dir=model_dir))
        staging.chmod(0o755)  # mkdtemp makes it owner-only; the server may run as another user
        try:
            in_name, out_name = (_write_onnx if fmt == "onnx" else _write_savedmodel)(
                graph, staging / ARTIFACTS[fmt])
            step("checkpoint")
            manifest = VariantManifest(
                schema_version=SCHEMA_VERSION, name=name, version=version, framework=fmt,
                artifact=ARTIFACTS[fmt],
                inputs=(TensorSpec(name=in_name, dtype="float32", shape=graph.input_shape),),
                outputs=(TensorSpec(name=out_name, dtype="float32", shape=(-1, n_classes)),),
                labels=labels,
                normalization=Normalization(mean=tuple(map(float, mean)), std=tuple(map(float, std))),
                calibration=Calibration(temperature=temperature),
                validation=validation, drift_reference=drift,
                provenance=Provenance(source=source, architecture=architecture, seed=seed,
                                      exported_at=_exported_at(), train_n=len(x_train),
                                      quorum_version=__version__))
            manifest.save(staging)
            # The server ignores non-numeric folders, so the version appears only now, whole.
            os.rename(staging, target)
            step("publish")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target
