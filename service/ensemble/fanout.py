"""Run every member's call at once and keep the answers that arrive before the deadline.

Straggler mitigation: waiting stops at `deadline - safety_margin_s` (the margin leaves
time to vote and reply), and the vote uses the members that answered by then. A member
that raised counts as not answered; its error is kept. Late members are cancelled by
default: a member call is normally `DynamicBatcher.submit`, where cancelling a queued
request removes it from the queue (less work for an overloaded model) and cancelling a
running one only stops waiting for it, since executor compute cannot be interrupted and
simply completes in the background. With `cancel_late=False` late calls run to the end
unobserved. Either way their outcome is retrieved silently: no "exception was never
retrieved" warnings.

The answer is a `FanOut`: a dict of member name -> `MemberOutcome` (result, latency,
in_time, error), in call order.

If fewer than `quorum` members answered: when the cutoff passed, DeadlineExceeded names
who answered and who was left out and why; when errors put the quorum out of reach
before the cutoff, waiting stops at once and the first member's error is raised
unchanged, so Overloaded or InvalidInput keeps its status code (the object may be shared
by every request of a failed batch, so it is not annotated).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from service.errors import DeadlineExceeded

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class MemberOutcome(Generic[T]):
    name: str
    in_time: bool
    """Finished (answered or raised) before the cutoff."""
    latency_s: float
    """Seconds from the fan-out's start to the member's finish; for a late member, the
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


async def gather_with_deadline(calls: Mapping[str, Awaitable[T]], deadline: float | None,
                               safety_margin_s: float = 0.0, quorum: int = 1, *,
                               cancel_late: bool = True) -> FanOut[T]:
    """Run `calls` concurrently until all finish or `deadline - safety_margin_s`
    (absolute time.monotonic(); None: wait for all) and return every member's outcome;
    raise if fewer than `quorum` answered (see the module docstring)."""
    if not 1 <= quorum <= len(calls):
        for call in calls.values():
            if asyncio.iscoroutine(call):
                call.close()  # never started: no "coroutine was never awaited" warning
        raise ValueError(f"quorum {quorum} must lie in [1, {len(calls)} members]")
    start = time.monotonic()
    finished_at: dict[str, float] = {}
    tasks: dict[str, asyncio.Future[T]] = {}
    for name, call in calls.items():
        task = asyncio.ensure_future(call)
        task.add_done_callback(_quiet(name, finished_at))
        tasks[name] = task
    cutoff = None if deadline is None else deadline - safety_margin_s

    pending = set(tasks.values())
    failed = 0
    timed_out = False
    try:
        while pending:
            timeout = None if cutoff is None else cutoff - time.monotonic()
            if timeout is not None and timeout <= 0:
                timed_out = True
                break
            done, pending = await asyncio.wait(
                pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                timed_out = True
                break
            failed += sum(1 for t in done if t.cancelled() or t.exception() is not None)
            if len(tasks) - failed < quorum:
                break  # quorum is out of reach: stop waiting
    except asyncio.CancelledError:
        for task in pending:
            task.cancel()
        raise

    now = time.monotonic()
    outcomes = {name: _outcome(name, task, start, finished_at.get(name, now))
                for name, task in tasks.items()}
    if cancel_late:
        for task in pending:
            task.cancel()
    answered = [o for o in outcomes.values() if o.answered]
    if len(answered) < quorum:
        summary = (f"{len(answered)} of {len(outcomes)} members answered (quorum {quorum}); "
                   f"answered: {', '.join(o.describe() for o in answered) or 'none'}; "
                   f"left out: {', '.join(o.describe() for o in outcomes.values() if not o.answered)}")
        errors = [o.error for o in outcomes.values() if o.error is not None]
        if timed_out or not errors:
            raise DeadlineExceeded(f"deadline reached: {summary}")
        raise errors[0]
    return FanOut(outcomes)


def _outcome(name: str, task: asyncio.Future[T], start: float, end: float) -> MemberOutcome[T]:
    if not task.done():
        return MemberOutcome(name, in_time=False, latency_s=end - start)
    if task.cancelled():
        return MemberOutcome(name, in_time=True, latency_s=end - start,
                             error=asyncio.CancelledError(f"member '{name}' was cancelled"))
    error = task.exception()
    if error is not None:
        return MemberOutcome(name, in_time=True, latency_s=end - start, error=error)
    return MemberOutcome(name, in_time=True, latency_s=end - start, result=task.result())


def _quiet(name: str, finished_at: dict[str, float]):
    """Done callback: note the finish time and retrieve the outcome, so a late member's
    exception never surfaces as 'Task exception was never retrieved'."""

    def done(task: asyncio.Future) -> None:
        finished_at.setdefault(name, time.monotonic())
        if not task.cancelled():
            task.exception()

    return done
