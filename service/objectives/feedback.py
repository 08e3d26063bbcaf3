"""The in-process feedback store (the default): recent predictions by request id, and live
accuracy over a sliding window of labelled rows, for each model and ensemble member.

The store is bounded by count and by bytes, and costs O(1) per stored prediction and per
label whatever its size: an OrderedDict gives the oldest prediction to forget, and each
prediction keeps its own set of labelled rows (forgotten with it)."""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.objectives.store import (FEEDBACK_CHUNK, FeedbackOutcome, LiveRow, PodCounters, Uncertain, per_member,
                                      score)

__all__ = ["FeedbackStore", "LiveRow", "SlidingAccuracy"]


@dataclass(frozen=True)
class _Prediction:
    model: str
    version: int
    labels: tuple[str, ...]
    predicted: np.ndarray
    """(n,) the answer's class index per row."""
    members: dict[str, tuple[int, Any]]
    """member -> (version, (n, C) calibrated probabilities), for members that answered in
    time; for shadow members, an asyncio task that gives them (or None)."""
    size: int = 0
    """Bytes this entry holds (arrays and id), for the store's byte bound."""
    labelled: set[int] = field(default_factory=set)
    """Rows already labelled (each row is scored once)."""
    uncertain: Uncertain | None = None
    """The prediction sets and abstentions the answer carried, if asked."""


class SlidingAccuracy:
    """Share of correct answers among the last `window` labelled rows."""

    def __init__(self, window: int) -> None:
        self._hits: deque[bool] = deque(maxlen=window)
        self._correct = 0

    def add(self, correct: bool) -> None:
        if len(self._hits) == self._hits.maxlen and self._hits[0]:
            self._correct -= 1
        self._hits.append(correct)
        self._correct += correct

    @property
    def samples(self) -> int:
        return len(self._hits)

    @property
    def value(self) -> float | None:
        return self._correct / len(self._hits) if self._hits else None


class FeedbackStore:
    """One process's predictions and labels (service.objectives.store.Store): with N
    replicas, a label counts only on the replica that answered its request."""

    name = "in-process"

    def __init__(self, capacity: int = 20_000, window: int = 1000, max_bytes: int = 256 * 1024 * 1024) -> None:
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._window = window
        self._predictions: OrderedDict[str, _Prediction] = OrderedDict()
        self.bytes = 0
        """Bytes held by the stored predictions (bounded by max_bytes)."""
        self.accuracy: dict[str, SlidingAccuracy] = {}
        """Live accuracy by model, and by "ensemble/member" for members' own votes."""
        self.rows: dict[str, deque[LiveRow]] = {}
        """Labelled rows by model, for replaying member subsets (satisficing selection)."""
        self.last_feedback_at: float | None = None
        self.counters = PodCounters()

    def record(self, request_id: str, result) -> None:  # result: service.results.InferenceResult
        """Remember a request's answers (oldest forgotten first beyond the capacity)."""
        vote = result.vote
        versions = {m.name: m.version for m in result.members}
        members = {name: (versions[name], result.member_probabilities[i]) for i, name in enumerate(vote.members)}
        members.update(result.shadow)  # (version, task): resolved when feedback arrives
        size = len(request_id) + vote.label_index.nbytes + sum(
            a.nbytes for _, a in members.values() if isinstance(a, np.ndarray))
        old = self._predictions.pop(request_id, None)  # an id sent again: the latest answer counts
        if old is not None:
            self.bytes -= old.size
        self._predictions[request_id] = _Prediction(result.model, result.version, result.labels, vote.label_index,
                                                    members, size, uncertain=result.uncertain)
        self.bytes += size
        while len(self._predictions) > self._capacity or (self.bytes > self._max_bytes and len(self._predictions) > 1):
            _, forgotten = self._predictions.popitem(last=False)
            self.bytes -= forgotten.size

    def __len__(self) -> int:
        return len(self._predictions)

    async def add_labels(self, labels, now: float) -> FeedbackOutcome:
        """Score each label (request_id, row, label), a chunk per turn of the event loop."""
        outcome = FeedbackOutcome()
        for start in range(0, len(labels), FEEDBACK_CHUNK):
            if start:
                await asyncio.sleep(0)  # let requests in between chunks
            for item in labels[start:start + FEEDBACK_CHUNK]:
                try:
                    if self.add(item.request_id, item.row, item.label, now):
                        outcome.accepted += 1
                    else:
                        outcome.rejected += 1
                except KeyError:
                    outcome.unknown[item.request_id] = None
        return outcome

    def add(self, request_id: str, row: int, label: str, now: float) -> bool:
        """Score one labelled row; False when the row or label is out of range or the row is
        already labelled; KeyError when the request id is unknown (or forgotten)."""
        prediction = self._predictions.get(request_id)
        if prediction is None:
            raise KeyError(request_id)
        if not 0 <= row < len(prediction.predicted):
            return False
        if row in prediction.labelled or label not in prediction.labels:
            return False
        truth = prediction.labels.index(label)
        prediction.labelled.add(row)
        separate = per_member(prediction.model, prediction.members)
        ready = {}
        for member, (version, answer) in prediction.members.items():
            if isinstance(answer, asyncio.Future) and not answer.done():
                continue  # a shadow call still running: scored when it finishes (below)
            probs = _resolved(answer)
            if probs is not None:
                ready[member] = (version, probs[row])
        predicted = int(prediction.predicted[row])
        uncertain = prediction.uncertain.outcome(row, truth, predicted) if prediction.uncertain else None
        live, outcomes = score(prediction.model, prediction.version, predicted, truth, ready, separate, uncertain)
        self._count(outcomes)
        self.counters.add_uncertain(prediction.model, uncertain)
        for member, (version, answer) in prediction.members.items():
            if isinstance(answer, asyncio.Future) and not answer.done():
                answer.add_done_callback(functools.partial(self._score_shadow, prediction.model, live, member,
                                                           version, row, separate))
        rows = self.rows.get(prediction.model)
        if rows is None:
            rows = self.rows[prediction.model] = deque(maxlen=self._window)
        rows.append(live)
        self.last_feedback_at = now
        return True

    def _score_shadow(self, model: str, live: LiveRow, member: str, version: int, row: int, separate: bool,
                      answer: asyncio.Future) -> None:
        """A shadow member's answer on a labelled row, once its call has finished."""
        probs = _resolved(answer)
        if probs is None:
            return
        live.members[member] = (version, probs[row])
        if separate:
            self._count([(model, member, version, int(probs[row].argmax()) == live.truth)])

    def _count(self, outcomes: list[tuple[str, str, int, bool]]) -> None:
        for model, member, _, correct in outcomes:
            self._window_for(f"{model}/{member}" if member else model).add(correct)
        self.counters.add(outcomes)

    def _window_for(self, key: str) -> SlidingAccuracy:
        window = self.accuracy.get(key)
        if window is None:
            window = self.accuracy[key] = SlidingAccuracy(self._window)
        return window

    def live(self, key: str) -> tuple[float | None, int]:
        """(accuracy, samples) for a model, or for "ensemble/member"."""
        window = self.accuracy.get(key)
        return (window.value, window.samples) if window else (None, 0)

    def live_all(self) -> dict[str, tuple[float | None, int]]:
        return {key: (window.value, window.samples) for key, window in list(self.accuracy.items())}

    def live_rows(self, model: str) -> list[LiveRow]:
        return list(self.rows.get(model, ()))

    def available(self) -> bool:
        return True

    async def start(self) -> str | None:
        return None

    async def stop(self) -> None:
        return None


def _resolved(answer: Any) -> np.ndarray | None:
    """A member's probabilities: the array, or a finished shadow task's result (None if it failed)."""
    if isinstance(answer, asyncio.Future):
        if answer.cancelled() or answer.exception() is not None:
            return None
        return answer.result()
    return answer
