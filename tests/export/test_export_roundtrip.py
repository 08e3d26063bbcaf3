"""Export a freshly trained Keras model both ways and serve it back with the real runtimes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import keras
import numpy as np
import onnxruntime as ort
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

from service.export import calibration as cal
from service.export import cli
from service.export.errors import UsageError
from service.export.exporter import export_variant, next_version, normalization_stats, normalize
from service.repository.manifest import VariantManifest, load_manifest

SPLIT = Path(__file__).resolve().parents[2] / "models" / "digits_split.json"


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    digits = load_digits()
    split = json.loads(SPLIT.read_text())
    x, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    out = {"val_indices": np.asarray(split["val"])}
    for part in ("train", "val", "test"):
        idx = np.asarray(split[part])
        out[f"x_{part}"], out[f"y_{part}"] = x[idx], y[idx]
    return out


@pytest.fixture(scope="module")
def model(data) -> keras.Model:
    # BatchNormalization on purpose: the export must freeze it in inference mode.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,), name="pixels")
    x = keras.layers.Dense(32)(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    xn = normalize(data["x_train"], *normalization_stats(data["x_train"]), (-1, 64))
    model.fit(xn, data["y_train"], epochs=2, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="module")
def exported(model, data, tmp_path_factory) -> dict[str, Path]:
    repo = tmp_path_factory.mktemp("repo")
    kwargs = {k: data[k] for k in ("x_train", "y_train", "x_val", "y_val", "val_indices")}
    return {fmt: export_variant(model, **kwargs, repository=repo, name=f"tiny_{fmt}",
                                labels=[str(i) for i in range(10)], fmt=fmt, seed=0)
            for fmt in ("onnx", "savedmodel")}


def _normalised(manifest: VariantManifest, x: np.ndarray) -> np.ndarray:
    norm = manifest.normalization
    return ((x - np.asarray(norm.mean)) / np.asarray(norm.std)).astype(np.float32)


def _runtime_logits(folder: Path, manifest: VariantManifest, x: np.ndarray) -> np.ndarray:
    artifact = str(folder / manifest.artifact)
    if manifest.framework == "onnx":
        session = ort.InferenceSession(artifact, providers=["CPUExecutionProvider"])
        return session.run([manifest.output.name], {manifest.input.name: x})[0]
    signature = tf.saved_model.load(artifact).signatures[manifest.signature]
    return signature(**{manifest.input.name: tf.constant(x)})[manifest.output.name].numpy()


@pytest.mark.parametrize("fmt", ["onnx", "savedmodel"])
def test_roundtrip_matches_keras_on_test_split(fmt, exported, model, data) -> None:
    folder = exported[fmt]
    manifest = load_manifest(folder)
    assert (folder.name, manifest.framework, manifest.version) == ("1", fmt, 1)
    assert manifest.input.shape == (-1, 64) and manifest.output.shape == (-1, 10)
    x = _normalised(manifest, data["x_test"])
    t = manifest.calibration.temperature
    expected = cal.softmax(model.predict(x, verbose=0), t)
    served = cal.softmax(_runtime_logits(folder, manifest, x), t)
    assert np.max(np.abs(served - expected)) <= 1e-5
    # Batch-size independence: one row at a time gives the batch's answer.
    one_by_one = np.concatenate([_runtime_logits(folder, manifest, x[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(one_by_one, _runtime_logits(folder, manifest, x[:5]), atol=1e-6)


def test_manifest_names_the_graph_tensors(exported) -> None:
    onnx_manifest = load_manifest(exported["onnx"])
    session = ort.InferenceSession(str(exported["onnx"] / "model.onnx"), providers=["CPUExecutionProvider"])
    (graph_in,), (graph_out,) = session.get_inputs(), session.get_outputs()
    assert (graph_in.name, graph_out.name) == (onnx_manifest.input.name, onnx_manifest.output.name)
    assert not isinstance(graph_in.shape[0], int)  # the batch dimension stays dynamic
    sm_manifest = load_manifest(exported["savedmodel"])
    signature = tf.saved_model.load(str(exported["savedmodel"] / "model.savedmodel")).signatures["serving_default"]
    assert set(signature.structured_input_signature[1]) == {sm_manifest.input.name}
    assert set(signature.structured_outputs) == {sm_manifest.output.name}


def test_versions_are_immutable_and_appear_whole(exported, model, data) -> None:
    model_dir = exported["onnx"].parent
    kwargs = {k: data[k] for k in ("x_train", "y_train", "x_val", "y_val")}
    with pytest.raises(UsageError, match="versions are immutable"):
        export_variant(model, **kwargs, val_indices=None, repository=model_dir.parent,
                       name=model_dir.name, labels=None, fmt="onnx", version=1)
    assert next_version(model_dir) == 2
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]  # no staging folder left behind


def test_cli_exports_from_keras_file_and_from_savedmodel(exported, model, data, tmp_path) -> None:
    keras_file = tmp_path / "tiny.keras"
    model.save(keras_file)
    npz = tmp_path / "data.npz"
    np.savez(npz, **{k: data[k] for k in ("x_train", "y_train", "x_val", "y_val", "val_indices")})
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    repo = tmp_path / "repo"
    for source in (keras_file, exported["savedmodel"] / "model.savedmodel"):
        args = parser.parse_args(["export", "--model", str(source), "--data", str(npz),
                                  "--repository", str(repo), "--name", "tiny", "--format", "onnx",
                                  "--labels", ",".join("abcdefghij")])
        assert cli.run(args) == 0
    reference = load_manifest(exported["onnx"])
    x = _normalised(reference, data["x_test"])
    for version in ("1", "2"):  # the second export took the next free version
        manifest = load_manifest(repo / "tiny" / version)
        assert manifest.labels == tuple("abcdefghij")
        assert manifest.validation.indices == tuple(data["val_indices"].tolist())
        np.testing.assert_allclose(_runtime_logits(repo / "tiny" / version, manifest, x),
                                   model.predict(x, verbose=0), atol=1e-5)
