"""Merge requests' row blocks into one batch, and split the batch's output back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def merge(blocks: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """One batch from row blocks of shapes (n_i, ...), plus the row count of each block.

    A lone block is passed through without a copy.
    """
    counts = [block.shape[0] for block in blocks]
    if len(blocks) == 1:
        return blocks[0], counts
    return np.concatenate(blocks, axis=0), counts


def split(output: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """The output rows of each request, in order; `counts` as returned by `merge`.

    The parts are views of `output`, not copies.
    """
    total = sum(counts)
    if output.ndim == 0 or output.shape[0] != total:
        raise ValueError(
            f"batch output has shape {output.shape}, expected {total} rows (one per input row)")
    if len(counts) == 1:
        return [output]
    return np.split(output, np.cumsum(counts[:-1]))
