"""The batch-invariance check: does a row's output depend on what it was batched with?

Each row is run alone, then the same rows are run together in one batch in a shuffled
order; the check reports the largest absolute difference between the two answers for the
same row (0.0 means bitwise identical).
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def batch_deviation(predict: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, seed: int = 0) -> float:
    alone = np.concatenate([predict(rows[i:i + 1]) for i in range(rows.shape[0])])
    order = np.random.default_rng(seed).permutation(rows.shape[0])
    together = np.empty_like(alone)
    together[order] = predict(rows[order])
    return float(np.max(np.abs(alone.astype(np.float64) - together.astype(np.float64))))
