"""The liveness watchdog against a deliberately blocked event loop (the test owns the loop
and blocks it with a synchronous wait it releases itself), and its verdict, both on a fake
clock: the stall lasts exactly as long as the test moves the clock, whatever the machine's
load, and takes no wall time beyond the watching thread's tick."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from service.liveness import LoopWatchdog


def _until(condition, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_a_blocked_loop_is_seen_from_outside_with_where_it_is_stuck(caplog):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    clock = FakeClock()
    watchdog = LoopWatchdog(timeout_s=0.4, clock=clock)  # its thread looks every 0.1 s
    stuck, release = threading.Event(), threading.Event()

    def stuck_in_a_synchronous_call() -> None:  # what a wedged handler looks like
        stuck.set()
        release.wait()

    try:
        asyncio.run_coroutine_threadsafe(_start(watchdog), loop).result(timeout=30)
        with caplog.at_level(logging.ERROR, logger="service.liveness"):
            loop.call_soon_threadsafe(stuck_in_a_synchronous_call)
            assert stuck.wait(30)  # the loop is blocked: no beat comes until it is released
            assert watchdog.alive() and watchdog.stalls == 0
            clock.now += 1.0  # the stall: a second without a beat, past timeout_s
            assert _until(lambda: watchdog.stalls == 1), "the watchdog never saw the stall"
            assert not release.is_set()  # seen while the loop is still blocked
            assert not watchdog.alive()
            assert watchdog.heartbeat_age_s == 1.0

            def logged_where() -> bool:  # the watchdog counts the stall, then logs it
                messages = [r.getMessage() for r in caplog.records if "has not answered" in r.getMessage()]
                return any("stuck_in_a_synchronous_call" in m for m in messages)  # the loop thread's stack

            assert _until(logged_where), "the stall was logged without the loop thread's stack"
        release.set()
        assert _until(lambda: watchdog.heartbeat_age_s == 0.0), "the loop never ticked again"
        assert watchdog.stalls == 1 and not watchdog.alive()  # still failing, for timeout_s after it
    finally:
        release.set()
        asyncio.run_coroutine_threadsafe(watchdog.stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def _start(watchdog: LoopWatchdog) -> None:
    watchdog.start()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_verdict_fails_during_a_stall_and_for_timeout_after_it():
    clock = FakeClock()
    watchdog = LoopWatchdog(timeout_s=10, clock=clock)  # not started: the test drives it
    watchdog.beat()
    clock.now += 9
    watchdog.check()
    assert watchdog.alive() and watchdog.stalls == 0  # a slow tick is not a stall
    clock.now += 2  # 11 s without a beat
    watchdog.check()
    assert watchdog.stalls == 1 and not watchdog.alive()
    clock.now += 100
    watchdog.check()
    assert watchdog.stalls == 1  # one stall, logged and counted once
    watchdog.beat()  # the loop answers again
    assert not watchdog.alive()  # a loop that keeps stalling must fail consecutive probes
    clock.now += 5
    watchdog.beat()
    assert not watchdog.alive()
    clock.now += 6  # more than timeout_s after the stall ended
    watchdog.beat()
    assert watchdog.alive()
