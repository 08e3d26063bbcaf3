"""Keras models and SavedModels as one tf.function from the input to logits.

A Keras classifier usually ends in a softmax (or, for two classes, a one-unit sigmoid): the
export takes the logits before that head, so calibration scales real logits. A graph whose
head cannot be cut off (a SavedModel returning probabilities) is exported as
log-probabilities, which give the same softmax.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from service.export.errors import ExportError, UsageError
from service.export.source import (
    ONNX_OPSET, OUTPUT_NAME, PROB_EPSILON, Hints, fit_rows, import_tensorflow, looks_like_probabilities)


def _tf():
    # here: `quorum --help` and the ONNX sources do not pay for TensorFlow
    return import_tensorflow()


@dataclass
class TFSource:
    """The model as a tf.function with a fixed signature (dynamic batch), plus the object
    owning its variables (tracked when writing a SavedModel)."""

    family: str
    fn: Any
    owner: Any
    input_name: str
    input_shape: tuple[int, ...]
    output_kind: str
    hints: Hints
    formats: tuple[str, ...] = ("onnx", "savedmodel")

    def predict(self, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        tf = _tf()
        parts = [self.fn(tf.constant(x[i:i + batch]))[OUTPUT_NAME].numpy()
                 for i in range(0, len(x), batch)]
        return np.concatenate(parts).astype(np.float32)

    def write(self, fmt: str, path: Path) -> tuple[str, str]:
        return (_write_onnx if fmt == "onnx" else _write_savedmodel)(self, path)


def _signature(name: str, shape: Sequence[int | None]) -> list:
    tf = _tf()
    if any(d is None for d in shape[1:]):
        raise ExportError(f"input '{name}' has shape {list(shape)}: export needs static "
                          "dimensions after the batch")
    # The TensorSpec name becomes the ONNX input name and the SavedModel signature key.
    return [tf.TensorSpec([None, *shape[1:]], tf.float32, name=name)]


def _log_probabilities(tf, probs):
    """Log-probabilities from a softmax output, or [log(1-p), log(p)] from one sigmoid column."""
    probs = tf.cast(probs, tf.float32)
    if probs.shape[-1] == 1:
        probs = tf.concat([1.0 - probs, probs], axis=-1)
    return tf.math.log(tf.maximum(probs, PROB_EPSILON))


def _keras_head(model: Any, input_name: str) -> tuple[Callable, str]:
    """(a function from the input to logits, what they are), cutting off a softmax or
    sigmoid head when the graph ends in one."""
    import keras

    layer = model.outputs[0]._keras_history[0]
    activation = getattr(getattr(layer, "activation", None), "__name__", "")
    if isinstance(layer, keras.layers.Softmax):
        activation = "softmax"
    units = model.outputs[0].shape[-1]
    if activation not in ("softmax", "sigmoid"):
        return (lambda x: model(x, training=False)), "logits (the model's own output)"
    if activation == "sigmoid" and units != 1:
        raise ExportError(f"the model ends in a sigmoid over {units} outputs (multi-label); "
                          "export needs one label per row: a softmax, or one sigmoid unit for two classes")
    inner = keras.Model(model.inputs, layer.input)
    dense = isinstance(layer, keras.layers.Dense)

    def logits(x):
        z = inner(x, training=False)
        if dense:  # the Dense layer's own affine map, without its activation
            z = keras.ops.matmul(z, layer.kernel)
            if layer.use_bias:
                z = z + layer.bias
        if activation == "sigmoid":  # softmax([0, z]) == [1 - sigmoid(z), sigmoid(z)]
            z = keras.ops.concatenate([keras.ops.zeros_like(z), z], axis=-1)
        return z

    return logits, f"logits before the {activation} head ('{layer.name}')"


def from_keras(model: Any, *, input_name: str | None, sample: np.ndarray) -> TFSource:
    import keras

    tf = _tf()
    if not hasattr(model, "inputs") or not hasattr(model, "outputs"):
        raise ExportError(f"a {type(model).__name__} has no symbolic inputs and outputs: export needs a "
                          "functional or Sequential Keras model (or save it as a SavedModel)")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ExportError(f"export needs a model with exactly one input and one output, this one has "
                          f"{len(model.inputs)} inputs and {len(model.outputs)} outputs")
    name = input_name or model.inputs[0].name
    spec = _signature(name, model.inputs[0].shape)
    head, kind = _keras_head(model, name)
    probs_out = False
    if kind.startswith("logits (the"):  # no head to cut: does the output look like probabilities?
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = np.asarray(model(fit_rows(sample[:256], model.inputs[0].shape, name), training=False))
        if looks_like_probabilities(probe):
            probs_out, kind = True, "log-probabilities (the model's output looks like probabilities)"

    @tf.function(input_signature=spec)
    def fn(x):
        # training=False: BatchNormalization uses its moving statistics, not the batch's.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras warns about the input structure's name
            out = head(x)
        return {OUTPUT_NAME: _log_probabilities(tf, out) if probs_out else tf.cast(out, tf.float32)}

    layers = tuple(layer.name for layer in _all_layers(model)
                   if isinstance(layer, keras.layers.Normalization))
    return TFSource("keras", fn, model, name, (-1, *model.inputs[0].shape[1:]), kind,
                    Hints(normalisation_layers=layers))


def _all_layers(model: Any) -> list:
    out = []
    for layer in getattr(model, "layers", []):
        out.append(layer)
        out.extend(_all_layers(layer))
    return out


def from_keras_file(path: Path, *, input_name: str | None, sample: np.ndarray) -> TFSource:
    import zipfile

    import keras

    if path.suffix.lower() == ".keras" and not zipfile.is_zipfile(path):
        raise ExportError(f"--model {path}: not a .keras archive (a .keras file is a zip)"
                          + ("; it is an ONNX model: name it .onnx" if _is_onnx(path) else ""))
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many kinds; the first line says why
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"--model {path}: Keras cannot load it: {first}") from exc
    return from_keras(model, input_name=input_name, sample=sample)


def _is_onnx(path: Path) -> bool:
    try:
        import onnx

        return len(onnx.load(str(path)).graph.node) > 0
    except Exception:  # not protobuf, or not a model
        return False


def from_savedmodel(path: Path, *, fmt: str, input_name: str | None, output: str | None,
                    sample: np.ndarray) -> Any:
    """A SavedModel's serving_default signature. Exported as ONNX it goes through the ONNX
    source (which can cut a Softmax head off the converted graph); as a SavedModel, a
    probability output becomes log-probabilities."""
    tf = _tf()
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"--model {path}: TensorFlow cannot load the SavedModel: {first}") from exc
    if "serving_default" not in loaded.signatures:
        raise ExportError(f"--model {path}: the SavedModel has no 'serving_default' signature "
                          f"(has {sorted(loaded.signatures)})")
    signature = loaded.signatures["serving_default"]
    inputs = signature.structured_input_signature[1]
    outputs = signature.structured_outputs
    if len(inputs) != 1:
        raise ExportError(f"--model {path}: serving_default must take one input, takes {sorted(inputs)}")
    if output is not None and output not in outputs:
        raise UsageError(f"--output {output}: the SavedModel's outputs are {sorted(outputs)}")
    out_key = output or (OUTPUT_NAME if OUTPUT_NAME in outputs else next(iter(outputs)))
    if output is None and len(outputs) != 1 and OUTPUT_NAME not in outputs:
        raise UsageError(f"--model {path}: cannot tell the logits among outputs {sorted(outputs)}; "
                         "name one with --output")
    (graph_name, in_spec), = inputs.items()
    name = input_name or graph_name
    spec = _signature(name, in_spec.shape)
    shape = (-1, *in_spec.shape[1:])
    probe = signature(**{graph_name: tf.constant(fit_rows(sample[:256], shape, graph_name))})[out_key].numpy()
    probs_out = looks_like_probabilities(probe)

    def make(log_probs: bool):
        @tf.function(input_signature=spec)
        def fn(x):
            out = signature(**{graph_name: x})[out_key]
            return {OUTPUT_NAME: _log_probabilities(tf, out) if log_probs else tf.cast(out, tf.float32)}
        return fn

    if fmt == "onnx":
        # Convert as is, then let the ONNX source find a Softmax head in the converted graph.
        import tf2onnx

        from service.export.onnx_source import from_onnx_proto

        proto, _ = tf2onnx.convert.from_function(make(False), input_signature=spec, opset=ONNX_OPSET)
        source = from_onnx_proto(proto, origin=str(path), input_name=None, output=None, sample=sample)
        source.family = "savedmodel"
        return source
    kind = ("log-probabilities (the output looks like probabilities)" if probs_out
            else f"logits (output '{out_key}')")
    return TFSource("savedmodel", make(probs_out), loaded, name, shape, kind, Hints())


def _write_onnx(source: TFSource, path: Path) -> tuple[str, str]:
    import onnx
    import tf2onnx  # heavy; only needed for this format

    # Keras 3 models are not what tf2onnx.convert.from_keras expects; a tf.function with a
    # fixed input signature converts cleanly and keeps the batch dimension dynamic.
    proto, _ = tf2onnx.convert.from_function(source.fn, input_signature=source.fn.input_signature,
                                             opset=ONNX_OPSET)
    _freeze_captured_constants(proto, source.fn.get_concrete_function())
    onnx.save(proto, str(path))
    return proto.graph.input[0].name, proto.graph.output[0].name


def _freeze_captured_constants(proto, concrete) -> None:
    """tf2onnx turns tensors a function captures by value (a Keras Normalization layer's mean
    and variance) into extra graph inputs; make them initializers holding their values."""
    import onnx

    values = {internal.name: external for internal, external in
              zip(concrete.graph.internal_captures, concrete.graph.external_captures)
              if external.dtype.name != "resource"}
    used = {name for node in proto.graph.node for name in node.input}
    extra = [i for i in proto.graph.input if i.name in values]
    for graph_input in extra:
        if graph_input.name in used:
            proto.graph.initializer.append(onnx.numpy_helper.from_array(
                np.asarray(values[graph_input.name].numpy()), graph_input.name))
        proto.graph.input.remove(graph_input)


def _write_savedmodel(source: TFSource, path: Path) -> tuple[str, str]:
    tf = _tf()
    module = tf.Module()
    module.owner = source.owner  # tracks the variables the function captures
    tf.saved_model.save(module, str(path),
                        signatures={"serving_default": source.fn.get_concrete_function()})
    return source.input_name, OUTPUT_NAME
