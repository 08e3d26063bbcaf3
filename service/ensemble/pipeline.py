"""One pipeline per batch for a served model: requests queue at the model, and a batch of
them asks each member once, with all their rows merged, and is voted once, vectorised. An
ensemble has several members; a single model is served as an ensemble of one (its
calibration and its output tensors are then made once per batch too).

Per request, the data plane only decides its plan (which members, which policy, which
quorum) and submits its rows here; the fan-out, the straggler cutoff and the vote are per
batch. Each member's own DynamicBatcher still merges this work with other ensembles'.

Rules:
- A batch is the longest run, from the head of the queue, of requests with the same plan
  (`Plan.key`: members and their serving versions, policy, quorum) and row signature, up to
  `max_batch_rows` rows (a request with more rows goes alone; members split it).
- Each request keeps its own deadline and straggler cutoff (deadline less the ensemble's
  safety margin): at its cutoff it is answered with the members that had answered by then,
  or DeadlineExceeded naming who was late when fewer than its quorum had. When errors put
  the quorum out of reach, every request of the batch gets the first member's error.
- Members are asked with the latest deadline of the batch (none if any request has none),
  so a member's batcher never drops work a request of the batch still waits for.
- A request whose deadline passes while queued fails at that instant and never reaches a
  member; a caller cancelled while queued is dropped. Once its batch is queued at the
  members, a request that goes away (cancelled, or answered at its cutoff) has its rows
  dropped from every member's queue: no member computes them. Admission is aware of deadlines: a
  request that cannot start before its cutoff, at the recently measured time per batch, is
  refused at once with Overloaded (RESOURCE_EXHAUSTED). A single model has no partial
  answer: its own batch counts too, and at its deadline it fails with DeadlineExceeded.
- With priority levels (batching.priority.PRIORITY, set by the front), each level queues
  apart: a batch starts at the highest level's head and fills from the lower levels; a
  lower level may fill a smaller share of the queue and of its deadline (Priority.share).
  A batch asks its members at its highest request's level: their queues, which several
  ensembles may share, serve it before lower levels.
- The next batch starts when the running one's members have all answered, so that requests
  queue and merge meanwhile; a straggler holds the queue up at most as long again as the
  batch took to reach its quorum. The dispatcher task lives only while there is work.

This module is the queue, its admission and its dispatcher; the running of a batch is
service.ensemble.batch_run, the plan and the members' outcomes service.ensemble.outcomes.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections import deque
from typing import Any

import numpy as np

from service.batching.priority import PRIORITY, Priority, take_by_priority
from service.batching.requests import Clock, refuse_if_late, unread
from service.ensemble.batch_run import BatchRunner, Entry
from service.ensemble.outcomes import Answer, Plan
from service.errors import DeadlineExceeded, Overloaded
from service.monitoring.stages import COLLECTOR

def _signature(entry: Entry) -> tuple:
    return entry.signature


class EnsemblePipeline(BatchRunner):
    def __init__(self, name: str, answer: Answer, max_batch_rows: int, max_queue: int,
                 kind: str = "ensemble", *, clock: Clock = time.monotonic) -> None:
        self.clock = clock  # deadlines, cutoffs, expiry and admission (see requests.Clock)
        self.name = name
        self.what = f"{kind} '{name}'"  # how messages name it
        self.partial = kind == "ensemble"
        """An ensemble answers at a request's cutoff with the members in by then; a single
        model (an ensemble of one) has nothing to answer with before its one member."""
        self._answer = answer
        self.max_batch_rows = max_batch_rows
        self.max_queue = max_queue
        self._queues: dict[int, deque[Entry]] = {1: deque()}  # priority level -> its queue
        self._depth = 0
        self._queued_rows = 0
        self._level_rows: dict[int, int] = {1: 0}  # rows queued at each level
        self._holding = 0                      # running batches the next one waits for
        self._wake: asyncio.Event | None = None  # the dispatcher looks again: a batch let go, or a deadline
        self._next_expiry = math.inf           # the dispatcher wakes then to fail expired requests
        self._dispatcher: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()
        self._batch_s: float | None = None     # recent seconds a batch held the queue (admission)
        self._priorities: dict[int, Priority] = {}  # level -> its Priority, for the members' queues

    @property
    def queue_depth(self) -> int:
        return self._depth

    async def submit(self, plan: Plan, rows: np.ndarray, deadline: float | None) -> Any:
        """Queue `rows` for `plan` and return the answer callback's result for them.
        `deadline` is an absolute instant on the pipeline's clock (time.monotonic() in
        production)."""
        priority = PRIORITY.get()
        level, share = (1, 1.0) if priority is None else (priority.level, priority.share)
        if self._depth >= self.max_queue * share:
            raise Overloaded(f"{self.what}: queue full ({self._depth} requests waiting"
                             + ("" if share == 1.0 else f", {self.max_queue * share:.0f} of {self.max_queue} places "
                                f"open to priority {level} of {priority.levels}")  # type: ignore[union-attr]
                             + "); retry later")
        now = self.clock()
        if deadline is not None and self._batch_s is not None:
            self._admit(rows.shape[0], (deadline - plan.margin_s - now) * share, level)
        loop = asyncio.get_running_loop()
        entry = Entry(rows, plan, deadline, now, loop.create_future())
        entry.level = level
        if priority is not None:
            self._priorities[level] = priority
        if not self._holding and not self._depth and entry.stages is None:
            # Idle: this request is the batch. Run it in the caller's own task (one task
            # created and two hand-offs fewer: what a lone request pays); a traced request
            # goes the dispatcher's way, whose batch context keeps its stages apart.
            entry.queued = False
            self._holding += 1
            if self._wake is None:
                self._wake = asyncio.Event()
            try:
                await (self._run_lone(entry) if len(plan.members) == 1 else self._run([entry]))
            except asyncio.CancelledError:
                unread(entry.future)
                raise
            return entry.future.result()
        queue = self._queues.get(level)
        if queue is None:
            queue = self._queues[level] = deque()
            self._level_rows[level] = 0
        queue.append(entry)
        self._depth += 1
        self._queued_rows += entry.n
        self._level_rows[level] += entry.n
        self._ensure_dispatcher(loop)
        if deadline is not None and deadline < self._next_expiry:
            self._next_expiry = deadline
            self._wake.set()  # type: ignore[union-attr]
        try:
            return await entry.future
        except asyncio.CancelledError:
            if entry.queued:
                self._unqueue(entry)
            unread(entry.future)
            raise

    def _admit(self, rows: int, time_left_s: float, level: int = 1) -> None:
        """Refuse at once a request that cannot even start before its cutoff: the batch
        holding the queue and the batches queued ahead (at its priority level or higher: it
        overtakes the lower ones) take longer, at the recently measured time per batch, than
        its deadline leaves (a lower level's share of it: the lowest is refused first). An ensemble's own batch is not counted:
        once it runs, the straggler cutoff answers it in time with the members in by then;
        a single model's is. An idle queue admits (as a member's batcher does): only a
        batch can measure the time per batch anew."""
        if not self._holding and not self._queued_rows:
            return
        before = self._queued_rows if len(self._level_rows) == 1 else \
            sum(n for at, n in self._level_rows.items() if at <= level)
        queued = before + (0 if self.partial else rows)
        ahead = (1 if self._holding else 0) + -(-queued // self.max_batch_rows)
        refuse_if_late(self.what, before, ahead, self._batch_s, time_left_s)  # type: ignore[arg-type]

    def _unqueue(self, entry: Entry) -> None:
        entry.queued = False
        self._depth -= 1
        self._queued_rows -= entry.n
        self._level_rows[entry.level] -= entry.n
        entry.rows = None

    def _expire(self, entry: Entry) -> None:
        if entry.queued:
            self._unqueue(entry)
            if not entry.future.done():
                entry.future.set_exception(DeadlineExceeded(
                    f"{self.what}: deadline passed after "
                    f"{self.clock() - entry.arrival:.4f} s in the queue"))

    # -- dispatch --------------------------------------------------------------------------
    def _ensure_dispatcher(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._dispatcher is None or self._dispatcher.done():
            # its own context: neither it nor its batches belong to the request that woke it
            self._dispatcher = loop.create_task(self._dispatch(), name=f"pipeline-{self.name}",
                                                context=contextvars.Context())

    async def _dispatch(self) -> None:
        wake = self._wake
        assert wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if self._holding:
                # One timer per wait, not one per request: woken when a batch lets go, or
                # at the earliest deadline queued, to fail the requests that expired waiting.
                wake.clear()
                self._next_expiry = min((e.deadline for q in self._queues.values() for e in q if e.queued and e.deadline is not None),
                                        default=math.inf)
                expiry = self._next_expiry
                try:
                    async with asyncio.timeout(None if expiry == math.inf else max(0.0, expiry - self.clock())):
                        await wake.wait()
                    now = self.clock()
                except TimeoutError:
                    # The timer armed for the earliest deadline fired: that deadline has come, as
                    # the batcher's expiry timers and _run_lone's cutoff take it. A loop fires
                    # timers early by up to its clock's resolution (uvloop: to the nearest ms,
                    # under 0.5 ms at once), and re-arming until the clock agreed spun the loop.
                    now = max(self.clock(), expiry)
                for entry in (e for q in self._queues.values() for e in q):
                    if entry.queued and entry.deadline is not None and entry.deadline <= now:
                        self._expire(entry)
                continue
            batch = self._take()
            if not batch:
                self._next_expiry = math.inf
                return  # nothing queued: the next request starts a new dispatcher
            self._holding += 1
            context = contextvars.Context()
            if any(e.stages is not None for e in batch):
                context.run(COLLECTOR.set, [])  # the batch's stages, copied to each traced request
            if self._priorities:  # the members' queues serve the batch at its highest request's level
                best = self._priorities.get(min(e.level for e in batch))
                if best is not None:
                    context.run(PRIORITY.set, best)
            task = loop.create_task(self._run(batch), context=context)
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _take(self) -> list[Entry]:
        """Pop the longest run of live requests with one plan and row signature that fits
        in a batch (a first request larger than a batch goes alone), highest priority first."""
        batch, rows = take_by_priority(self._queues, self.max_batch_rows, self.clock(), self._expire, _signature)
        self._depth -= len(batch)
        self._queued_rows -= rows
        for entry in batch:
            self._level_rows[entry.level] -= entry.n
        return batch
