"""Runtimes on the bundled variants: loading, accuracy, devices, batch invariance."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.ensemble.voting import calibrate
from service.repository.manifest import load_manifest
from service.runtimes import RuntimeOptions, create_runtime
from service.runtimes.devices import place
from tests.helpers import MODELS, SAVEDMODEL_VARIANT, VARIANTS, batch_deviation


def _load(folder: Path, **options) -> object:
    runtime = create_runtime(folder, load_manifest(folder), RuntimeOptions(**options))
    asyncio.run(runtime.load())
    return runtime


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    return request.param


@pytest.mark.parametrize("mode", ["tolerant", "strict"])
def test_every_variant_is_batch_invariant(variant, mode, test_split):
    """The served output (calibrated probabilities) of a row alone vs. inside a batch of 64.

    Tolerant mode allows float32 rounding: TensorFlow's CPU convolutions pick kernels by
    batch size, which moves logits of ~16 by a few 1e-6; strict mode must be bitwise."""
    x, _ = test_split
    runtime = _load(MODELS / variant / "1", device="cpu", batch_invariance=mode, max_batch_size=64)
    temperature = runtime.manifest.calibration.temperature
    probabilities = batch_deviation(lambda r: calibrate(runtime.predict_sync(r), temperature), x[:64])
    logits = batch_deviation(runtime.predict_sync, x[:64])
    print(f"{variant} {mode}: max |alone - batched| probabilities {probabilities:.3g}, logits {logits:.3g}")
    if mode == "strict":
        assert probabilities == 0.0 and logits == 0.0
    else:
        assert probabilities <= 1e-6
    asyncio.run(runtime.unload())


@pytest.mark.parametrize("mode", ["tolerant", "strict"])
def test_the_rows_a_batch_may_hold_within_a_time_follow_the_warmup(mode):
    """From the warm-up's one-row run: tolerant mode takes the cost to grow with the rows,
    strict mode pads every batch to one shape (any batch up to the max batch size costs the
    warm-up's run); a time under one row's allows none."""
    runtime = _load(MODELS / "digits_mlp_a" / "1", device="cpu", batch_invariance=mode, max_batch_size=64)
    once = runtime.warmup_latency_s
    assert once > 0
    assert runtime.rows_within(once * 0.5) == 0
    if mode == "tolerant":
        assert (runtime.rows_within(once * 2.5), runtime.rows_within(once * 10.5)) == (2, 10)
        assert runtime.rows_within(once * 1000) == 64  # never more than a batch
    else:
        assert runtime.rows_within(once * 1.5) == runtime.rows_within(once * 1000) == 64
    asyncio.run(runtime.unload())


def test_variants_classify_the_test_split(variant, test_split):
    x, y = test_split
    runtime = _load(MODELS / variant / "1", device="cpu")
    logits = runtime.predict_sync(x)
    assert logits.shape == (len(x), 10)
    assert (logits.argmax(1) == y).mean() > 0.85
    assert runtime.device == "cpu" and runtime.ready
    asyncio.run(runtime.unload())


def test_predict_runs_off_the_event_loop(test_split):
    x, _ = test_split
    runtime = _load(MODELS / VARIANTS[0] / "1", device="cpu")

    async def main() -> tuple[np.ndarray, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        outs = await asyncio.gather(*(runtime.predict(x) for _ in range(20)))
        task.cancel()
        return outs[0], ticks

    out, ticks = asyncio.run(main())
    assert out.shape == (len(x), 10)
    assert ticks > 20  # the loop kept turning while the executor computed


def test_flat_and_shaped_rows_agree(test_split):
    x, _ = test_split
    runtime = _load(MODELS / VARIANTS[0] / "1", device="cpu")
    assert np.array_equal(runtime.predict_sync(x[:5]), runtime.predict_sync(x[:5].reshape(5, 64)))


def test_device_placement_spreads_over_gpus_and_falls_back_to_cpu():
    assert place("auto", 0, gpus=0) == "cpu"
    assert [place("auto", i, gpus=2) for i in range(4)] == ["gpu:0", "gpu:1", "gpu:0", "gpu:1"]
    assert place("gpu:1", 0, gpus=2) == "gpu:1"
    assert place("cpu", 3, gpus=2) == "cpu"
    with pytest.raises(ValueError, match="no GPU is visible"):
        place("gpu", 0, gpus=0)
    with pytest.raises(ValueError, match="only 2 GPU"):
        place("gpu:2", 0, gpus=2)
    with pytest.raises(ValueError, match="device must be"):
        place("tpu", 0, gpus=0)


def _per_batch_normalising_savedmodel(folder: Path) -> None:
    """A SavedModel whose BatchNormalization runs in training mode (batch statistics)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.BatchNormalization(), keras.layers.Dense(10)])

    class Serving(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32, name="pixels")])
        def serve(self, pixels):
            return {"logits": self.model(pixels, training=True)}

    module = Serving()
    tf.saved_model.save(module, str(folder / "model.savedmodel"), signatures={"serving_default": module.serve})


@pytest.mark.parametrize("mode", ["tolerant", "strict"])
def test_invariance_check_catches_batch_statistics(tmp_path, test_split, mode):
    x, _ = test_split
    folder = tmp_path / "bn_training" / "1"
    shutil.copytree(MODELS / SAVEDMODEL_VARIANT / "1", folder)
    shutil.rmtree(folder / load_manifest(folder).artifact)
    _per_batch_normalising_savedmodel(folder)
    manifest = json.loads((folder / "variant.json").read_text())
    manifest.update(artifact="model.savedmodel", signature="serving_default",
                    inputs=[{"name": "pixels", "dtype": "float32", "shape": [-1, 64]}],
                    outputs=[{"name": "logits", "dtype": "float32", "shape": [-1, 10]}])
    (folder / "variant.json").write_text(json.dumps(manifest))
    runtime = _load(folder, device="cpu", batch_invariance=mode, max_batch_size=64)
    assert runtime._call is None  # its graph assigns variables, so it does not freeze: the signature serves
    assert batch_deviation(runtime.predict_sync, x[:64]) > 1e-3


SAVEDMODELS = [v for v in VARIANTS if load_manifest(MODELS / v / "1").framework == "savedmodel"]


@pytest.mark.parametrize("name", SAVEDMODELS)
def test_a_savedmodel_runs_as_a_prepared_graph_call_with_its_signatures_answers(name, test_split):
    """On the CPU a SavedModel's frozen graph runs through a session's prepared callable
    (service/runtimes/tensorflow.py), and answers bitwise as TensorFlow's own signature call."""
    import tensorflow as tf

    x, _ = test_split
    folder = MODELS / name / "1"
    runtime = _load(folder, device="cpu", batch_invariance="tolerant", max_batch_size=64)
    assert runtime._call is not None  # the prepared call is the one serving
    manifest = runtime.manifest
    signature = tf.saved_model.load(str(folder / manifest.artifact)).signatures[manifest.signature]
    for rows in (x[:1], x[:7], x[:64]):
        expected = signature(**{manifest.input.name: tf.constant(runtime.normalize(rows))})[manifest.output.name]
        assert np.array_equal(runtime.predict_sync(rows), expected.numpy())
    asyncio.run(runtime.unload())
