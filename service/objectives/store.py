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
class LiveRow:
    """One labelled row: the truth and what each member (at its version) said."""

    truth: int
    members: dict[str, tuple[int, np.ndarray]]


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
          per_member: bool) -> tuple[LiveRow, list[tuple[str, str, int, bool]]]:
    """One labelled row: its LiveRow (for the selection's replay) and the (model, member,
    version, correct) outcomes to count; `answers` holds each member's probabilities on the row."""
    outcomes = [(model, "", version, predicted == truth)]
    members = {}
    for member, (member_version, probs) in answers.items():
        members[member] = (member_version, probs)
        if per_member:
            outcomes.append((model, member, member_version, int(probs.argmax()) == truth))
    return LiveRow(truth, members), outcomes


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
        """Keep a request's answers (a service.dataplane.InferenceResult) for later feedback."""

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
