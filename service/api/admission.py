"""Which calls the server still takes: open while serving, refusing during shutdown, and
failing fast under overload (a deadline shorter than the work already in flight), the lowest
priority first."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from service import errors
from service.batching.priority import Priority

ALWAYS_ANSWERED = ("/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady",
                   "/inference.GRPCInferenceService/ServerMetadata")
"""Asked before and during loading (a client waiting for readiness): not held by admission."""


class Admission:
    """Which calls the server still takes, and how many it is answering.

    Open while serving and through the drain delay; once closed (shutdown), every new call
    is refused at once with UNAVAILABLE, so the calls already accepted finish on a quiet
    loop and the transport closes with nothing left half-received.

    Under overload it fails fast: a call whose deadline is less than half the time the calls
    already in flight will take to finish (Little's law: in flight / measured completions
    per busy second) is refused at once with RESOURCE_EXHAUSTED, so the server spends its
    time on calls that can still be answered in time and the client can retry elsewhere.
    Half, not all: an ensemble answering at its straggler cutoff takes about its callers'
    deadline by design, and a call like theirs must still be let in.

    With priority levels (the model's, read from the call at its entry: api/priority.py), a
    call may count on its level's share of its deadline (Priority.share, as the model's own
    queue does): the lowest level is refused first, and the top `priority_reserve` of the
    work the server takes on is kept for the highest.

    A call whose deadline has passed before it is seen is refused DEADLINE_EXCEEDED (its own
    deadline ended it, not the load); one refused for the work ahead, RESOURCE_EXHAUSTED.
    """

    RATE_WINDOW_S = 0.25  # busy seconds per completion-rate measurement
    SLACK = 2.0  # refuse when the work ahead exceeds this many times the deadline left

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.open = True
        self.loading = True
        """Until the first load has finished: a model call would find no model yet."""
        self.inflight = 0
        self._clock = clock
        self.last_arrival = clock()
        self._idle = asyncio.Event()
        self._idle.set()
        self.rate: float | None = None
        """Completions per second while busy (EWMA), None until first measured."""
        self._last_event = self.last_arrival
        self._busy_s = 0.0
        self._completed = 0

    def _account(self, now: float) -> None:
        if self.inflight:
            self._busy_s += now - self._last_event
        self._last_event = now

    def enter(self, time_left_s: float | None = None, priority: Priority | None = None) -> None:
        """Admit a call (`time_left_s`: until its deadline, None: it has none; `priority`:
        its level, None: one class), or raise the error that refuses it."""
        now = self.last_arrival = self._clock()
        if not self.open:
            raise errors.Unavailable("server is shutting down; retry on another replica")
        if self.loading:
            raise errors.Unavailable("server is still loading its models; retry shortly")
        if time_left_s is not None and time_left_s <= 0:
            # Its own deadline, not the load, ends such a call: refused as DEADLINE_EXCEEDED.
            raise errors.DeadlineExceeded("the call's deadline passed before it was admitted")
        if time_left_s is not None and self.inflight and self.rate:
            wait_s = self.inflight / self.rate
            share = 1.0 if priority is None else priority.share
            if wait_s > self.SLACK * time_left_s * share:
                level = "" if priority is None or share == 1.0 else (
                    f" (priority {priority.level} of {priority.levels} may wait {share:.0%} of that)")
                raise errors.Overloaded(
                    f"server overloaded: {self.inflight} calls in flight, about {wait_s * 1000:.0f} ms of work "
                    f"at {self.rate:.0f} calls/s, more than twice the {max(time_left_s, 0.0) * 1000:.0f} ms "
                    f"this call's deadline leaves{level}; retry later or elsewhere", retry_after_s=wait_s)
        self._account(now)
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self._account(self._clock())
        self.inflight -= 1
        self._completed += 1
        if self._busy_s >= self.RATE_WINDOW_S:
            rate = self._completed / self._busy_s
            self.rate = rate if self.rate is None else 0.7 * self.rate + 0.3 * rate
            self._busy_s, self._completed = 0.0, 0
        if self.inflight == 0:
            self._idle.set()

    def close(self) -> None:
        self.open = False

    async def drained(self, deadline: float, quiet_s: float = 1.0) -> bool:
        """Wait (until `deadline`, time.monotonic) for every accepted call to finish and no
        call to arrive for quiet_s; False when the deadline came first."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._idle.wait(), remaining)
            except asyncio.TimeoutError:
                return False
            quiet = time.monotonic() - self.last_arrival
            if quiet >= quiet_s:
                return True
            await asyncio.sleep(min(quiet_s - quiet, max(0.0, deadline - time.monotonic())))
