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
  member; a caller cancelled while queued is dropped. Admission is aware of deadlines: a
  request that cannot start before its cutoff, at the recently measured time per batch, is
  refused at once with Overloaded (RESOURCE_EXHAUSTED). A single model has no partial
  answer: its own batch counts too, and at its deadline it fails with DeadlineExceeded.
- The next batch starts when the running one's members have all answered, so that requests
  queue and merge meanwhile; a straggler holds the queue up at most as long again as the
  batch took to reach its quorum. The dispatcher task lives only while there is work.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from service.batching.requests import Clock, merge, refuse_if_late, take_run
from service.errors import DeadlineExceeded, Overloaded
from service.monitoring.stages import COLLECTOR, Stage

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MemberOutcome(Generic[T]):
    name: str
    in_time: bool
    """Finished (answered or raised) before the cutoff."""
    latency_s: float
    """Seconds from the batch's fan-out to the member's finish; for a late member, the
    time waited before leaving it out (a lower bound on its latency)."""
    result: T | None = None
    error: BaseException | None = None

    @property
    def answered(self) -> bool:
        return self.in_time and self.error is None

    def describe(self) -> str:
        if self.answered:
            return f"{self.name} ({self.latency_s:.4f} s)"
        if not self.in_time:
            return f"{self.name} (no answer after {self.latency_s:.4f} s)"
        return f"{self.name} ({type(self.error).__name__}: {self.error})"


class FanOut(dict[str, MemberOutcome[T]]):
    """Every member's outcome by name, in the order of the calls."""


@dataclass(frozen=True, eq=False)
class Plan:
    """What one request asks of the ensemble; requests with equal keys share batches."""

    members: Mapping[str, Any]
    """member name -> its ServedVersion (anything with `infer(rows, deadline)` and `lease()`)."""
    missing: Mapping[str, Exception]
    """Configured members not serving (voted without, and reported as left out)."""
    quorum: int
    margin_s: float
    context: Any = None
    """What the answer callback needs (the ensemble, its policy...): same key, same context."""
    key: Hashable = field(default=None)


# answer(plan, outcomes, merged rows, [(start, stop) per request]) -> one result per request
Answer = Callable[[Plan, FanOut, np.ndarray, Sequence[tuple[int, int]]], list]


class _Entry:
    __slots__ = ("rows", "n", "deadline", "cutoff", "plan", "signature", "future", "queued", "arrival", "stages")

    def __init__(self, rows: np.ndarray, plan: Plan, deadline: float | None, arrival: float,
                 future: asyncio.Future) -> None:
        self.rows: np.ndarray | None = rows  # None once taken by its batch, or unqueued
        self.n = rows.shape[0]
        self.plan = plan
        self.signature = (plan.key, rows.shape[1:], rows.dtype)
        self.deadline = deadline
        self.cutoff = None if deadline is None else deadline - plan.margin_s
        self.arrival = arrival
        self.future = future
        self.queued = True
        self.stages = COLLECTOR.get()  # the caller's trace, when it is sampled


def _signature(entry: _Entry) -> tuple:
    return entry.signature


def _take_rows(entry: _Entry) -> np.ndarray:
    """The rows of an entry being run, dropped from the entry (its batch holds them now)."""
    rows, entry.rows = entry.rows, None
    assert rows is not None  # an entry runs once, taken from the queue
    return rows


class EnsemblePipeline:
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
        self._queue: deque[_Entry] = deque()
        self._depth = 0
        self._queued_rows = 0
        self._holding = 0                      # running batches the next one waits for
        self._wake: asyncio.Event | None = None  # the dispatcher looks again: a batch let go, or a deadline
        self._next_expiry = math.inf           # the dispatcher wakes then to fail expired requests
        self._dispatcher: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()
        self._batch_s: float | None = None     # recent seconds a batch held the queue (admission)

    @property
    def queue_depth(self) -> int:
        return self._depth

    async def submit(self, plan: Plan, rows: np.ndarray, deadline: float | None) -> Any:
        """Queue `rows` for `plan` and return the answer callback's result for them.
        `deadline` is an absolute instant on the pipeline's clock (time.monotonic() in
        production)."""
        if self._depth >= self.max_queue:
            raise Overloaded(f"{self.what}: queue full ({self._depth} requests waiting); retry later")
        now = self.clock()
        if deadline is not None and self._batch_s is not None:
            self._admit(rows.shape[0], deadline - plan.margin_s - now)
        loop = asyncio.get_running_loop()
        entry = _Entry(rows, plan, deadline, now, loop.create_future())
        if not self._holding and not self._depth and entry.stages is None:
            # Idle: this request is the batch. Run it in the caller's own task (one task
            # created and two hand-offs fewer: what a lone request pays); a traced request
            # goes the dispatcher's way, whose batch context keeps its stages apart.
            entry.queued = False
            self._holding += 1
            if self._wake is None:
                self._wake = asyncio.Event()
            await (self._run_lone(entry) if len(plan.members) == 1 else self._run([entry]))
            return entry.future.result()
        self._queue.append(entry)
        self._depth += 1
        self._queued_rows += entry.n
        self._ensure_dispatcher(loop)
        if deadline is not None and deadline < self._next_expiry:
            self._next_expiry = deadline
            self._wake.set()  # type: ignore[union-attr]
        try:
            return await entry.future
        except asyncio.CancelledError:
            if entry.queued:
                self._unqueue(entry)
            raise

    def _admit(self, rows: int, time_left_s: float) -> None:
        """Refuse at once a request that cannot even start before its cutoff: the batch
        holding the queue and the batches queued ahead take longer, at the recently measured
        time per batch, than its deadline leaves. An ensemble's own batch is not counted:
        once it runs, the straggler cutoff answers it in time with the members in by then;
        a single model's is. An idle queue admits (as a member's batcher does): only a
        batch can measure the time per batch anew."""
        if not self._holding and not self._queued_rows:
            return
        queued = self._queued_rows + (0 if self.partial else rows)
        ahead = (1 if self._holding else 0) + -(-queued // self.max_batch_rows)
        refuse_if_late(self.what, self._queued_rows, ahead, self._batch_s, time_left_s)  # type: ignore[arg-type]

    def _unqueue(self, entry: _Entry) -> None:
        entry.queued = False
        self._depth -= 1
        self._queued_rows -= entry.n
        entry.rows = None

    def _expire(self, entry: _Entry) -> None:
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
                self._next_expiry = min((e.deadline for e in self._queue if e.queued and e.deadline is not None),
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
                for entry in self._queue:
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
            task = loop.create_task(self._run(batch), context=context)
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _take(self) -> list[_Entry]:
        """Pop the longest run of live requests with one plan and row signature that fits
        in a batch (a first request larger than a batch goes alone)."""
        batch, rows = take_run(self._queue, self.max_batch_rows, self.clock(), self._expire, _signature)
        self._depth -= len(batch)
        self._queued_rows -= rows
        return batch

    def _let_go(self, start: float) -> None:
        """A batch that began at `start` stops holding the queue: its time counts towards
        admission's time per batch, and the dispatcher looks again."""
        took = self.clock() - start
        self._batch_s = took if self._batch_s is None else 0.8 * self._batch_s + 0.2 * took
        self._holding -= 1
        self._wake.set()  # type: ignore[union-attr]

    async def _run_lone(self, entry: _Entry) -> None:
        """A lone request to one member, in its caller's own task: the member is awaited
        directly, with no task, wait set or callbacks around it (most of what a lone request
        to a single model paid in the pipeline). The outcomes are _run's: the request's
        cutoff bounds the wait, a failure is the member's error, and a caller that goes
        away cancels the member's call, which then leaves its member's queue."""
        plan = entry.plan
        ((name, served),) = plan.members.items()
        rows = _take_rows(entry)
        result = error = None
        late = False
        start = self.clock()
        try:
            if _others_ready():
                # One turn of the loop first: callers already scheduled (a burst) queue
                # behind this request meanwhile and are merged into the next batch, instead
                # of each finding the model idle and running alone.
                await asyncio.sleep(0)
            if entry.cutoff is None:
                result = await served.infer(rows, entry.deadline, (entry.arrival,))
            elif entry.cutoff <= start:
                late = True  # expired on its way here: the member is never asked
            else:
                call = served.infer(rows, entry.deadline, (entry.arrival,))
                loop = asyncio.get_running_loop()
                timeout = asyncio.timeout_at(loop.time() + (entry.cutoff - start))
                try:
                    async with timeout:
                        result = await call
                except TimeoutError:
                    if not timeout.expired():
                        raise  # the member's own TimeoutError: its error, not the cutoff
                    late = True
        except Exception as exc:  # noqa: BLE001 - the member's error is the outcome
            error = exc
            _log_failure(name, exc)
        except BaseException:
            entry.future.cancel()
            raise
        finally:
            self._let_go(start)
        outcome = MemberOutcome(name, in_time=not late, latency_s=self.clock() - start,
                                result=result, error=error)
        try:
            self._answer_with([entry], [0], plan, FanOut({name: outcome}), rows, [(0, rows.shape[0])],
                              start, timed_out=late)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: the caller learns of it
            log.exception("%s: batch failed", self.what)
            if not entry.future.done():
                entry.future.set_exception(exc)

    async def _run(self, batch: list[_Entry]) -> None:
        plan = batch[0].plan
        loop = asyncio.get_running_loop()
        start = self.clock()
        tasks: dict[str, asyncio.Future] = {}
        gone = loop.create_future()  # done once every caller is answered or went away
        remaining = [len(batch)]
        held = [True]
        grace: asyncio.TimerHandle | None = None

        def one_less(_: asyncio.Future) -> None:
            remaining[0] -= 1
            if not remaining[0] and not gone.done():
                gone.set_result(None)

        def let_go() -> None:
            # The next batch waits for this one's members to finish (so that requests queue
            # and merge meanwhile), but not for stragglers: at most as long again as the
            # quorum took.
            if held[0]:
                held[0] = False
                self._let_go(start)

        try:
            for e in batch:
                e.future.add_done_callback(one_less)
            merged, counts = merge([_take_rows(e) for e in batch])
            spans, at = [], 0
            for c in counts:
                spans.append((at, at + c))
                at += c
            deadlines = [e.deadline for e in batch if e.deadline is not None]
            deadline = max(deadlines) if len(deadlines) == len(batch) else None  # None: one has none
            finished_at: dict[str, float] = {}
            with contextlib.ExitStack() as leases:
                # leased before the calls start: a version swap cannot unload a member in between
                for served in plan.members.values():
                    leases.enter_context(served.lease())
                arrivals = tuple(e.arrival for e in batch)  # each request's queue wait is reported
                for name, served in plan.members.items():
                    task = asyncio.ensure_future(served.infer(merged, deadline, arrivals))
                    task.add_done_callback(_finished(name, finished_at, self.clock))
                    tasks[name] = task
                pending: set[asyncio.Future] = set(tasks.values())
                open_ = list(range(len(batch)))  # requests not yet answered
                failed = 0
                while pending and not gone.done():
                    cutoffs = [cut for i in open_ if (cut := batch[i].cutoff) is not None]
                    timeout = None if not cutoffs else min(cutoffs) - self.clock()
                    if timeout is None or timeout > 0:
                        done, _ = await asyncio.wait(pending | {gone}, timeout=timeout,
                                                     return_when=asyncio.FIRST_COMPLETED)
                        done.discard(gone)
                        pending -= done
                        failed += sum(1 for t in done if t.cancelled() or t.exception() is not None)
                        if not pending:
                            let_go()
                        elif grace is None and len(tasks) - len(pending) - failed >= plan.quorum:
                            grace = loop.call_later(self.clock() - start, let_go)
                        if len(tasks) - failed < plan.quorum:
                            break  # out of reach: every open request gets the error below
                        if done or gone.done():
                            continue
                    # The wait timed out: its timer, armed for the earliest cutoff, fired, so that
                    # cutoff has come (see _dispatch: no re-armed wait until the clock agrees).
                    now = max(self.clock(), min(cutoffs))
                    due = [i for i in open_ if (cut := batch[i].cutoff) is not None and cut <= now]
                    open_ = [i for i in open_ if not ((cut := batch[i].cutoff) is not None and cut <= now)]
                    self._settle(batch, due, plan, tasks, finished_at, start, merged, spans, timed_out=True)
                self._settle(batch, open_, plan, tasks, finished_at, start, merged, spans, timed_out=False)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: every open caller learns of it
            log.exception("%s: batch failed", self.what)
            for e in batch:
                if not e.future.done():
                    e.future.set_exception(exc)
        except BaseException:
            for e in batch:
                if not e.future.done():
                    e.future.cancel()
            raise
        finally:
            for task in tasks.values():
                if not task.done():
                    task.cancel()  # late members: a call still queued leaves its member's queue
            if grace is not None:
                grace.cancel()
            let_go()

    def _settle(self, batch: list[_Entry], indices: list[int], plan: Plan, tasks: Mapping[str, asyncio.Future],
                finished_at: Mapping[str, float], start: float, merged: np.ndarray,
                spans: Sequence[tuple[int, int]], *, timed_out: bool) -> None:
        """Answer the requests at `indices` with the members' outcomes as they stand now
        (callers that went away are skipped)."""
        if not any(not batch[i].future.done() for i in indices):
            return
        now = self.clock()
        outcomes = FanOut({name: _outcome(name, task, start, finished_at.get(name, now))
                           for name, task in tasks.items()})
        self._answer_with(batch, indices, plan, outcomes, merged, spans, start, timed_out=timed_out)

    def _answer_with(self, batch: list[_Entry], indices: list[int], plan: Plan, outcomes: FanOut,
                     merged: np.ndarray, spans: Sequence[tuple[int, int]], start: float, *,
                     timed_out: bool) -> None:
        """Answer the requests at `indices` with these outcomes: the vote, or the shortfall's
        error when fewer than the quorum answered (callers that went away are skipped)."""
        live = [i for i in indices if not batch[i].future.done()]
        if not live:
            return
        answered = [o for o in outcomes.values() if o.answered]
        if len(answered) < plan.quorum:
            error = shortfall(outcomes, plan.quorum, timed_out, None if self.partial else self.what)
            for i in live:
                batch[i].future.set_exception(error)
            return
        results = self._answer(plan, outcomes, merged, [spans[i] for i in live])
        stages = COLLECTOR.get()  # the batch's member calls and vote, when a request is traced
        for i, result in zip(live, results):
            entry = batch[i]
            if entry.stages is not None:
                entry.stages.append(Stage(f"{'ensemble' if self.partial else 'model'} queue", entry.arrival, start,
                                          {"quorum.batch_rows": len(merged)}))
                entry.stages.extend(stages or ())
            entry.future.set_result(result)


def _others_ready() -> bool:
    """Whether other callbacks wait to run in this turn of the event loop (always True where
    the loop does not say: uvloop). asyncio's loop keeps them in `_ready`, a deque, since its
    first release; a lone request pays a turn of the loop only when someone could join it."""
    ready = getattr(asyncio.get_running_loop(), "_ready", None)
    return ready is None or len(ready) > 0


def shortfall(outcomes: FanOut, quorum: int, timed_out: bool, single: str | None = None) -> BaseException:
    """The error for fewer than `quorum` answers: at the cutoff (or with no error to show),
    DeadlineExceeded naming who answered and who was left out and why; when errors alone
    put the quorum out of reach, the first member's error unchanged, so Overloaded or
    InvalidInput keeps its status code (shared by every request of the batch: not annotated).
    `single`: how to name a single model (an ensemble of one), whose message names no members."""
    errors = [o.error for o in outcomes.values() if o.error is not None]
    if single is not None and (timed_out or not errors):
        (outcome,) = outcomes.values()
        return DeadlineExceeded(f"{single}: deadline reached after {outcome.latency_s:.4f} s of compute, "
                                f"before the model answered")
    answered = [o for o in outcomes.values() if o.answered]
    summary = (f"{len(answered)} of {len(outcomes)} members answered (quorum {quorum}); "
               f"answered: {', '.join(o.describe() for o in answered) or 'none'}; "
               f"left out: {', '.join(o.describe() for o in outcomes.values() if not o.answered)}")
    if timed_out or not errors:
        return DeadlineExceeded(f"deadline reached: {summary}")
    return errors[0]


def _outcome(name: str, task: asyncio.Future, start: float, end: float) -> MemberOutcome:
    if not task.done():
        return MemberOutcome(name, in_time=False, latency_s=end - start)
    if task.cancelled():
        return MemberOutcome(name, in_time=True, latency_s=end - start,
                             error=asyncio.CancelledError(f"member '{name}' was cancelled"))
    error = task.exception()
    if error is not None:
        return MemberOutcome(name, in_time=True, latency_s=end - start, error=error)
    return MemberOutcome(name, in_time=True, latency_s=end - start, result=task.result())


def _finished(name: str, finished_at: dict[str, float], clock: Clock):
    """Done callback: note the finish time and retrieve the outcome (no 'exception was
    never retrieved' for a late member)."""

    def done(task: asyncio.Future) -> None:
        finished_at.setdefault(name, clock())
        if not task.cancelled():
            error = task.exception()
            if error is not None:
                _log_failure(name, error)

    return done


def _log_failure(name: str, error: BaseException) -> None:
    """The vote goes on without a failed member: the log says why (the reply only names it).
    Refusals and deadlines are the client's to see, not a failure of the member."""
    if not isinstance(error, (Overloaded, DeadlineExceeded)):
        log.warning("member '%s' failed and is left out of the vote: %s: %s", name, type(error).__name__, error)
