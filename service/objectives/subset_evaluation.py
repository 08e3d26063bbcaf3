"""The periodic re-evaluation of an ensemble's member subsets (off the hot path): each
subset's expected accuracy (validation replay blended with live feedback), predicted p99
latency and memory, the selection kept with hysteresis, and the constraints reported."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from service.objectives.feedback import LiveRow
from service.objectives.latency import LatencyWindow
from service.objectives.selection import (
    Candidate, best, blend, fits, predicted_latency, predicted_memory, replay_accuracy, subsets)
from service.objectives.status import ConstraintStatus, MemberInfo, MemberStatus
from service.repository.config import Objective

# Lines keep the tracker's logger name, as before the split: operators filter the logs on it.
log = logging.getLogger("service.objectives.tracker")


class SubsetEvaluation:
    """ObjectiveTracker's evaluation (a part of it: ObjectiveTracker.__init__ sets the state)."""

    ensemble: str
    members: tuple[str, ...]
    configured: Objective | None
    objective: Objective
    policy: str
    stacked_weights: Mapping[str, float]
    member_latency: dict[str, LatencyWindow]
    end_to_end: LatencyWindow
    candidates: list[Candidate]
    selected: Candidate | None
    evaluated: frozenset[str] | None
    reason: str
    constraints: list[ConstraintStatus]
    member_status: list[MemberStatus]
    _lock: threading.Lock
    _validation_key: tuple
    _validation: dict[tuple[str, ...], float]

    def evaluate(self, members: Mapping[str, MemberInfo], live_rows: Sequence[LiveRow],
                 live_accuracy: Mapping[str, tuple[float | None, int]]) -> None:
        """Recompute every subset of the members now serving and update the selection."""
        with self._lock:
            self._evaluate(members, live_rows, live_accuracy)

    def _evaluate(self, members: Mapping[str, MemberInfo], live_rows: Sequence[LiveRow],
                  live_accuracy: Mapping[str, tuple[float | None, int]]) -> None:
        names = [m for m in self.members if m in members]
        if not names:
            return
        objective = self.objective
        p99 = {m: self._member_p99(m, members[m]) for m in names}
        device = {m: members[m].device for m in names}
        memory = {m: members[m].memory_mb for m in names}
        weights = {m: members[m].validation_accuracy for m in names}
        validation = self._validation_replay(names, members, weights)
        live_probs, live_mask, live_truth = _live_matrix(names, members, live_rows)

        candidates = []
        for subset in subsets(names):
            val = validation[subset]
            rows = np.logical_and.reduce([live_mask[m] for m in subset])
            n = int(rows.sum())
            live = (replay_accuracy(self.policy, {m: live_probs[m][rows] for m in subset}, live_truth[rows],
                                    subset, weights, self.stacked_weights) if n else None)
            candidates.append(Candidate(
                subset, blend(val, live, n, objective.prior_strength), val, live, n,
                predicted_latency(subset, p99, device), predicted_memory(subset, memory, device)))
        candidates.sort(key=lambda c: (-c.accuracy, c.latency_s))
        self.candidates = candidates
        self.evaluated = frozenset(names)
        self._select(candidates)
        self._report(names, members, live_accuracy)

    def _validation_replay(self, names: list[str], members: Mapping[str, MemberInfo],
                           weights: Mapping[str, float]) -> dict[tuple[str, ...], float]:
        """Every subset's validation accuracy; it changes only with the members' versions,
        so it is replayed once per set of versions, not at every evaluation."""
        key = (tuple((m, members[m].version) for m in names), tuple(sorted(self.stacked_weights.items())))
        if self._validation_key != key:
            probs, labels = _aligned_validation([members[m] for m in names])
            self._validation = {s: replay_accuracy(self.policy, probs, labels, s, weights, self.stacked_weights)
                                for s in subsets(names)}
            self._validation_key = key
        return self._validation

    def _member_p99(self, name: str, info: MemberInfo) -> float:
        """Measured p99 once the window holds enough samples; before that, the larger of
        the warm-up timing and what was measured so far. The warm-up timing is the bare
        compute of one row (microseconds), not a request's latency through the batcher and
        the event loop (milliseconds): alone, it made constraints read far below the
        members' measured p99."""
        window = self.member_latency[name]
        measured = window.percentile(99)
        if measured is None:  # nothing measured (within the window's age)
            return info.warmup_latency_s
        if window.count >= self.objective.min_latency_samples:
            return measured
        return max(measured, info.warmup_latency_s)

    def _select(self, candidates: list[Candidate]) -> None:
        objective = self.objective
        budget = objective.latency_p99_ms / 1000 if objective.latency_p99_ms else None
        if self.configured is None:
            largest = max(len(c.members) for c in candidates)
            self.selected = next(c for c in candidates if len(c.members) == largest)
            self.reason = "no objective in ensemble.yaml: every member votes"
            return
        choice = best(candidates, budget, objective.device_memory_mb)
        if choice is None:
            choice = min(candidates, key=lambda c: c.latency_s)
            reason = "no subset meets the constraints: serving the fastest subset (fallback)"
        else:
            reason = f"highest expected accuracy ({choice.accuracy:.4f}) among subsets meeting the constraints"
        current = next((c for c in candidates if self.selected and c.members == self.selected.members), None)
        if (current is not None and current.members != choice.members
                and fits(current, budget, None, objective.device_memory_mb)
                and choice.accuracy <= current.accuracy + objective.hysteresis):
            choice = current  # not enough better to switch: no flapping
            reason = (f"kept: the best alternative gains less than the hysteresis "
                      f"({objective.hysteresis}); expected accuracy {current.accuracy:.4f}")
        if self.selected is None or choice.members != self.selected.members:
            log.info("ensemble %s selects %s: %s", self.ensemble, ", ".join(choice.members), reason)
            self.end_to_end.clear()  # measure the new selection on its own
        self.selected, self.reason = choice, reason

    def _report(self, names: list[str], members: Mapping[str, MemberInfo],
                live_accuracy: Mapping[str, tuple[float | None, int]]) -> None:
        objective, selected = self.objective, self.selected
        assert selected is not None  # _select has just chosen, from at least one candidate
        constraints = []
        if objective.latency_p99_ms:
            so_far = self.end_to_end.percentile(99)
            measured = so_far is not None and self.end_to_end.count >= objective.min_latency_samples
            value = (so_far if so_far is not None and measured else max(selected.latency_s, so_far or 0.0)) * 1000
            constraints.append(ConstraintStatus("latency_p99_ms", objective.latency_p99_ms, value,
                                                value <= objective.latency_p99_ms, measured))
        if objective.device_memory_mb:
            constraints.append(ConstraintStatus("device_memory_mb", objective.device_memory_mb, selected.memory_mb,
                                                selected.memory_mb <= objective.device_memory_mb, False))
        self.constraints = constraints
        status = []
        for m in names:
            live, samples = live_accuracy.get(m, (None, 0))
            window = self.member_latency[m]
            p50, p99 = window.percentile(50), window.percentile(99)
            status.append(MemberStatus(m, members[m].validation_accuracy, live, samples,
                                       None if p50 is None else p50 * 1000, None if p99 is None else p99 * 1000,
                                       m in selected.members))
        self.member_status = status


def _aligned_validation(infos: Sequence[MemberInfo]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Members' stored validation probabilities on the examples they all share, aligned."""
    common = set(infos[0].validation_indices)
    for info in infos[1:]:
        common &= set(info.validation_indices)
    order = sorted(common)
    probs: dict[str, np.ndarray] = {}
    labels: np.ndarray | None = None
    for info in infos:
        position = {index: row for row, index in enumerate(info.validation_indices)}
        rows = np.fromiter((position[i] for i in order), dtype=np.int64, count=len(order))
        probs[info.name] = info.validation_probabilities[rows]
        labels = info.validation_labels[rows]
    assert labels is not None  # infos has at least one member
    return probs, labels


def _live_matrix(names: Sequence[str], members: Mapping[str, MemberInfo], live_rows: Sequence[LiveRow]
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Live labelled rows as per-member arrays; a row counts for a member only if that
    member answered it at the version serving now (a replaced version's record is void)."""
    n = len(live_rows)
    truth = np.fromiter((r.truth for r in live_rows), dtype=np.int64, count=n)
    probs, mask = {}, {}
    for m in names:
        version = members[m].version
        valid = np.fromiter((m in r.members and r.members[m][0] == version for r in live_rows), dtype=bool, count=n)
        classes = members[m].validation_probabilities.shape[1]
        matrix = np.zeros((n, classes), dtype=np.float64)
        for i in np.flatnonzero(valid).tolist():
            matrix[i] = live_rows[i].members[m][1]
        probs[m], mask[m] = matrix, valid
    return probs, mask, truth
