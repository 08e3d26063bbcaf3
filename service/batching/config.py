"""Dynamic batching knobs for one model instance, as one typed, validated object."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    max_batch_size: int = 64
    """Most rows in one batch. A single request with more rows is rejected (InvalidInput):
    a request is never split across batches."""
    max_queue_delay_us: int = 0
    """How long a batch may wait for more requests, measured from the arrival of its oldest
    request, when it is smaller than the next preferred size. 0 (the default) dispatches
    whatever is queued as soon as the model is free, so a lone request pays no timer."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Batch sizes worth waiting for (only with max_queue_delay_us > 0), e.g. (8, 16, 32)
    for GPU kernels tuned to those shapes. Empty: wait for max_batch_size."""
    max_queue_size: int = 1024
    """Most requests waiting in the queue; one more is rejected at once with Overloaded."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        sizes = tuple(self.preferred_batch_sizes)
        bad = [s for s in sizes if not 1 <= s <= self.max_batch_size]
        if bad:
            raise ValueError(
                f"preferred_batch_sizes {bad} must lie in [1, max_batch_size={self.max_batch_size}]")
        # Stored sorted and unique: the batcher looks for the next size up.
        object.__setattr__(self, "preferred_batch_sizes", tuple(sorted(set(sizes))))

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_us / 1e6

    def target_rows(self, rows: int) -> int:
        """The batch size worth waiting for, given `rows` already queued: the smallest
        preferred size >= rows, else max_batch_size."""
        for size in self.preferred_batch_sizes:
            if size >= rows:
                return size
        return self.max_batch_size
