"""The score function behind the sets is fitted on the even replay rows only, and the odd rows
calibrate it (service/ensemble/uncertainty.py): what makes the coverage guarantee hold."""

from __future__ import annotations

import json

import numpy as np
from scipy.special import softmax

from service.ensemble.uncertainty import SetScorer, Uncertainty
from tests.helpers import MODELS, ONNX_VARIANTS


def _replay() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The ONNX members' stored validation probabilities (they share every row, same order)."""
    probabilities, labels = {}, None
    for name in ONNX_VARIANTS:
        validation = json.loads((MODELS / name / "1" / "variant.json").read_text())["validation"]
        order = np.argsort(validation["indices"])
        probabilities[name] = np.asarray(validation["probabilities"])[order]
        labels = np.asarray(validation["labels"])[order]
    assert labels is not None
    return probabilities, labels


def test_the_odd_rows_fit_nothing():
    probabilities, labels = _replay()
    fitted = Uncertainty.fit("stacked", probabilities, labels)
    scrambled = {m: p.copy() for m, p in probabilities.items()}
    rng = np.random.default_rng(0)
    for p in scrambled.values():
        p[1::2] = rng.dirichlet(np.ones(p.shape[1]), size=p[1::2].shape[0])
    other = Uncertainty.fit("stacked", scrambled, np.where(np.arange(labels.size) % 2, 0, labels))
    assert other.scorer == fitted.scorer  # same temperatures, accuracies, weights, vote temperature
    assert fitted.fit_rows + fitted.calibration_rows == labels.size
    assert not np.array_equal(other.conformal.scores, fitted.conformal.scores)


def test_the_calibration_scores_are_the_held_out_rows_through_the_scorer():
    probabilities, labels = _replay()
    fitted = Uncertainty.fit("stacked", probabilities, labels, score="lac")
    held_out = fitted.scorer.probabilities([probabilities[m][1::2] for m in fitted.scorer.members])
    np.testing.assert_allclose(fitted.conformal.scores, 1 - held_out[np.arange(held_out.shape[0]), labels[1::2]])


def test_a_members_refitted_temperature_does_not_depend_on_the_exported_one():
    """softmax(log p / t) = softmax(z / (T t)): the refit lands on the same function of the
    logits whichever temperature T the export stored probabilities with."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(400, 5)) * 3
    labels = np.array([rng.choice(5, p=softmax(row / 2.0)) for row in logits])
    scorers = [SetScorer.fit("soft", {"m": softmax(logits / t, axis=1)}, labels) for t in (0.5, 1.0, 3.0)]
    new = rng.normal(size=(20, 5)) * 3
    answers = [s.probabilities([softmax(new / t, axis=1)]) for s, t in zip(scorers, (0.5, 1.0, 3.0))]
    for answer in answers[1:]:
        np.testing.assert_allclose(answer, answers[0], atol=1e-4)


def test_the_per_batch_shortcut_gives_the_votes_numbers():
    """soft, stacked and accuracy weigh each member alike in every row: the scorer's weighted
    mean equals the full vote it stands for."""
    import dataclasses

    probabilities, labels = _replay()
    rows = [p[:50].astype(np.float32) for p in probabilities.values()]
    for policy in ("soft", "stacked", "accuracy"):
        scorer = SetScorer.fit(policy, probabilities, labels)
        assert scorer.row_weights is not None
        full = dataclasses.replace(scorer, row_weights=None)
        np.testing.assert_allclose(scorer.probabilities(rows), full.probabilities(rows), rtol=1e-9, atol=1e-12)
    assert SetScorer.fit("confidence", probabilities, labels).row_weights is None
