"""One batch of a pipeline, run: each member asked once with the batch's rows merged (a lone
request to one member awaits it in its own task), and each request answered at its cutoff
or once the quorum is in, with the vote or the shortfall's error."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from service.batching.requests import Clock, merge
from service.ensemble.outcomes import (
    Answer, FanOut, MemberOutcome, Plan, log_failure, note_finish, outcome_of, shortfall)
from service.monitoring.stages import COLLECTOR, Stage

# Lines keep the pipeline's logger name, as before the split: operators filter the logs on it.
log = logging.getLogger("service.ensemble.pipeline")


class Entry:
    __slots__ = ("rows", "n", "deadline", "cutoff", "plan", "signature", "future", "queued", "arrival", "stages",
                 "level")

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
        self.level = 1  # its priority (1 is the highest)


def _take_rows(entry: Entry) -> np.ndarray:
    """The rows of an entry being run, dropped from the entry (its batch holds them now)."""
    rows, entry.rows = entry.rows, None
    assert rows is not None  # an entry runs once, taken from the queue
    return rows


class BatchRunner:
    """EnsemblePipeline's running of a batch (a part of it: EnsemblePipeline.__init__ sets the
    state below; its queue and dispatcher are in service.ensemble.pipeline)."""

    clock: Clock
    what: str
    partial: bool
    _answer: Answer
    _holding: int
    _wake: asyncio.Event | None
    _batch_s: float | None

    def _let_go(self, start: float) -> None:
        """A batch that began at `start` stops holding the queue: its time counts towards
        admission's time per batch, and the dispatcher looks again."""
        took = self.clock() - start
        self._batch_s = took if self._batch_s is None else 0.8 * self._batch_s + 0.2 * took
        self._holding -= 1
        self._wake.set()  # type: ignore[union-attr]

    async def _run_lone(self, entry: Entry) -> None:
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
            log_failure(name, exc)
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

    async def _run(self, batch: list[Entry]) -> None:
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
                keep = _wanted(batch, spans, len(merged))
                for name, served in plan.members.items():
                    task = asyncio.ensure_future(served.infer(merged, deadline, arrivals, keep))
                    task.add_done_callback(note_finish(name, finished_at, self.clock))
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

    def _settle(self, batch: list[Entry], indices: list[int], plan: Plan, tasks: Mapping[str, asyncio.Future],
                finished_at: Mapping[str, float], start: float, merged: np.ndarray,
                spans: Sequence[tuple[int, int]], *, timed_out: bool) -> None:
        """Answer the requests at `indices` with the members' outcomes as they stand now
        (callers that went away are skipped)."""
        if not any(not batch[i].future.done() for i in indices):
            return
        now = self.clock()
        outcomes = FanOut({name: outcome_of(name, task, start, finished_at.get(name, now))
                           for name, task in tasks.items()})
        self._answer_with(batch, indices, plan, outcomes, merged, spans, start, timed_out=timed_out)

    def _answer_with(self, batch: list[Entry], indices: list[int], plan: Plan, outcomes: FanOut,
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


def _wanted(batch: list[Entry], spans: Sequence[tuple[int, int]], rows: int) -> Callable[[], np.ndarray]:
    """The rows of the batch whose request still waits (asked by a member's queue before it
    computes them: a caller gone or answered at its cutoff is dropped there, every member)."""
    def keep() -> np.ndarray:
        mask = np.ones(rows, dtype=bool)
        for entry, (a, b) in zip(batch, spans):
            if entry.future.done():
                mask[a:b] = False
        return mask
    return keep


def _others_ready() -> bool:
    """Whether other callbacks wait to run in this turn of the event loop (always True where
    the loop does not say: uvloop). asyncio's loop keeps them in `_ready`, a deque, since its
    first release; a lone request pays a turn of the loop only when someone could join it."""
    ready = getattr(asyncio.get_running_loop(), "_ready", None)
    return ready is None or len(ready) > 0
