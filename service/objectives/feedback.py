"""Ground-truth feedback: a bounded store of recent predictions by request id, and live
accuracy over a sliding window of labelled rows, for each model and ensemble member."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from service.dataplane import InferenceResult


@dataclass(frozen=True)
class _Prediction:
    model: str
    labels: tuple[str, ...]
    predicted: np.ndarray
    """(n,) the answer's class index per row."""
    members: dict[str, np.ndarray]
    """member -> (n,) its own class index per row (members that answered in time)."""


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
    def __init__(self, capacity: int = 100_000, window: int = 1000) -> None:
        self._capacity = capacity
        self._window = window
        self._predictions: OrderedDict[str, _Prediction] = OrderedDict()
        self._labelled: set[tuple[str, int]] = set()
        self.accuracy: dict[str, SlidingAccuracy] = {}
        """Live accuracy by model, and by "ensemble/member" for members' own votes."""
        self.last_feedback_at: float | None = None

    def record(self, request_id: str, result: InferenceResult) -> None:
        """Remember a request's answers (oldest forgotten first beyond the capacity)."""
        vote = result.vote
        members = {name: vote.member_labels[i] for i, name in enumerate(vote.members)}
        self._predictions[request_id] = _Prediction(result.model, result.labels, vote.label_index, members)
        if len(self._predictions) > self._capacity:
            old_id, _ = self._predictions.popitem(last=False)
            self._labelled = {k for k in self._labelled if k[0] != old_id}

    def add(self, request_id: str, row: int, label: str, now: float) -> bool:
        """Score one labelled row; False when the id is unknown (or forgotten), the row or
        label out of range, or the row already labelled."""
        prediction = self._predictions.get(request_id)
        if prediction is None or not 0 <= row < len(prediction.predicted):
            return False
        if label not in prediction.labels or (request_id, row) in self._labelled:
            return False
        truth = prediction.labels.index(label)
        self._labelled.add((request_id, row))
        self._window_for(prediction.model).add(bool(prediction.predicted[row] == truth))
        if len(prediction.members) > 1 or prediction.model not in prediction.members:
            for member, predicted in prediction.members.items():
                self._window_for(f"{prediction.model}/{member}").add(bool(predicted[row] == truth))
        self.last_feedback_at = now
        return True

    def _window_for(self, key: str) -> SlidingAccuracy:
        window = self.accuracy.get(key)
        if window is None:
            window = self.accuracy[key] = SlidingAccuracy(self._window)
        return window

    def live(self, key: str) -> tuple[float | None, int]:
        """(accuracy, samples) for a model, or for "ensemble/member"."""
        window = self.accuracy.get(key)
        return (window.value, window.samples) if window else (None, 0)
