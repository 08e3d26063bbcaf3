"""Dynamic batching for one model instance.

Requests queue while the model is busy; the moment it is free, everything queued (up to
`max_batch_size` rows) goes out as one batch. With the default `max_queue_delay_us=0` a
request that finds the model idle is dispatched at once: no timer tax on lone requests
(measured in docs/performance.md). A positive delay lets a small batch wait, from its oldest request's
arrival, for the next preferred size.

Rules:
- A request is never split across batches; one with more rows than `max_batch_size` is
  rejected with InvalidInput (the API documents the limit).
- Requests with different row shapes or dtypes are never merged: a batch is the longest
  run of compatible requests from the head of the queue; the next request starts the next.
- A full queue rejects at once with Overloaded.
- A request whose deadline passes while queued fails with DeadlineExceeded at that
  instant and never runs; a caller cancelled while queued is dropped. Once its batch has
  started, a request runs to the end (compute cannot be interrupted) and its caller gets
  the answer, even past the deadline.
- If `run_batch` raises, every request of that batch gets the exception; the batcher
  keeps serving.

The queue is a deque plus an asyncio.Event created inside the running loop (on `start()`
or the first `submit`), because the dispatcher needs to look at the head, to take a
prefix by rows and to skip dead entries, which asyncio.Queue cannot do. Expired and
cancelled entries are dropped lazily, so every operation is O(1) per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import numpy as np

from service.batching.config import BatchingConfig
from service.batching.requests import Clock, merge, refuse_if_late, split, take_run
from service.errors import DeadlineExceeded, InvalidInput, ModelNotReady, Overloaded
from service.monitoring.stages import COLLECTOR, Stage, record

log = logging.getLogger(__name__)

RunBatch = Callable[[np.ndarray], Awaitable[np.ndarray]]
RunHere = Callable[[np.ndarray], np.ndarray]


class BatchObserver(Protocol):
    def on_batch(self, model: str, batch_rows: int, queue_waits_s: list[float]) -> None:
        """Called once per dispatched batch with its row count and each request's wait."""


class _Pending:
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


class DynamicBatcher:
    requests_everywhere = 0
    """Requests in any batcher of this process, queued or computing (a submission counts
    the requests whose rows it merges; an ensemble's request is in each of its members'):
    one means a lone request, whose batch the event loop would only sit and wait for."""

    def __init__(self, name: str, run_batch: RunBatch, config: BatchingConfig,
                 observer: BatchObserver | None = None, inline: RunHere | None = None,
                 inline_rows: int = 0, *, clock: Clock = time.monotonic) -> None:
        """`inline`: run_batch on the calling thread, for a lone request's batch of at most
        `inline_rows` rows, which costs less computed on the event loop than the two thread
        hand-offs around run_batch (the model's manager decides from its warm-up; None:
        never). A larger batch would hold the loop, and every other call with it.
        `clock`: deadlines, expiry and waits are read on it (see requests.Clock)."""
        self.clock = clock
        self.name = name
        self._model, _, version = name.partition(":")  # "model:version"
        self._trace_attributes = {"quorum.member": self._model, "quorum.version": version}
        self._run_batch = run_batch
        self._inline = inline
        self._inline_rows = inline_rows if inline is not None else 0
        self._config = config
        self._observer = observer
        self._queue: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._depth = 0          # live requests queued
        self._queued_rows = 0    # their rows
        self._in_flight = 0      # rows in running batches
        self._batches_running = 0
        self._stopping = False
        self._batch_s: float | None = None  # recent seconds per batch (EWMA): admission
    @property
    def config(self) -> BatchingConfig:
        return self._config

    @property
    def queue_depth(self) -> int:
        """Requests waiting to be dispatched."""
        return self._depth

    @property
    def in_flight(self) -> int:
        """Rows in batches that are running."""
        return self._in_flight

    # -- lifecycle -------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._dispatcher is None:
            self._wakeup = asyncio.Event()
            self._dispatcher = asyncio.get_running_loop().create_task(
                self._dispatch_loop(), name=f"batcher-{self.name}")
            self._dispatcher.add_done_callback(self._dispatcher_done)

    async def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, let queued and running work finish, stop the dispatcher.

        After `timeout` seconds, requests still queued fail with ModelNotReady; batches
        already running finish in the background (their callers still get answers).
        """
        self._stopping = True
        if self._dispatcher is None:
            return
        self._wake()
        done, _ = await asyncio.wait({self._dispatcher}, timeout=timeout)
        if not done:
            self._fail_queued(ModelNotReady(
                f"model '{self.name}' stopped before the request was dispatched"))
            self._wake()

    # -- requests --------------------------------------------------------------------------
    async def submit(self, rows: np.ndarray, deadline: float | None = None,
                     arrivals: Sequence[float] | None = None) -> np.ndarray:
        """Queue `rows` (n, ...) and return their n output rows.

        `deadline` is an absolute instant on the batcher's clock (time.monotonic() in
        production). `arrivals`: when the requests these rows merge arrived, if they queued
        elsewhere first (on the same clock; by default this call's own instant), for the
        queue waits reported per request.
        """
        if self._stopping:
            raise ModelNotReady(f"model '{self.name}' is stopping")
        cfg = self._config
        if rows.ndim == 0 or rows.shape[0] == 0:
            raise InvalidInput(f"model '{self.name}': a request needs at least one row, "
                               f"got shape {list(rows.shape)}")
        if rows.shape[0] > cfg.max_batch_size:
            raise InvalidInput(
                f"model '{self.name}': request has {rows.shape[0]} rows, more than the "
                f"max batch size of {cfg.max_batch_size}; send at most "
                f"{cfg.max_batch_size} rows per request")
        if self._depth >= cfg.max_queue_size:
            raise Overloaded(f"model '{self.name}': queue full "
                             f"({self._depth} requests waiting); retry later")
        now = self.clock()
        if deadline is not None:
            if deadline <= now:
                raise DeadlineExceeded(f"model '{self.name}': deadline passed before queueing")
            if self._batch_s is not None:
                self._admit(rows.shape[0], deadline - now)
        loop = asyncio.get_running_loop()
        pending = _Pending(rows, deadline, now, loop.create_future(), arrivals)
        if (pending.n <= self._inline_rows and not DynamicBatcher.requests_everywhere and len(pending.arrivals) == 1
                and not self._depth and not self._batches_running and not cfg.max_queue_delay_us):
            # A lone request small enough for the loop: computed here, at once, in the
            # caller's task (the dispatcher would only be woken to do the same later).
            pending.queued = False
            self._batches_running += 1
            self._in_flight += pending.n
            DynamicBatcher.requests_everywhere += 1
            try:
                await self._run([pending], pending.n)  # inline: returns without suspending
            finally:
                DynamicBatcher.requests_everywhere -= 1
            return self._answered(pending)
        self._ensure_started()
        if deadline is not None:
            pending.timer = loop.call_later(deadline - now, self._expire, pending)
        self._queue.append(pending)
        self._depth += 1
        self._queued_rows += pending.n
        self._wake()
        carried = len(pending.arrivals)
        DynamicBatcher.requests_everywhere += carried
        try:
            await pending.future
        except asyncio.CancelledError:
            if pending.queued:
                self._unqueue(pending)
                self._wake()
            raise
        finally:
            DynamicBatcher.requests_everywhere -= carried
        return self._answered(pending)

    def _answered(self, pending: _Pending) -> np.ndarray:
        """The request's output rows (or its batch's error), its stages recorded if traced."""
        output = pending.future.result()
        if COLLECTOR.get() is not None:  # this request is traced: its queue wait and batch
            record(Stage(f"member {self._model}", pending.arrival, pending.finished, self._trace_attributes, (
                Stage("queue", pending.arrival, pending.started),
                Stage("compute", pending.started, pending.finished, {"quorum.batch_rows": pending.batch_rows}))))
        return output

    def _admit(self, rows: int, time_left_s: float) -> None:
        """Refuse at once (Overloaded: RESOURCE_EXHAUSTED) a request that cannot finish in
        time: the batches ahead of it (the running one, the queued rows and its own, at
        max_batch_size a batch) take longer, at the recently measured time per batch, than
        its deadline leaves. Failing fast frees the client to retry elsewhere, and the
        model never spends time on an answer nobody will read.

        An idle model (nothing running, nothing queued) admits: with no work ahead the
        request's own batch is the only way to measure the time per batch anew, and an
        estimate inflated by a busy moment (a saturated event loop, a slow first batch)
        would otherwise refuse every request from then on."""
        if not self._batches_running and not self._queued_rows:
            return
        batches = self._batches_running + -(-(self._queued_rows + rows) // self._config.max_batch_size)
        refuse_if_late(f"model '{self.name}'", self._queued_rows, batches, self._batch_s, time_left_s)  # type: ignore[arg-type]

    def _unqueue(self, pending: _Pending) -> None:
        """Mark a live queued entry dead (it is popped later) and free its rows."""
        pending.queued = False
        self._depth -= 1
        self._queued_rows -= pending.n
        if pending.timer is not None:
            pending.timer.cancel()
        pending.rows = None  # type: ignore[assignment]

    def _expire(self, pending: _Pending) -> None:
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

    # -- dispatcher ------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        cfg = self._config
        wakeup = self._wakeup
        assert wakeup is not None
        while True:
            while not (self._depth and not self._batches_running):
                if self._stopping and not self._depth and not self._batches_running:
                    return
                wakeup.clear()
                await wakeup.wait()
            if cfg.max_queue_delay_us and not self._stopping:
                await self._linger()
            batch, rows = self._take()
            if not batch:
                continue
            self._batches_running += 1
            self._in_flight += rows
            # One batch at a time, run inline (one task switch fewer per batch): the runtime
            # computes on a single executor thread, so a second batch could not overlap.
            await self._run(batch, rows)

    async def _linger(self) -> None:
        """Wait, up to max_queue_delay_us after the oldest queued request arrived, for
        the queued rows to reach the next preferred batch size."""
        cfg = self._config
        wakeup = self._wakeup
        assert wakeup is not None
        head = self._head()
        if head is None:
            return
        until = head.arrival + cfg.max_queue_delay_s
        while self._depth and self._queued_rows < cfg.target_rows(self._queued_rows) \
                and not self._stopping:
            remaining = until - self.clock()
            if remaining <= 0:
                return
            wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await wakeup.wait()
            except TimeoutError:
                return

    def _head(self) -> _Pending | None:
        queue = self._queue
        while queue and not queue[0].queued:
            queue.popleft()
        return queue[0] if queue else None

    def _take(self) -> tuple[list[_Pending], int]:
        """Pop the longest run of compatible live requests that fits in one batch."""
        batch, rows = take_run(self._queue, self._config.max_batch_size, self.clock(), self._expire, _signature)
        for pending in batch:
            if pending.timer is not None:
                pending.timer.cancel()
        self._depth -= len(batch)
        self._queued_rows -= rows
        return batch, rows

    async def _run(self, batch: list[_Pending], rows: int) -> None:
        try:
            if self._observer is not None:
                self._observe(batch, rows)
            merged, counts = merge([pending.rows for pending in batch])
            for pending in batch:
                pending.rows = None  # type: ignore[assignment]
            started = self.clock()
            if self._inline is not None and rows <= self._inline_rows and DynamicBatcher.requests_everywhere == 1:
                # alone: nothing else for the loop to do while the model's thread computes
                outputs = split(self._inline(merged), counts)
            else:
                outputs = split(await self._run_batch(merged), counts)
            finished = self.clock()
            took = finished - started
            self._batch_s = took if self._batch_s is None else 0.8 * self._batch_s + 0.2 * took
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        except BaseException:
            # Cancelled (the loop is shutting down): fail the callers, then propagate.
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(ModelNotReady(
                        f"model '{self.name}' stopped while the batch was running"))
            raise
        else:
            for pending, output in zip(batch, outputs):
                pending.started, pending.finished, pending.batch_rows = started, finished, rows
                if not pending.future.done():
                    pending.future.set_result(output)
        finally:
            self._in_flight -= rows
            self._batches_running -= 1
            self._wake()

    def _observe(self, batch: list[_Pending], rows: int) -> None:
        now = self.clock()
        try:
            self._observer.on_batch(self.name, rows, [now - a for p in batch for a in p.arrivals])  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - metrics must never fail a batch
            log.exception("batch observer failed for model '%s'", self.name)

    def _dispatcher_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.error("batcher '%s' dispatcher died", self.name, exc_info=task.exception())
            self._stopping = True
            self._fail_queued(ModelNotReady(f"model '{self.name}': batcher stopped"))


def _signature(pending: _Pending) -> tuple:
    """Requests batch together when their rows have one shape and dtype."""
    return pending.rows.shape[1:], pending.rows.dtype
