"""Is the event loop still turning? A heartbeat on the loop, watched from a thread.

Every request, health check included, is answered on the one asyncio loop. A loop that is
blocked (a synchronous call that never returns, a runaway computation) answers nothing;
Kubernetes' liveness probe then times out, which it counts as a failure. The watchdog thread
sees the same stall from outside: it logs where the loop is stuck (its thread's stack) once
per stall, exports the heartbeat's age on /metrics (served by its own thread, so it answers
during the stall), and keeps the liveness verdict NOT_SERVING for `timeout_s` after the loop
comes back, so a loop that keeps stalling fails consecutive probes rather than passing the
ones that land between stalls.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

log = logging.getLogger(__name__)


class LoopWatchdog:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.tick_s = min(1.0, timeout_s / 4)
        self._clock = clock
        self._beat = clock()
        self._stalled_since: float | None = None
        self._last_stall_end: float | None = None
        self.stalls = 0
        """Stalls longer than timeout_s seen so far."""
        self._loop_thread: int | None = None
        self._task: asyncio.Task | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the loop side --------------------------------------------------------------------
    def start(self) -> None:
        """Start the heartbeat (on the running loop) and the watching thread."""
        self._loop_thread = threading.get_ident()
        self._beat = self._clock()
        self._task = asyncio.get_running_loop().create_task(self._heartbeat(), name="liveness-heartbeat")
        self._thread = threading.Thread(target=self._watch, name="liveness-watchdog", daemon=True)
        self._thread.start()

    async def _heartbeat(self) -> None:
        while True:
            self.beat()
            await asyncio.sleep(self.tick_s)

    def beat(self) -> None:
        now = self._clock()
        if self._stalled_since is not None:
            log.warning("event loop answering again after %.1fs", now - self._stalled_since)
            self._last_stall_end, self._stalled_since = now, None
        self._beat = now

    async def stop(self) -> None:
        self._stop.set()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._thread:
            self._thread.join(timeout=5)

    # -- the watching side ----------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(self.tick_s):
            self.check()

    def check(self) -> None:
        """Record a stall when the heartbeat is older than timeout_s (called by the thread)."""
        now = self._clock()
        if self._stalled_since is None and now - self._beat > self.timeout_s:
            self._stalled_since = self._beat
            self.stalls += 1
            log.error("event loop has not answered for %.1fs (liveness NOT_SERVING); it is at:\n%s",
                      now - self._beat, self._loop_stack())

    def _loop_stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread) if self._loop_thread else None
        return "".join(traceback.format_stack(frame)) if frame is not None else "(unknown)"

    # -- the verdict -------------------------------------------------------------------------
    @property
    def heartbeat_age_s(self) -> float:
        return self._clock() - self._beat

    def alive(self) -> bool:
        """False while the loop is stalled, and for timeout_s after a stall ended."""
        if self._stalled_since is not None or self.heartbeat_age_s > self.timeout_s:
            return False
        return self._last_stall_end is None or self._clock() - self._last_stall_end > self.timeout_s
