"""Calibration metrics on hand-computed cases, temperature fitting, and the bundled variants."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from service.export import calibration as cal
from service.repository.manifest import load_manifest

MODELS = Path(__file__).resolve().parents[2] / "models"
VARIANTS = sorted(p.parent.parent.name for p in MODELS.glob("*/1/variant.json"))


def test_softmax_rows_sum_to_one_and_survive_huge_logits() -> None:
    probs = cal.softmax(np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(probs[1], [1 / 3] * 3)
    assert probs[0, 0] == pytest.approx(1.0)


def test_nll_hand_computed() -> None:
    # p(label) = 3 / (1 + 3) for logits (0, ln 3); uniform logits over 4 classes give ln 4.
    logits = np.array([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    assert cal.nll(logits, np.array([1, 0])) == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2)
    assert cal.nll(np.zeros((5, 4)), np.array([0, 1, 2, 3, 0])) == pytest.approx(math.log(4))
    # Temperature 2 on logits (0, 2 ln 3) is the same as T=1 on (0, ln 3).
    assert cal.nll(np.array([[0.0, 2 * math.log(3.0)]]), np.array([1]), 2.0) == pytest.approx(-math.log(0.75))


def test_ece_hand_computed() -> None:
    # Four rows at confidence 0.9, three right: gap 0.15, weight 4/6.
    # Two rows at confidence 0.7, one right: gap 0.2, weight 2/6.  ECE = 0.1 + 0.2/3.
    probs = np.array([[0.9, 0.1]] * 4 + [[0.3, 0.7]] * 2)
    labels = np.array([0, 0, 0, 1, 1, 0])
    assert cal.ece(probs, labels) == pytest.approx(0.1 + 0.2 / 3)
    assert cal.accuracy(probs, labels) == pytest.approx(4 / 6)
    # Perfectly confident and always right: no gap.
    assert cal.ece(np.eye(3), np.arange(3)) == 0.0


def test_ece_bins_are_equal_width_15() -> None:
    # 0.62 and 0.65 share the bin (0.6, 0.6667]; 0.55 sits in (0.5333, 0.6].
    same = cal.ece(np.array([[0.62, 0.38], [0.65, 0.35]]), np.array([0, 1]))
    assert same == pytest.approx(abs(0.5 - 0.635))
    apart = cal.ece(np.array([[0.55, 0.45], [0.65, 0.35]]), np.array([0, 1]))
    assert apart == pytest.approx(0.5 * 0.45 + 0.5 * 0.65)


@pytest.mark.parametrize("k", [0.4, 1.0, 2.5, 6.0])
def test_fit_temperature_recovers_known_scale(k: float) -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0.0, 2.0, size=(20000, 10))
    u = rng.random((len(true_logits), 1))
    labels = (cal.softmax(true_logits).cumsum(axis=1) < u).sum(axis=1)  # sampled from the truth
    fitted = cal.fit_temperature(true_logits * k, labels)
    assert fitted == pytest.approx(k, rel=0.05)


def test_fit_temperature_keeps_one_when_nothing_improves() -> None:
    # Constant logits: the NLL does not depend on T, so the fit cannot lower it.
    assert cal.fit_temperature(np.zeros((50, 3)), np.arange(50) % 3) == 1.0


def test_temperature_never_changes_argmax_on_random_logits() -> None:
    rng = np.random.default_rng(1)
    for scale in (0.01, 1.0, 30.0, 300.0):
        logits = rng.normal(0.0, scale, size=(2000, 7))
        labels = rng.integers(0, 7, size=len(logits))
        for t in (0.05, 0.3, 1.0, 4.0, 20.0, cal.fit_temperature(logits, labels)):
            np.testing.assert_array_equal(cal.softmax(logits, t).argmax(axis=1), logits.argmax(axis=1))


def _val_logits(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The bundled variant's own logits on its validation rows, through its real runtime."""
    manifest = load_manifest(MODELS / name / "1")
    data = load_digits()
    idx = np.asarray(manifest.validation.indices)
    x = ((data.data[idx] - np.asarray(manifest.normalization.mean))
         / np.asarray(manifest.normalization.std)).astype(np.float32)
    artifact = MODELS / name / "1" / manifest.artifact
    if manifest.framework == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
        logits = session.run([manifest.output.name], {manifest.input.name: x})[0]
    else:
        import tensorflow as tf

        signature = tf.saved_model.load(str(artifact)).signatures[manifest.signature]
        logits = signature(**{manifest.input.name: tf.constant(x)})[manifest.output.name].numpy()
    return logits, data.target[idx]


@pytest.mark.parametrize("name", VARIANTS)
def test_bundled_variant_calibration(name: str) -> None:
    manifest = load_manifest(MODELS / name / "1")
    v, t = manifest.validation, manifest.calibration.temperature
    assert v.calibrated.nll <= v.uncalibrated.nll
    if not v.calibrated.nll < v.uncalibrated.nll:
        assert t == 1.0
    assert v.calibrated.accuracy == v.uncalibrated.accuracy

    logits, labels = _val_logits(name)
    np.testing.assert_array_equal(labels, v.labels)
    probs = cal.softmax(logits, t)
    np.testing.assert_array_equal(probs.argmax(axis=1), logits.argmax(axis=1))
    # The manifest is what this runtime reproduces: probabilities, metrics, temperature.
    np.testing.assert_allclose(probs, np.asarray(v.probabilities), atol=1e-5)
    assert cal.nll(logits, labels, t) == pytest.approx(v.calibrated.nll, abs=1e-5)
    assert cal.fit_temperature(logits, labels) == pytest.approx(t, rel=1e-3)
