"""The vote's own calibration, fitted on the members' validation replay, checked against
independent arithmetic; and an ensemble's drift window, which belongs to the ensemble."""

from __future__ import annotations

import numpy as np
import pytest

from service.ensemble.calibration import fit_vote_calibration
from service.ensemble.voting import Policy, vote
from service.repository.contract import check_ensemble
from service.repository.manifest import load_manifest
from tests.helpers import MODELS, monitored_data_plane

MEMBERS = ["digits_mlp_a", "digits_mlp_b", "digits_cnn_a", "digits_cnn_b", "digits_logreg"]


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def _scaled(p: np.ndarray, t: float) -> np.ndarray:
    z = np.log(p + 1e-6) / t
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def manifests():
    return {m: load_manifest(MODELS / m / "1") for m in MEMBERS}


def test_each_policys_temperature_minimises_the_validation_nll_of_the_vote(manifests):
    spec = check_ensemble("digits", manifests)
    calibration = fit_vote_calibration(spec, manifests)
    assert set(calibration.policies) == {p.value for p in Policy}
    probs = [np.asarray(m.validation.probabilities) for m in manifests.values()]
    y = np.asarray(manifests[MEMBERS[0]].validation.labels)
    accuracy = [m.validation.calibrated.accuracy for m in manifests.values()]
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 2001))
    for policy, fitted in calibration.policies.items():
        combined = vote(policy, probs, MEMBERS, validation_accuracy=accuracy,
                        member_weights=calibration.weights_of(MEMBERS)).probabilities
        losses = [_nll(_scaled(combined, t), y) for t in grid]
        best = grid[int(np.argmin(losses))]
        assert fitted.temperature == pytest.approx(best, rel=0.01), policy
        assert fitted.nll_after == pytest.approx(min(losses), abs=1e-4)
        assert fitted.nll_after <= fitted.nll_before and fitted.ece_after <= fitted.ece_before, fitted
        assert fitted.rows == len(y)


def test_stacked_weights_give_the_validation_replay_its_least_nll(manifests):
    spec = check_ensemble("digits", manifests)
    weights = np.array(fit_vote_calibration(spec, manifests).weights_of(MEMBERS))
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0)
    probs = np.stack([np.asarray(m.validation.probabilities) for m in manifests.values()])
    y = np.asarray(manifests[MEMBERS[0]].validation.labels)

    def pool_nll(w: np.ndarray) -> float:
        return _nll(np.einsum("m,mnc->nc", w / w.sum(), probs), y)

    fitted = pool_nll(weights)
    rng = np.random.default_rng(0)
    others = [np.eye(len(MEMBERS))[i] for i in range(len(MEMBERS))] + list(rng.dirichlet(np.ones(len(MEMBERS)), 2000))
    assert all(fitted <= pool_nll(w) + 1e-9 for w in others)  # no single member, no random pool does better


def test_calibration_keeps_the_winner_and_a_lone_member_as_it_is(manifests):
    spec = check_ensemble("digits", manifests)
    calibration = fit_vote_calibration(spec, manifests)
    probs = [np.asarray(m.validation.probabilities)[:50] for m in manifests.values()]
    raw = vote("confidence", probs, MEMBERS, validation_accuracy=[0.9] * 5)
    calibrated = calibration.apply(raw)
    np.testing.assert_array_equal(calibrated.label_index, raw.label_index)
    np.testing.assert_array_equal(calibrated.probabilities.argmax(axis=1), raw.label_index)
    np.testing.assert_allclose(calibrated.probabilities,
                               _scaled(raw.probabilities, calibration.policies["confidence"].temperature))
    np.testing.assert_allclose(calibrated.confidence, calibrated.probabilities.max(axis=1))
    lone = vote("confidence", probs[:1], MEMBERS[:1])
    assert calibration.apply(lone) is lone


async def test_an_ensembles_drift_window_survives_a_change_of_member_subset(test_split):
    x, _ = test_split
    data, monitor = await monitored_data_plane()
    manager = data.manager
    try:
        await data.infer("digits", x[:8])  # recorded by the observer, once per batch
        window = monitor.drift_windows["digits"]
        await data.infer("digits", x[8:16], members=MEMBERS[:3])
        assert monitor.drift_windows["digits"] is window
        assert window.fill == pytest.approx(16 / monitor.window)
    finally:
        await manager.stop()


def test_readme_tables_are_what_evaluate_digits_prints():
    import subprocess
    import sys

    from tests.helpers import ROOT

    out = subprocess.run([sys.executable, "models/evaluate_digits.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, check=True).stdout
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in out.splitlines() if line.startswith("| digits_") or line.startswith("| best single")]
    rows += [line for line in out.splitlines() if line.startswith(tuple(f"| {p} |" for p in Policy))]
    assert len(rows) == 12
    for line in rows:
        shown = line.replace("| stacked |", "| stacked (bundled default) |")
        assert shown in readme, line
