"""Sliding-window latency: the last N observations no older than a maximum age, in
preallocated ring buffers, so that recording is O(1) and percentiles are computed only when
asked (off the hot path). The age limit lets stale outliers expire: a member measured only
now and then (see shadow calls) is judged on recent behaviour."""

from __future__ import annotations

import time

import numpy as np


class LatencyWindow:
    def __init__(self, size: int, max_age_s: float = float("inf")) -> None:
        self._values = np.zeros(size, dtype=np.float64)
        self._times = np.zeros(size, dtype=np.float64)
        self._next = 0
        self._filled = 0
        self.max_age_s = max_age_s

    def add(self, seconds: float, now: float | None = None) -> None:
        self._values[self._next] = seconds
        self._times[self._next] = time.monotonic() if now is None else now
        self._next = (self._next + 1) % self._values.size
        self._filled = min(self._filled + 1, self._values.size)

    def _recent(self, now: float | None = None) -> np.ndarray:
        now = time.monotonic() if now is None else now
        times = self._times[: self._filled]
        return self._values[: self._filled][times >= now - self.max_age_s]

    @property
    def count(self) -> int:
        """Observations in the window (at most its size, none older than max_age_s)."""
        return int(self._recent().size)

    def percentile(self, q: float, now: float | None = None) -> float | None:
        recent = self._recent(now)
        return float(np.percentile(recent, q)) if recent.size else None

    def clear(self) -> None:
        self._next = self._filled = 0
