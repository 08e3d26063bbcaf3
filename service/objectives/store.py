"""The feedback store's contract: what the fronts, the selection and the metrics ask of
whichever backend keeps predictions awaiting ground truth (in process, or Redis for a fleet).

Both backends score a labelled row the same way (`score`) and count, per pod, the rows this
process accepted (`PodCounters`): Prometheus sums those over pods to get the fleet's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.errors import InvalidInput, Unavailable

FEEDBACK_CHUNK = 1000
"""Labels handled between two turns of the event loop: a call with 100,000 labels never
holds the loop for more than one chunk's work."""


class StoreUnavailable(Unavailable):
    """The shared store cannot be reached: Feedback answers UNAVAILABLE naming it."""


@dataclass(frozen=True)
class UncertainOutcome:
    """A labelled row's prediction set and abstention, scored: whether the truth was in the set
    (at the coverage asked) and whether the answer, given, was wrong (at the risk asked)."""

    coverage: float | None = None
    covered: bool = False
    max_risk: float | None = None
    answered: bool = False
    wrong: bool = False


@dataclass(frozen=True)
class Uncertain:
    """What an answer carried of its uncertainty (service/uncertainties.py): kept with the
    prediction, so that the rows labelled later count for live coverage and live risk."""

    coverage: float | None = None
    sets: np.ndarray | None = None
    """(n, C) bool: each row's prediction set, when a coverage was asked."""
    max_risk: float | None = None
    abstained: np.ndarray | None = None
    """(n,) bool, when a max_risk was asked."""

    def outcome(self, row: int, truth: int, predicted: int) -> UncertainOutcome | None:
        if self.coverage is None and self.max_risk is None:
            return None
        covered = self.sets is not None and bool(self.sets[row, truth])
        answered = self.abstained is not None and not bool(self.abstained[row])
        return UncertainOutcome(self.coverage, covered, self.max_risk, answered, answered and predicted != truth)


@dataclass(frozen=True)
class LiveRow:
    """One labelled row: the truth and what each member (at its version) said."""

    truth: int
    members: dict[str, tuple[int, np.ndarray]]
    uncertain: UncertainOutcome | None = None


@dataclass
class FeedbackOutcome:
    """What one Feedback call did: rows accepted, labels rejected, ids not (or no longer) known."""

    accepted: int = 0
    rejected: int = 0
    unknown: dict[str, None] = field(default_factory=dict)  # ordered, O(1) to deduplicate


class PodCounters:
    """Rows this process accepted, per (model, member, version) (member "" for the model's own
    answer), and predictions it could not store: exported as Prometheus counters that sum
    across pods."""

    def __init__(self) -> None:
        self.labelled: Counter[tuple[str, str, int]] = Counter()
        self.correct: Counter[tuple[str, str, int]] = Counter()
        self.unstored = 0
        # per model: labelled rows with a set, covered, sum of coverage asked, sum of c (1 - c)
        self.conformal: dict[str, list[float]] = {}
        # per model: answered rows (max_risk asked, not abstained), wrong, sum of risk, sum of r (1 - r)
        self.selective: dict[str, list[float]] = {}

    def add_uncertain(self, model: str, outcome: UncertainOutcome | None) -> None:
        if outcome is None:
            return
        if outcome.coverage is not None:
            c = outcome.coverage
            sums = self.conformal.setdefault(model, [0.0, 0.0, 0.0, 0.0])
            sums[0] += 1
            sums[1] += outcome.covered
            sums[2] += c
            sums[3] += c * (1 - c)
        if outcome.max_risk is not None and outcome.answered:
            r = outcome.max_risk
            sums = self.selective.setdefault(model, [0.0, 0.0, 0.0, 0.0])
            sums[0] += 1
            sums[1] += outcome.wrong
            sums[2] += r
            sums[3] += r * (1 - r)

    def add(self, outcomes: Sequence[tuple[str, str, int, bool]]) -> None:
        for model, member, version, correct in outcomes:
            key = (model, member, version)
            self.labelled[key] += 1
            if correct:
                self.correct[key] += 1


def check_label_count(count: int, limit: int) -> None:
    """A Feedback call is bounded like a request's rows: beyond it, INVALID_ARGUMENT naming the limit."""
    if count > limit:
        raise InvalidInput(f"Feedback carries {count} labels, more than the limit of {limit} per call "
                           "(--max-feedback-labels, QUORUM_MAX_FEEDBACK_LABELS): send them in smaller calls")


def score(model: str, version: int, predicted: int, truth: int, answers: Mapping[str, tuple[int, np.ndarray]],
          per_member: bool, uncertain: UncertainOutcome | None = None
          ) -> tuple[LiveRow, list[tuple[str, str, int, bool]]]:
    """One labelled row: its LiveRow (for the selection's replay) and the (model, member,
    version, correct) outcomes to count; `answers` holds each member's probabilities on the row."""
    outcomes = [(model, "", version, predicted == truth)]
    members = {}
    for member, (member_version, probs) in answers.items():
        members[member] = (member_version, probs)
        if per_member:
            outcomes.append((model, member, member_version, int(probs.argmax()) == truth))
    return LiveRow(truth, members, uncertain), outcomes


def window_uncertainty(rows: Sequence[LiveRow]) -> tuple[float | None, int, float | None, int]:
    """(coverage, rows with a set, risk, answered rows) over a window of labelled rows: the
    share of rows whose truth was in their set, and of answered rows that were wrong."""
    outcomes = [r.uncertain for r in rows if r.uncertain is not None]
    sets = [o.covered for o in outcomes if o.coverage is not None]
    answered = [o.wrong for o in outcomes if o.max_risk is not None and o.answered]
    return (float(np.mean(sets)) if sets else None, len(sets),
            float(np.mean(answered)) if answered else None, len(answered))


def per_member(model: str, members: Mapping[str, Any]) -> bool:
    """Whether members are scored on their own: an ensemble's are, a single model (an
    ensemble of one, itself) is not."""
    return len(members) > 1 or model not in members


class Store(Protocol):
    """A feedback store. `record` is on the request path and never waits for I/O."""

    name: str
    """How messages and logs name it: "in-process", or the Redis URL without its password."""
    counters: PodCounters
    last_feedback_at: float | None

    def record(self, request_id: str, result: Any) -> None:
        """Keep a request's answers (a service.results.InferenceResult) for later feedback."""

    async def add_labels(self, labels: Sequence[Any], now: float) -> FeedbackOutcome:
        """Score labels (each with request_id, row and label); StoreUnavailable when the
        store cannot be reached."""

    def live(self, key: str) -> tuple[float | None, int]:
        """(accuracy, samples) over the window of labelled rows, for a model or "ensemble/member"."""

    def live_all(self) -> dict[str, tuple[float | None, int]]:
        """live() for every key that has rows."""

    def live_rows(self, model: str) -> list[LiveRow]:
        """The window's labelled rows of a model, for replaying member subsets."""

    def available(self) -> bool:
        """Whether the store answered at its last use."""

    async def start(self) -> str | None:
        """Connect; the reason it cannot be reached now, or None."""

    async def stop(self) -> None:
        """Write what is queued (briefly), then close."""
