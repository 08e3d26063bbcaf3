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
- With priority levels (batching.priority.PRIORITY: a request's, or the batch of an ensemble
  that asks this member), each level queues apart and a batch starts at the highest level's
  head: a member shared by several ensembles serves their high-priority batches first, not in
  arrival order (a request without a priority is at level 1, as before levels existed).
- A request whose deadline passes while queued fails with DeadlineExceeded at that
  instant and never runs; a caller cancelled while queued is dropped, and so are the rows
  its `keep` no longer wants (an ensemble's batch: see queue.Keep). Once its batch has
  started, a request runs to the end (compute cannot be interrupted) and its caller gets
  the answer, even past the deadline.
- If `run_batch` raises, every request of that batch gets the exception; the batcher
  keeps serving.

The queue is a deque plus an asyncio.Event created inside the running loop (on `start()`
or the first `submit`), because the dispatcher needs to look at the head, to take a
prefix by rows and to skip dead entries, which asyncio.Queue cannot do. Expired and
cancelled entries are dropped lazily, so every operation is O(1) per request.

This module is the requests' side (submit, admission, stop); the queue is
service.batching.queue, the dispatcher that runs the batches service.batching.dispatcher.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence

import numpy as np

from service.batching.config import BatchingConfig
from service.batching.dispatcher import BatchDispatcher, BatchObserver, RunBatch, RunHere
from service.batching.priority import PRIORITY
from service.batching.queue import Keep, Pending
from service.batching.requests import Clock, refuse_if_late, unread
from service.errors import DeadlineExceeded, InvalidInput, ModelNotReady, Overloaded
from service.monitoring.stages import COLLECTOR, Stage, record


class DynamicBatcher(BatchDispatcher):
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
        self._queues: dict[int, deque[Pending]] = {1: deque()}  # priority level -> its queue
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

    # -- lifecycle (the dispatcher starts on the first queued request) ----------------------
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
                     arrivals: Sequence[float] | None = None, keep: Keep | None = None) -> np.ndarray:
        """Queue `rows` (n, ...) and return their n output rows.

        `deadline` is an absolute instant on the batcher's clock (time.monotonic() in
        production). `arrivals`: when the requests these rows merge arrived, if they queued
        elsewhere first (on the same clock; by default this call's own instant), for the
        queue waits reported per request. `keep`: which rows are still wanted (see Keep);
        the others are dropped while queued and come back as zeros.
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
        priority = PRIORITY.get()  # a member shared by ensembles: their batches' priority
        pending = Pending(rows, deadline, now, loop.create_future(), arrivals, keep,
                          1 if priority is None else priority.level)
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
        queue = self._queues.get(pending.level)
        if queue is None:
            queue = self._queues[pending.level] = deque()
        queue.append(pending)
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
            unread(pending.future)
            raise
        finally:
            DynamicBatcher.requests_everywhere -= carried
        return self._answered(pending)

    def _answered(self, pending: Pending) -> np.ndarray:
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
