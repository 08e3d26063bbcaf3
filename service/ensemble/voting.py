"""Combining ensemble members' calibrated outputs into one vote per row.

Members' logits are temperature-scaled (`calibrate`), then `vote` combines the
probabilities by a policy, vectorised over rows (loops run over members only):

- `majority`: hard vote, one per member; a tie between classes with the same number of
  votes goes to the tied class with the largest summed calibrated probability (then to
  the lowest class index). `probabilities` is the vote distribution (each member's share
  of votes per class), so `confidence` is the winner's vote share; on a tie the winner is
  one of the classes sharing the top share.
- `soft`: mean calibrated probability.
- `confidence`: each member's probability vector weighted by its own calibrated
  confidence on that very row, measured as its max probability. That is the measure
  temperature scaling makes meaningful: calibration is fitted so that max-prob matches
  accuracy (expected calibration error is defined on it), so a member saying 0.9 is
  right about 90% of the time, and the weight is that expected accuracy.
- `confidence_entropy`: the same with confidence 1 - H(p)/log C, which also looks at how
  the non-top mass is spread; calibration does not directly make it meaningful, so it is
  offered by name, not by default.
- `accuracy`: fixed member weights from validation accuracy, as log-odds
  w = log(acc / (1 - acc)) with acc clipped to [eps, 1 - eps] and w clipped to >= 0,
  then a weighted mean of probabilities.
- `stacked`: fixed member weights given by the caller (`member_weights`): the linear pool
  of the members fitted when the ensemble loads (service.ensemble.calibration: the weights
  whose weighted mean of the validation replay has the least NLL), then a weighted mean.

Whenever every weight of a row is zero (all members uniform under `confidence_entropy`,
all accuracies <= 0.5 under `accuracy`), that row falls back to equal weights.
`member_weights` is normalised per row to sum to 1; for `majority` every member weighs
1/M.

Inconsistent arguments (shapes, names, accuracies) are programming or configuration
errors and raise ValueError, not a client-facing error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

ACCURACY_EPS = 1e-3


class Policy(StrEnum):
    MAJORITY = "majority"
    SOFT = "soft"
    CONFIDENCE = "confidence"
    CONFIDENCE_ENTROPY = "confidence_entropy"
    ACCURACY = "accuracy"
    STACKED = "stacked"


@dataclass(frozen=True, slots=True)
class Vote:
    """One ensemble decision per row (n rows, C classes, M members)."""

    policy: Policy
    label_index: np.ndarray
    """(n,) winning class index."""
    probabilities: np.ndarray
    """(n, C) combined distribution; every row sums to 1."""
    confidence: np.ndarray
    """(n,) max of `probabilities`."""
    agreement: np.ndarray
    """(n,) share of members whose own argmax is the winner."""
    member_labels: np.ndarray
    """(M, n) each member's own argmax."""
    member_weights: np.ndarray
    """(M, n) each member's weight in the vote; every column sums to 1."""
    members: tuple[str, ...]


def calibrate(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) over the last axis, numerically stable, in float64."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def vote(policy: Policy | str, member_probs: Sequence[np.ndarray], member_names: Sequence[str],
         validation_accuracy: Sequence[float] | None = None,
         member_weights: Sequence[float] | None = None) -> Vote:
    """Combine members' calibrated probabilities (each (n, C)) by `policy`
    (`member_weights`: one non-negative weight per member, for `stacked`; without them,
    equal weights)."""
    policy = Policy(policy)
    if len(member_probs) == 1 and len(member_names) == 1 and policy in _WEIGHT_ONE:
        return _lone(policy, member_probs[0], member_names[0])
    probs = _stack(member_probs, member_names)
    n_members = probs.shape[0]
    member_labels = probs.argmax(axis=2)  # (M, n)

    if policy is Policy.MAJORITY:
        weights = np.full(member_labels.shape, 1.0 / n_members)
        combined, label = _majority(probs, member_labels)
    else:
        if policy is Policy.SOFT:
            raw = np.ones(member_labels.shape)
        elif policy is Policy.CONFIDENCE:
            raw = probs.max(axis=2)
        elif policy is Policy.CONFIDENCE_ENTROPY:
            raw = _entropy_confidence(probs)
        elif policy is Policy.STACKED:
            raw = np.broadcast_to(_given_weights(member_weights, n_members)[:, None], member_labels.shape)
        else:
            raw = np.broadcast_to(_accuracy_weights(validation_accuracy, n_members)[:, None],
                                  member_labels.shape)
        weights = _normalise(raw)
        combined = np.einsum("mn,mnc->nc", weights, probs)
        combined /= combined.sum(axis=1, keepdims=True)  # exact sums despite rounding
        label = combined.argmax(axis=1)

    return Vote(
        policy=policy,
        label_index=label,
        probabilities=combined,
        confidence=combined.max(axis=1),
        agreement=(member_labels == label).mean(axis=0),
        member_labels=member_labels,
        member_weights=weights,
        members=tuple(member_names),
    )


# Policies under which a lone member's weight is 1 (its raw weight over itself).
_WEIGHT_ONE = frozenset({Policy.SOFT, Policy.CONFIDENCE, Policy.CONFIDENCE_ENTROPY})


def _lone(policy: Policy, member_probs: np.ndarray, name: str) -> Vote:
    """The vote of a single member (every single-model request): the general path's result,
    value for value, with a third of its numpy calls."""
    probs = np.array(member_probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"members' outputs must be (rows, classes), got {probs.shape}")
    member_label = probs.argmax(axis=1)
    combined = probs / probs.sum(axis=1, keepdims=True)  # exact sums, as the general path
    label = combined.argmax(axis=1)
    return Vote(
        policy=policy,
        label_index=label,
        probabilities=combined,
        confidence=combined.max(axis=1),
        agreement=(member_label == label).astype(np.float64),
        member_labels=member_label[None],
        member_weights=np.ones((1, probs.shape[0])),
        members=(name,),
    )


def _stack(member_probs: Sequence[np.ndarray], member_names: Sequence[str]) -> np.ndarray:
    if not member_probs:
        raise ValueError("a vote needs at least one member")
    if len(member_probs) != len(member_names):
        raise ValueError(f"{len(member_probs)} members' outputs but {len(member_names)} names")
    shapes = {np.shape(p) for p in member_probs}
    if len(shapes) != 1:
        detail = ", ".join(f"{name} {np.shape(p)}" for name, p in zip(member_names, member_probs))
        raise ValueError(f"members' outputs differ in shape: {detail}")
    probs = np.stack([np.asarray(p, dtype=np.float64) for p in member_probs])
    if probs.ndim != 3:
        raise ValueError(f"members' outputs must be (rows, classes), got {probs.shape[1:]}")
    return probs


def _normalise(raw: np.ndarray) -> np.ndarray:
    """Columns (rows of the batch) scaled to sum to 1; all-zero columns become uniform."""
    total = raw.sum(axis=0)
    zero = total <= 0
    if zero.any():
        raw = np.where(zero, 1.0, raw)
        total = np.where(zero, raw.shape[0], total)
    return raw / total


def _majority(probs: np.ndarray, member_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n_members, _, n_classes = probs.shape
    counts = (member_labels[:, :, None] == np.arange(n_classes)).sum(axis=0, dtype=np.float64)
    tied = counts == counts.max(axis=1, keepdims=True)
    label = np.where(tied, probs.sum(axis=0), -np.inf).argmax(axis=1)
    return counts / n_members, label


def _entropy_confidence(probs: np.ndarray) -> np.ndarray:
    n_classes = probs.shape[2]
    if n_classes < 2:
        return np.ones(probs.shape[:2])
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(probs > 0, probs * np.log(probs), 0.0)
    entropy = -plogp.sum(axis=2)
    return np.clip(1.0 - entropy / np.log(n_classes), 0.0, 1.0)


def _given_weights(member_weights: Sequence[float] | None, n_members: int) -> np.ndarray:
    if member_weights is None:  # none fitted (offline replays of a subset): equal weights
        return np.ones(n_members)
    if len(member_weights) != n_members:
        raise ValueError(f"policy 'stacked' needs one weight per member ({n_members})")
    weights = np.asarray(member_weights, dtype=np.float64)
    if np.any(~np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"member weights must be finite and non-negative, got {weights.tolist()}")
    return weights


def _accuracy_weights(validation_accuracy: Sequence[float] | None, n_members: int) -> np.ndarray:
    if validation_accuracy is None or len(validation_accuracy) != n_members:
        raise ValueError(
            f"policy 'accuracy' needs one validation accuracy per member ({n_members})")
    acc = np.asarray(validation_accuracy, dtype=np.float64)
    if np.any((acc < 0) | (acc > 1)) or np.any(np.isnan(acc)):
        raise ValueError(f"validation accuracies must lie in [0, 1], got {acc.tolist()}")
    acc = np.clip(acc, ACCURACY_EPS, 1 - ACCURACY_EPS)
    return np.maximum(np.log(acc / (1 - acc)), 0.0)
