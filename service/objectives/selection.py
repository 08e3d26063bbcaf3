"""Choosing ensemble members: every subset's expected accuracy (exact replay of stored
probabilities through the voting policy) and predicted latency and memory.

Accuracy is the optimizing metric; latency and memory are satisficing constraints that a
subset only has to meet. A subset's expected accuracy blends its replayed validation
accuracy (a prior worth `prior_strength` rows) with its replayed live accuracy on the rows
that received ground-truth feedback: (k * validation + n * live) / (k + n).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.ensemble.voting import vote

MAX_MEMBERS = 12  # 4095 subsets: exact enumeration stays well under a second


@dataclass(frozen=True)
class Candidate:
    members: tuple[str, ...]
    accuracy: float
    """Expected accuracy: validation blended with live."""
    validation_accuracy: float
    live_accuracy: float | None
    live_samples: int
    latency_s: float
    """Predicted p99 latency of this subset."""
    memory_mb: float


def subsets(members: Sequence[str]) -> list[tuple[str, ...]]:
    if len(members) > MAX_MEMBERS:
        raise ValueError(f"{len(members)} members: exact selection supports at most {MAX_MEMBERS}")
    return [c for r in range(1, len(members) + 1) for c in itertools.combinations(members, r)]


def replay_accuracy(policy: str, probabilities: Mapping[str, np.ndarray], labels: np.ndarray,
                    subset: Sequence[str], accuracy_weights: Mapping[str, float],
                    stacked_weights: Mapping[str, float] | None = None) -> float:
    """Accuracy of the vote of `subset` on stored calibrated probabilities (each (n, C));
    `stacked_weights`: the ensemble's fitted member weights, for the `stacked` policy."""
    if labels.size == 0:
        return float("nan")
    given = None if stacked_weights is None else [stacked_weights.get(m, 1.0) for m in subset]
    result = vote(policy, [probabilities[m] for m in subset], list(subset),
                  validation_accuracy=[accuracy_weights[m] for m in subset], member_weights=given)
    return float((result.label_index == labels).mean())


def predicted_latency(subset: Sequence[str], p99_s: Mapping[str, float], device: Mapping[str, str]) -> float:
    """Members sharing a device run one after another (their latencies add up); members on
    separate devices run in parallel (the slowest device counts)."""
    per_device: dict[str, float] = {}
    for member in subset:
        per_device[device[member]] = per_device.get(device[member], 0.0) + p99_s[member]
    return max(per_device.values())


def predicted_memory(subset: Sequence[str], memory_mb: Mapping[str, float], device: Mapping[str, str]) -> float:
    """The most memory any one device needs for the subset's members."""
    per_device: dict[str, float] = {}
    for member in subset:
        per_device[device[member]] = per_device.get(device[member], 0.0) + memory_mb[member]
    return max(per_device.values())


def blend(validation: float, live: float | None, live_samples: int, prior_strength: int) -> float:
    if live is None or live_samples == 0:
        return validation
    return (prior_strength * validation + live_samples * live) / (prior_strength + live_samples)


def best(candidates: Sequence[Candidate], latency_budget_s: float | None, memory_budget_mb: float | None,
         min_accuracy: float | None = None) -> Candidate | None:
    """The feasible candidate with the highest expected accuracy (ties: the faster one)."""
    feasible = [c for c in candidates
                if (latency_budget_s is None or c.latency_s <= latency_budget_s)
                and (memory_budget_mb is None or c.memory_mb <= memory_budget_mb)
                and (min_accuracy is None or c.accuracy >= min_accuracy)]
    if not feasible:
        return None
    return max(feasible, key=lambda c: (round(c.accuracy, 9), -c.latency_s, len(c.members)))


def fits(candidate: Candidate, budget_s: float | None, min_accuracy: float | None,
         memory_mb: float | None = None) -> bool:
    """Whether a candidate meets each bound given (None: no bound)."""
    return ((budget_s is None or candidate.latency_s <= budget_s)
            and (min_accuracy is None or candidate.accuracy >= min_accuracy)
            and (memory_mb is None or candidate.memory_mb <= memory_mb))
