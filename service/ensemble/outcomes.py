"""What one batch asks of its members and what they return: the request's Plan, each
member's MemberOutcome (a FanOut of them), and the error when fewer than the quorum answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from service.batching.requests import Clock
from service.errors import DeadlineExceeded, Overloaded

T = TypeVar("T")

# Lines keep the pipeline's logger name, as before the split: operators filter the logs on it.
log = logging.getLogger("service.ensemble.pipeline")


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


def outcome_of(name: str, task: asyncio.Future, start: float, end: float) -> MemberOutcome:
    if not task.done():
        return MemberOutcome(name, in_time=False, latency_s=end - start)
    if task.cancelled():
        return MemberOutcome(name, in_time=True, latency_s=end - start,
                             error=asyncio.CancelledError(f"member '{name}' was cancelled"))
    error = task.exception()
    if error is not None:
        return MemberOutcome(name, in_time=True, latency_s=end - start, error=error)
    return MemberOutcome(name, in_time=True, latency_s=end - start, result=task.result())


def note_finish(name: str, finished_at: dict[str, float], clock: Clock):
    """Done callback: note the finish time and retrieve the outcome (no 'exception was
    never retrieved' for a late member)."""

    def done(task: asyncio.Future) -> None:
        finished_at.setdefault(name, clock())
        if not task.cancelled():
            error = task.exception()
            if error is not None:
                log_failure(name, error)

    return done


def log_failure(name: str, error: BaseException) -> None:
    """The vote goes on without a failed member: the log says why (the reply only names it).
    Refusals and deadlines are the client's to see, not a failure of the member."""
    if not isinstance(error, (Overloaded, DeadlineExceeded)):
        log.warning("member '%s' failed and is left out of the vote: %s: %s", name, type(error).__name__, error)
