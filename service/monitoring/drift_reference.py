"""The drift reference of one served model: the training-data histograms, predicted-class
frequencies and confidences its live window is compared with.

Which reference: a single model uses its own manifest. An ensemble uses its first
member's input features (all members are trained on the same data, so their feature
references are the same) and, for its predicted classes, the members' predicted-class
frequencies averaged. For its confidence it does not pool the members' samples: the
vote's confidence is a different quantity (a confidence-weighted vote of five calibrated
members is less peaked than any member on its own training data; pooled samples gave
KS D = 0.33 on in-distribution test traffic). Its reference is the ensemble's own vote
on the validation split, replayed at load time from the members' stored validation
probabilities, the same replay that gives the disagreement baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.repository.manifest import DriftReference, FeatureReference, VariantManifest


@dataclass(frozen=True)
class ModelReference:
    features: tuple[FeatureReference, ...]
    class_frequencies: np.ndarray
    confidence_sample: np.ndarray
    disagreement_baseline: float | None = None
    """Validation share of rows with agreement < 1 (ensembles only)."""
    validation_rows: int = 0

    @property
    def value_indices(self) -> np.ndarray:
        return np.array([f.index for f in self.features if f.statistic == "value"], dtype=np.intp)

    @classmethod
    def of_model(cls, manifest: VariantManifest) -> "ModelReference":
        ref = manifest.drift_reference
        return cls(ref.features, np.asarray(ref.predicted_class_frequencies),
                   np.asarray(ref.confidence_sample))

    @classmethod
    def of_ensemble(cls, manifests: Sequence[VariantManifest], policy: str, calibration=None) -> "ModelReference":
        """`calibration` (service.ensemble.calibration.VoteCalibration): the vote's own, so
        that the reference confidences are those the ensemble answers with."""
        refs: list[DriftReference] = [m.drift_reference for m in manifests]
        frequencies = np.mean([r.predicted_class_frequencies for r in refs], axis=0)
        weights = calibration.weights_of([m.name for m in manifests]) if calibration is not None else None
        replay = replay_validation(manifests, policy, weights)
        if replay is not None and calibration is not None:
            replay = calibration.apply(replay)
        if replay is None:
            sample = np.sort(np.concatenate([r.confidence_sample for r in refs]))
            return cls(refs[0].features, frequencies, sample)
        baseline = float(np.mean(replay.agreement < 1.0 - 1e-9))
        return cls(refs[0].features, frequencies, np.sort(replay.confidence), baseline,
                   len(replay.confidence))


def replay_validation(manifests: Sequence[VariantManifest], policy: str,
                      member_weights: Sequence[float] | None = None):
    """The ensemble's vote on the validation rows every member stored (its members'
    calibrated validation probabilities replayed through `vote`); None when the members
    share no validation rows."""
    from service.ensemble.voting import vote

    common = set(manifests[0].validation.indices)
    for m in manifests[1:]:
        common &= set(m.validation.indices)
    if not common or len(manifests) < 2:
        return None
    keys = sorted(common)
    probs = []
    for m in manifests:
        position = {index: row for row, index in enumerate(m.validation.indices)}
        table = np.asarray(m.validation.probabilities, dtype=np.float64)
        probs.append(table[[position[k] for k in keys]])
    accuracy = [m.validation.calibrated.accuracy for m in manifests]
    return vote(policy, probs, [m.name for m in manifests], validation_accuracy=accuracy,
                member_weights=member_weights)
