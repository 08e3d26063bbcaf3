"""Satisficing per ensemble: measure member and end-to-end latency, re-evaluate every member
subset's expected accuracy, latency and memory, and keep the best subset that meets the
constraints selected (with hysteresis, so the choice does not flap).

When no subset meets the constraints, the fallback is the fastest subset (the one most
likely to recover the latency objective), and the constraint is reported as violated.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.errors import FailedPrecondition
from service.objectives.feedback import LiveRow
from service.objectives.latency import LatencyWindow
from service.objectives.selection import (
    Candidate, best, blend, predicted_latency, predicted_memory, replay_accuracy, subsets)
from service.repository.config import Objective

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberInfo:
    """What selection needs to know about one member, read from the serving version."""

    name: str
    version: int
    device: str
    warmup_latency_s: float
    memory_mb: float
    validation_accuracy: float
    validation_indices: tuple[int, ...]
    validation_labels: np.ndarray
    validation_probabilities: np.ndarray


@dataclass(frozen=True)
class ConstraintStatus:
    name: str
    threshold: float
    value: float
    holds: bool
    measured: bool
    """True when `value` is measured (enough samples), False when predicted."""


@dataclass(frozen=True)
class MemberStatus:
    name: str
    validation_accuracy: float
    live_accuracy: float | None
    live_samples: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    selected: bool


class ObjectiveTracker:
    def __init__(self, ensemble: str, members: Sequence[str], objective: Objective | None, policy: str) -> None:
        self.ensemble = ensemble
        self.members = tuple(members)
        self.configured = objective
        """The objective from ensemble.yaml; without one every member votes, and only
        requests with their own budget or accuracy floor pick a subset."""
        self.objective = objective or Objective()
        self.policy = policy
        self.stacked_weights: Mapping[str, float] = {}
        """The ensemble's fitted `stacked` member weights (set by the data plane)."""
        window, age = self.objective.latency_window, self.objective.latency_window_s
        self.member_latency = {m: LatencyWindow(window, age) for m in members}
        self.end_to_end = LatencyWindow(window, age)
        self.candidates: list[Candidate] = []
        self.selected: Candidate | None = None
        self.evaluated: frozenset[str] | None = None
        """The members that were serving at the last evaluation (None before the first)."""
        self.reason = "not evaluated yet"
        self.constraints: list[ConstraintStatus] = []
        self.member_status: list[MemberStatus] = []
        self._lock = threading.Lock()  # evaluate() runs in a worker thread
        self._requests = 0
        self._validation_key: tuple = ()
        self._validation: dict[tuple[str, ...], float] = {}

    # -- hot path --------------------------------------------------------------------------
    def observe(self, member_latency_s: Mapping[str, float], seconds: float | None) -> None:
        """Record one request: each answering member's latency and the end-to-end time
        (None for a shadow call, which no client waited for)."""
        for name, latency in member_latency_s.items():
            window = self.member_latency.get(name)
            if window is not None:
                window.add(latency)
        if seconds is not None:
            self.end_to_end.add(seconds)

    def shadow(self, asked: Sequence[str]) -> list[str]:
        """Members to ask in the background for this request (exploration): every
        1/explore_fraction-th request, those the selection leaves out."""
        fraction = self.objective.explore_fraction
        if self.configured is None or not fraction or len(asked) == len(self.members):
            return []
        self._requests += 1
        if self._requests % max(1, round(1 / fraction)):
            return []
        return [m for m in self.members if m not in asked]

    def choose(self, budget_s: float | None = None, min_accuracy: float | None = None, *,
               strict_budget: bool = True) -> tuple[str, ...]:
        """Members to ask for one request: the selection, or for a request with its own
        latency budget or accuracy floor, the best subset that fits it.

        A budget that only comes from the RPC's deadline (`strict_budget=False`) is a hint:
        when no subset's predicted latency fits it, the usual members are asked and the
        straggler cutoff at the deadline decides who votes. Only an explicit budget or
        accuracy floor that no subset meets raises FailedPrecondition."""
        selected = self.selected
        if selected is None:
            return self.members
        if budget_s is None and min_accuracy is None:
            # without an objective every member is asked (the selection may predate a reload)
            return selected.members if self.configured is not None else self.members
        if _fits(selected, budget_s, min_accuracy):
            # without an objective, every configured member: the selection was made of the
            # members serving at the last evaluation, and one may have come back since
            return selected.members if self.configured is not None else self.members
        choice = best(self.candidates, budget_s, None, min_accuracy)
        if choice is not None:
            return choice.members
        if not strict_budget and budget_s is not None:
            if min_accuracy is None:
                return selected.members  # tried, not refused: the cutoff is the last resort
            choice = best(self.candidates, None, None, min_accuracy)
            if choice is not None:
                return choice.members
            budget_s = None  # the accuracy floor alone is what cannot be met
        raise FailedPrecondition(self._unmet(budget_s, min_accuracy))

    def _unmet(self, budget_s: float | None, min_accuracy: float | None) -> str:
        top = max(c.accuracy for c in self.candidates)
        fastest = min(c.latency_s for c in self.candidates)
        if min_accuracy is not None and min_accuracy > top:
            return (f"ensemble '{self.ensemble}': min_accuracy {min_accuracy:.4f} exceeds the best "
                    f"expected accuracy {top:.4f}")
        if budget_s is not None and budget_s < fastest:
            return (f"ensemble '{self.ensemble}': latency budget {budget_s * 1000:.1f} ms is below the "
                    f"fastest subset's predicted p99 {fastest * 1000:.1f} ms")
        # Each alone can be met (else a message above), so both are set: together they cannot.
        assert budget_s is not None and min_accuracy is not None
        return (f"ensemble '{self.ensemble}': no member subset meets both min_accuracy "
                f"{min_accuracy:.4f} and latency budget {budget_s * 1000:.1f} ms")

    # -- periodic evaluation (off the hot path) ---------------------------------------------
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
                and _fits(current, budget, None, objective.device_memory_mb)
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

    @property
    def score(self) -> float | None:
        """A single-number summary reported beside (never instead of) the constraints:
        expected accuracy minus 0.01 per millisecond over the latency budget."""
        if self.selected is None:
            return None
        over = sum(max(0.0, c.value - c.threshold) for c in self.constraints if c.name == "latency_p99_ms")
        return self.selected.accuracy - 0.01 * over


def _fits(candidate: Candidate, budget_s: float | None, min_accuracy: float | None,
          memory_mb: float | None = None) -> bool:
    return ((budget_s is None or candidate.latency_s <= budget_s)
            and (min_accuracy is None or candidate.accuracy >= min_accuracy)
            and (memory_mb is None or candidate.memory_mb <= memory_mb))


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
