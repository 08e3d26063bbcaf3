"""Sliding-window latency: the last N observations in a preallocated ring buffer, so that
recording is O(1) and percentiles are computed only when asked (off the hot path)."""

from __future__ import annotations

import numpy as np


class LatencyWindow:
    def __init__(self, size: int) -> None:
        self._values = np.zeros(size, dtype=np.float64)
        self._next = 0
        self.count = 0
        """Observations in the window (at most its size)."""

    def add(self, seconds: float) -> None:
        self._values[self._next] = seconds
        self._next = (self._next + 1) % self._values.size
        self.count = min(self.count + 1, self._values.size)

    def percentile(self, q: float) -> float | None:
        if self.count == 0:
            return None
        return float(np.percentile(self._values[: self.count], q))

    def clear(self) -> None:
        self._next = self.count = 0
