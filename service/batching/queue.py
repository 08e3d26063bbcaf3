"""A batcher's queue: the requests waiting (Pending), taken from the head as the longest run
of compatible live ones, expired at their deadline, dropped when their caller goes away."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

import numpy as np

from service.batching.config import BatchingConfig
from service.batching.requests import Clock, take_run
from service.errors import DeadlineExceeded


class Pending:
    __slots__ = ("rows", "n", "deadline", "arrival", "arrivals", "future", "timer", "queued", "started",
                 "finished", "batch_rows")

    def __init__(self, rows: np.ndarray, deadline: float | None, arrival: float,
                 future: asyncio.Future[np.ndarray], arrivals: Sequence[float] | None = None) -> None:
        self.rows = rows
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
    _queue: deque[Pending]
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
        while self._queue:
            pending = self._queue.popleft()
            if pending.queued:
                self._unqueue(pending)
                if not pending.future.done():
                    pending.future.set_exception(exc)

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _head(self) -> Pending | None:
        queue = self._queue
        while queue and not queue[0].queued:
            queue.popleft()
        return queue[0] if queue else None

    def _take(self) -> tuple[list[Pending], int]:
        """Pop the longest run of compatible live requests that fits in one batch."""
        batch, rows = take_run(self._queue, self._config.max_batch_size, self.clock(), self._expire, signature)
        for pending in batch:
            if pending.timer is not None:
                pending.timer.cancel()
        self._depth -= len(batch)
        self._queued_rows -= rows
        return batch, rows


def signature(pending: Pending) -> tuple:
    """Requests batch together when their rows have one shape and dtype."""
    return pending.rows.shape[1:], pending.rows.dtype
