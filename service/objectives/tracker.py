"""Satisficing per ensemble: measure member and end-to-end latency, re-evaluate every member
subset's expected accuracy, latency and memory, and keep the best subset that meets the
constraints selected (with hysteresis, so the choice does not flap).

When no subset meets the constraints, the fallback is the fastest subset (the one most
likely to recover the latency objective), and the constraint is reported as violated.

This module is the tracker and its hot path (observe, shadow, choose); the periodic
evaluation is service.objectives.subset_evaluation, the records service.objectives.status.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

from service.errors import FailedPrecondition
from service.objectives.latency import LatencyWindow
from service.objectives.selection import Candidate, best, fits
from service.objectives.status import ConstraintStatus, MemberStatus
from service.objectives.subset_evaluation import SubsetEvaluation
from service.repository.config import Objective


class ObjectiveTracker(SubsetEvaluation):
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
        if fits(selected, budget_s, min_accuracy):
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

    @property
    def score(self) -> float | None:
        """A single-number summary reported beside (never instead of) the constraints:
        expected accuracy minus 0.01 per millisecond over the latency budget."""
        if self.selected is None:
            return None
        over = sum(max(0.0, c.value - c.threshold) for c in self.constraints if c.name == "latency_p99_ms")
        return self.selected.accuracy - 0.01 * over
