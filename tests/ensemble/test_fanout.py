from __future__ import annotations

import asyncio
import gc
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.ensemble.fanout import FanOut, MemberOutcome, gather_with_deadline
from service.errors import DeadlineExceeded, Overloaded

# Real asyncio time, so every bound has a slack that a fully loaded machine cannot eat:
# what the tests tell apart are waits of 0.5 s and more from waits of 5 s.
SLACK_S = 0.5


def results(out: FanOut) -> dict:
    return {n: o.result for n, o in out.items() if o.answered}


def latencies(out: FanOut) -> dict[str, float]:
    return {n: o.latency_s for n, o in out.items()}


def left_out(out: FanOut) -> list[str]:
    return [n for n, o in out.items() if not o.answered]


def errors(out: FanOut) -> dict[str, BaseException]:
    return {n: o.error for n, o in out.items() if o.error is not None}


async def member(value, delay: float, error: BaseException | None = None):
    await asyncio.sleep(delay)
    if error is not None:
        raise error
    return value


async def test_straggler_is_left_out_and_named_and_the_answer_arrives_in_time():
    start = time.monotonic()
    deadline = start + 2.0
    out = await gather_with_deadline(
        {"fast": member(1, 0.1), "medium": member(2, 0.3), "slow": member(3, 30.0)},
        deadline, safety_margin_s=1.0, quorum=2)
    elapsed = time.monotonic() - start
    answered, latencies_s, late = results(out), latencies(out), left_out(out)
    assert elapsed < 2.0  # answered before the deadline itself
    assert elapsed >= 1.0 - 0.005  # waited until the cutoff for the straggler
    assert answered == {"fast": 1, "medium": 2}
    assert late == ["slow"]
    assert set(latencies_s) == {"fast", "medium", "slow"}
    assert 0.1 <= latencies_s["fast"] < latencies_s["medium"] < 0.3 + SLACK_S
    assert latencies_s["medium"] >= 0.3
    assert latencies_s["slow"] >= 1.0 - 0.005  # a lower bound: waited that long
    # The outcomes themselves, by name in call order.
    assert isinstance(out, FanOut) and list(out) == ["fast", "medium", "slow"]
    assert out["slow"] == MemberOutcome("slow", in_time=False, latency_s=latencies_s["slow"])
    assert out["fast"].result == 1 and out["fast"].answered


async def test_all_in_time_returns_as_soon_as_all_answer():
    start = time.monotonic()
    out = await gather_with_deadline({"a": member(1, 0.01), "b": member(2, 0.02)},
                        deadline=start + 10.0, safety_margin_s=0.0, quorum=2)
    assert time.monotonic() - start < 0.02 + SLACK_S
    assert results(out) == {"a": 1, "b": 2}
    assert left_out(out) == []
    assert all(o.in_time and o.answered for o in out.values())


async def test_below_quorum_raises_deadline_exceeded_naming_members():
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded) as info:
        await gather_with_deadline(
            {"fast": member(1, 0.0), "slow1": member(2, 30.0), "slow2": member(3, 30.0)},
            start + 0.05, safety_margin_s=0.0, quorum=2)
    assert time.monotonic() - start < 0.05 + SLACK_S
    message = str(info.value)
    assert "1 of 3 members answered (quorum 2)" in message
    assert "answered: fast" in message
    assert "slow1 (no answer" in message and "slow2 (no answer" in message


async def test_raising_member_is_left_out_and_its_error_kept():
    out = await gather_with_deadline({"ok": member(1, 0.0), "bad": member(2, 0.0, RuntimeError("boom"))},
                        deadline=time.monotonic() + 1.0, safety_margin_s=0.0, quorum=1)
    assert results(out) == {"ok": 1}
    assert left_out(out) == ["bad"]
    assert isinstance(errors(out)["bad"], RuntimeError)
    bad = out["bad"]
    assert bad.in_time and not bad.answered


async def test_errors_without_lateness_raise_the_member_error():
    """Quorum missed only through errors: the client sees the real cause, and at once."""
    start = time.monotonic()
    with pytest.raises(Overloaded):
        await gather_with_deadline({"a": member(1, 0.0, Overloaded("queue full")),
                       "b": member(2, 30.0)},
                      deadline=start + 30.0, safety_margin_s=0.0, quorum=2)
    assert time.monotonic() - start < SLACK_S  # quorum out of reach: no waiting for b


async def test_deadline_with_errors_and_stragglers_is_deadline_exceeded():
    with pytest.raises(DeadlineExceeded, match=r"bad \(RuntimeError: boom\)"):
        await gather_with_deadline({"ok": member(1, 0.0), "bad": member(2, 0.0, RuntimeError("boom")),
                       "slow": member(3, 5.0)},
                      deadline=time.monotonic() + 0.05, safety_margin_s=0.0, quorum=2)


async def test_no_deadline_waits_for_all():
    start = time.monotonic()
    out = await gather_with_deadline(
        {"a": member(1, 0.05), "b": member(2, 0.15)}, None, safety_margin_s=0.02, quorum=1)
    assert time.monotonic() - start >= 0.15 - 0.005  # a lower bound: load only adds to it
    assert results(out) == {"a": 1, "b": 2} and left_out(out) == []
    assert latencies(out)["b"] >= latencies(out)["a"]


async def test_members_run_concurrently():
    start = time.monotonic()
    out = await gather_with_deadline({f"m{i}": member(i, 0.5) for i in range(10)}, None, 0.0, 10)
    assert time.monotonic() - start < 0.5 + SLACK_S * 2  # in turn they would take 5 s
    assert len(results(out)) == 10


async def test_deadline_already_past_is_exceeded_at_once():
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="0 of 1"):
        await gather_with_deadline({"a": member(1, 0.01)}, start + 0.001, safety_margin_s=0.01, quorum=1)
    assert time.monotonic() - start < SLACK_S


async def test_late_member_is_cancelled_by_default():
    cancelled = asyncio.Event()

    async def slow():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    await gather_with_deadline({"a": member(1, 0.0), "slow": slow()}, time.monotonic() + 0.5, 0.0, 1)
    await asyncio.wait_for(cancelled.wait(), 10.0)


async def test_late_executor_member_finishes_silently_in_the_background(caplog):
    """Executor work cannot be interrupted: the fan-out stops waiting, and the late member's
    later exception is retrieved, so nothing is logged as never retrieved."""
    loop = asyncio.get_running_loop()
    finished = asyncio.Event()

    def blocking():
        time.sleep(1.0)
        loop.call_soon_threadsafe(finished.set)
        raise RuntimeError("late failure")

    async def late_failure():
        await asyncio.sleep(0.8)
        raise RuntimeError("late failure")

    with ThreadPoolExecutor(1) as executor:
        for cancel_late in (True, False):
            finished.clear()
            out = await gather_with_deadline(
                {"a": member(1, 0.0), "thread": loop.run_in_executor(executor, blocking),
                 "coro": late_failure()},
                time.monotonic() + 0.5, 0.0, 1, cancel_late=cancel_late)
            assert left_out(out) == ["thread", "coro"]
            await asyncio.wait_for(finished.wait(), 10.0)
            await asyncio.sleep(1.0)  # the coroutine's late failure, when it was not cancelled
    gc.collect()
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


async def test_cancelling_the_fan_out_cancels_the_members():
    cancelled = asyncio.Event()

    async def slow():
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.create_task(gather_with_deadline({"slow": slow()}, None, 0.0, 1))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(cancelled.wait(), 10.0)


async def test_quorum_must_be_reachable():
    with pytest.raises(ValueError, match="quorum"):
        await gather_with_deadline({"a": asyncio.sleep(0)}, None, 0.0, 2)
