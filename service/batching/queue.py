"""A batcher's queue: the requests waiting (Pending), one queue per priority level, taken from
the head of the highest level as the longest run of compatible live ones, expired at their
deadline, dropped when their caller goes away."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from service.batching.config import BatchingConfig
from service.batching.priority import take_by_priority
from service.batching.requests import Clock
from service.errors import DeadlineExceeded

Keep = Callable[[], np.ndarray]
"""Which rows of a submission are still wanted (a boolean mask over all its rows), asked when
a batch is taken: an ensemble's batch merges several requests, and the rows of one that went
away (cancelled, expired, answered at its cutoff) are not computed."""


class Pending:
    __slots__ = ("rows", "n", "deadline", "arrival", "arrivals", "future", "timer", "queued", "started",
                 "finished", "batch_rows", "keep", "mask", "level")

    def __init__(self, rows: np.ndarray, deadline: float | None, arrival: float,
                 future: asyncio.Future[np.ndarray], arrivals: Sequence[float] | None = None,
                 keep: Keep | None = None, level: int = 1) -> None:
        self.rows = rows
        self.level = level
        """Its priority level (1 is the highest): the queue it waits in."""
        self.keep = keep
        self.mask: np.ndarray | None = None
        """Which of the submitted rows `rows` still holds (None: all of them)."""
        self.n = rows.shape[0]
        self.deadline = deadline
        self.arrival = arrival
        self.arrivals = (arrival,) if arrivals is None else arrivals
        """When the requests whose rows these are arrived (queued first at their model's or
        ensemble's pipeline): each one's queue wait is reported, not one per submission."""
        self.future = future
        self.timer: asyncio.TimerHandle | None = None
        self.queued = True
        self.started = self.finished = 0.0  # its batch's compute (for traces)
        self.batch_rows = 0


class BatchQueue:
    """DynamicBatcher's queue (a part of it: DynamicBatcher.__init__ sets the state below)."""

    name: str
    clock: Clock
    _config: BatchingConfig
    _queues: dict[int, deque[Pending]]
    """Priority level -> its queue (level 1 always there)."""
    _wakeup: asyncio.Event | None
    _depth: int
    _queued_rows: int

    def _unqueue(self, pending: Pending) -> None:
        """Mark a live queued entry dead (it is popped later) and free its rows."""
        pending.queued = False
        self._depth -= 1
        self._queued_rows -= pending.n
        if pending.timer is not None:
            pending.timer.cancel()
        pending.rows = None  # type: ignore[assignment]

    def _expire(self, pending: Pending) -> None:
        if pending.queued:
            self._unqueue(pending)
            if not pending.future.done():
                pending.future.set_exception(DeadlineExceeded(
                    f"model '{self.name}': deadline passed after "
                    f"{self.clock() - pending.arrival:.4f} s in the queue"))
            self._wake()

    def _fail_queued(self, exc: BaseException) -> None:
        for queue in self._queues.values():
            while queue:
                pending = queue.popleft()
                if pending.queued:
                    self._unqueue(pending)
                    if not pending.future.done():
                        pending.future.set_exception(exc)

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _head(self) -> Pending | None:
        """The request the next batch starts with: the head of the highest level queued."""
        for level in sorted(self._queues) if len(self._queues) > 1 else (1,):
            queue = self._queues[level]
            while queue and not queue[0].queued:
                queue.popleft()
            if queue:
                return queue[0]
        return None

    def _prune(self) -> None:
        """Drop from the queued submissions the rows nobody waits for any more (see Keep); a
        submission left with none leaves the queue, cancelled: its batch is not computed."""
        for pending in (p for queue in self._queues.values() for p in queue):
            if pending.keep is None or not pending.queued:
                continue
            wanted = pending.keep()
            current = pending.mask
            if wanted.all() or (current is not None and np.array_equal(wanted, current)):
                continue
            kept = wanted if current is None else wanted[current]
            left = int(kept.sum())
            if not left:
                self._unqueue(pending)
                pending.future.cancel()
                continue
            self._queued_rows -= pending.n - left
            pending.n = left
            pending.rows = pending.rows[kept]
            pending.mask = wanted

    def _take(self) -> tuple[list[Pending], int]:
        """Pop the longest run of compatible live requests that fits in one batch, from the
        highest priority level queued (priority.take_by_priority)."""
        self._prune()
        batch, rows = take_by_priority(self._queues, self._config.max_batch_size, self.clock(), self._expire,
                                       signature)
        for pending in batch:
            if pending.timer is not None:
                pending.timer.cancel()
        self._depth -= len(batch)
        self._queued_rows -= rows
        return batch, rows


def scatter(output: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """A pruned submission's output at the places of all its rows (the dropped rows zeros:
    nobody reads them)."""
    if mask is None:
        return output
    full = np.zeros((mask.size,) + output.shape[1:], dtype=output.dtype)
    full[mask] = output
    return full


def signature(pending: Pending) -> tuple:
    """Requests batch together when their rows have one shape and dtype."""
    return pending.rows.shape[1:], pending.rows.dtype
