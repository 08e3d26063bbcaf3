"""Ground-truth feedback: a bounded store of recent predictions by request id, and live
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



@dataclass(frozen=True)
class _Prediction:
    model: str
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


@dataclass(frozen=True)
class LiveRow:
    """One labelled row: the truth and what each member (at its version) said."""

    truth: int
    members: dict[str, tuple[int, np.ndarray]]


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

    def record(self, request_id: str, result) -> None:  # result: service.dataplane.InferenceResult
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
        self._predictions[request_id] = _Prediction(result.model, result.labels, vote.label_index, members, size)
        self.bytes += size
        while len(self._predictions) > self._capacity or (self.bytes > self._max_bytes and len(self._predictions) > 1):
            _, forgotten = self._predictions.popitem(last=False)
            self.bytes -= forgotten.size

    def __len__(self) -> int:
        return len(self._predictions)

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
        self._window_for(prediction.model).add(bool(prediction.predicted[row] == truth))
        live = LiveRow(truth, {})
        per_member = len(prediction.members) > 1 or prediction.model not in prediction.members
        for member, (version, answer) in prediction.members.items():
            if isinstance(answer, asyncio.Future) and not answer.done():
                # A shadow call still running: score it when it finishes.
                answer.add_done_callback(functools.partial(
                    self._score, prediction.model, live, member, version, row=row, per_member=per_member))
            else:
                self._score(prediction.model, live, member, version, answer, row, per_member)
        rows = self.rows.get(prediction.model)
        if rows is None:
            rows = self.rows[prediction.model] = deque(maxlen=self._window)
        rows.append(live)
        self.last_feedback_at = now
        return True

    def _score(self, model: str, live: LiveRow, member: str, version: int, answer: Any, row: int,
               per_member: bool) -> None:
        """Add one member's answer on a labelled row (a shadow task's result once it is done)."""
        if isinstance(answer, asyncio.Future):
            if answer.cancelled() or answer.exception() is not None or answer.result() is None:
                return
            answer = answer.result()
        probs = answer[row]
        live.members[member] = (version, probs)
        if per_member:
            self._window_for(f"{model}/{member}").add(bool(probs.argmax() == live.truth))

    def _window_for(self, key: str) -> SlidingAccuracy:
        window = self.accuracy.get(key)
        if window is None:
            window = self.accuracy[key] = SlidingAccuracy(self._window)
        return window

    def live(self, key: str) -> tuple[float | None, int]:
        """(accuracy, samples) for a model, or for "ensemble/member"."""
        window = self.accuracy.get(key)
        return (window.value, window.samples) if window else (None, 0)
