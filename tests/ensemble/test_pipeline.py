"""The ensemble's per-batch pipeline with stand-in members (the pipeline is what is under
test: its batching, straggler cutoffs per request, quorum and admission).

Every test runs on looptime's fast-forwarded event loop and the pipeline reads its clock
(`clock=loop.time`): a member's `asyncio.sleep(0.3)` takes no wall time and exactly 0.3 s
of loop time, so cutoffs, expiry and admission are checked to the microsecond."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.ensemble.outcomes import FanOut, MemberOutcome, Plan
from service.ensemble.pipeline import EnsemblePipeline
from service.errors import DeadlineExceeded, Overloaded
from service.monitoring.stages import COLLECTOR

pytestmark = pytest.mark.looptime


def now() -> float:
    """The pipelines' clock here: the running (fast-forwarded) loop's."""
    return asyncio.get_running_loop().time()


def since(start: float) -> float:
    """Loop seconds since `start`, rounded to looptime's resolution (1 us): exact."""
    return round(now() - start, 6)


def seconds(outcome: MemberOutcome) -> float:
    return round(outcome.latency_s, 6)


class Member:
    """Answers each call with its rows times `value` after `delay` seconds (or raises)."""

    def __init__(self, value: float, delay: float, error: BaseException | None = None, blocking=None) -> None:
        self.value, self.delay, self.error, self.blocking = value, delay, error, blocking
        self.calls: list[int] = []
        self.cancelled = asyncio.Event()
        self.leased = 0

    @contextlib.contextmanager
    def lease(self):
        self.leased += 1
        try:
            yield self
        finally:
            self.leased -= 1

    async def infer(self, rows: np.ndarray, deadline: float | None = None, arrivals=None, keep=None) -> np.ndarray:
        self.calls.append(rows.shape[0])
        if self.blocking is not None:
            return await asyncio.get_running_loop().run_in_executor(*self.blocking)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if self.error is not None:
            raise self.error
        return rows * self.value


def answer(plan: Plan, outcomes: FanOut, rows: np.ndarray, spans) -> list:
    return [(dict(outcomes), {n: o.result[a:b] for n, o in outcomes.items() if o.answered}) for a, b in spans]


def plan(members: dict[str, Member], quorum: int, margin_s: float = 0.0, key: str = "p") -> Plan:
    return Plan(members, {}, quorum, margin_s, None, key)


def pipeline(max_rows: int = 64, max_queue: int = 100, kind: str = "ensemble", name: str = "e") -> EnsemblePipeline:
    return EnsemblePipeline(name, answer, max_rows, max_queue, kind=kind, clock=asyncio.get_running_loop().time)


def rows(n: int = 1, value: float = 1.0) -> np.ndarray:
    return np.full((n, 2), value, dtype=np.float32)


async def test_straggler_is_left_out_and_named_and_the_answer_arrives_in_time():
    members = {"fast": Member(1, 0.1), "medium": Member(2, 0.3), "slow": Member(3, 30.0)}
    start = now()
    outcomes, results = await pipeline().submit(plan(members, 2, margin_s=1.0), rows(), start + 2.0)
    assert since(start) == 1.0  # waited for the straggler until the cutoff (deadline less margin)
    assert set(results) == {"fast", "medium"} and results["medium"].tolist() == [[2.0, 2.0]]
    assert isinstance(outcomes["slow"], MemberOutcome) and not outcomes["slow"].in_time
    assert list(outcomes) == ["fast", "medium", "slow"]
    assert (seconds(outcomes["fast"]), seconds(outcomes["medium"])) == (0.1, 0.3)
    assert seconds(outcomes["slow"]) == 1.0  # a lower bound: waited that long
    await asyncio.wait_for(members["slow"].cancelled.wait(), 10.0)  # late member cancelled
    assert since(start) == 1.0  # at the cutoff, not when its 30 s would have run out
    assert all(m.leased == 0 for m in members.values())


async def test_all_in_time_returns_as_soon_as_all_answer():
    start = now()
    outcomes, results = await pipeline().submit(plan({"a": Member(1, 0.01), "b": Member(2, 0.02)}, 2),
                                                rows(), start + 10.0)
    assert since(start) == 0.02  # when the slower one answered
    assert set(results) == {"a", "b"} and all(o.answered for o in outcomes.values())


async def test_below_quorum_raises_deadline_exceeded_naming_members():
    members = {"fast": Member(1, 0.0), "slow1": Member(2, 30.0), "slow2": Member(3, 30.0)}
    start = now()
    with pytest.raises(DeadlineExceeded) as info:
        await pipeline().submit(plan(members, 2), rows(), start + 0.05)
    assert since(start) == 0.05  # at the deadline, not after the stragglers' 30 s
    message = str(info.value)
    assert "1 of 3 members answered (quorum 2)" in message and "answered: fast" in message
    assert "slow1 (no answer" in message and "slow2 (no answer" in message


async def test_raising_member_is_left_out_and_its_error_kept():
    start = now()
    outcomes, results = await pipeline().submit(
        plan({"ok": Member(1, 0.0), "bad": Member(2, 0.0, RuntimeError("boom"))}, 1), rows(), start + 1.0)
    assert since(start) == 0.0 and set(results) == {"ok"}
    assert isinstance(outcomes["bad"].error, RuntimeError) and outcomes["bad"].in_time


async def test_errors_without_lateness_raise_the_member_error_at_once():
    members = {"a": Member(1, 0.0, Overloaded("queue full")), "b": Member(2, 30.0)}
    start = now()
    with pytest.raises(Overloaded):
        await pipeline().submit(plan(members, 2), rows(), start + 30.0)
    assert since(start) == 0.0  # quorum out of reach: no waiting for b
    await asyncio.wait_for(members["b"].cancelled.wait(), 10.0)  # its call is withdrawn


async def test_deadline_with_errors_and_stragglers_is_deadline_exceeded():
    members = {"ok": Member(1, 0.0), "bad": Member(2, 0.0, RuntimeError("boom")), "slow": Member(3, 5.0)}
    start = now()
    with pytest.raises(DeadlineExceeded, match=r"bad \(RuntimeError: boom\)"):
        await pipeline().submit(plan(members, 2), rows(), start + 0.05)
    assert since(start) == 0.05


async def test_no_deadline_waits_for_all_and_members_run_concurrently():
    members = {f"m{i}": Member(i, 0.5) for i in range(10)}
    start = now()
    _, results = await pipeline().submit(plan(members, 1, margin_s=0.02), rows(), None)
    assert since(start) == 0.5  # in turn they would take 5 s
    assert len(results) == 10


async def test_deadline_already_past_is_exceeded_at_once():
    member = Member(1, 0.01)
    start = now()
    # its cutoff (deadline less margin) passed before it arrived: the member is never asked
    with pytest.raises(DeadlineExceeded, match="0 of 1 members answered"):
        await pipeline().submit(plan({"a": member}, 1, margin_s=0.01), rows(), start + 0.001)
    assert since(start) == 0.0 and member.calls == []


async def test_late_executor_member_finishes_silently_in_the_background(caplog):
    """Executor work cannot be interrupted: the batch stops waiting, and the late member's
    later exception is retrieved, so nothing is logged as never retrieved."""
    loop = asyncio.get_running_loop()
    finished = asyncio.Event()
    release = threading.Event()

    def blocking():  # still computing at the cutoff: it finishes when the test lets it
        release.wait(30.0)
        loop.call_soon_threadsafe(finished.set)
        raise RuntimeError("late failure")

    with ThreadPoolExecutor(1) as executor:
        members = {"a": Member(1, 0.0), "thread": Member(0, 0, blocking=(executor, blocking)),
                   "coro": Member(0, 0.08, RuntimeError("late failure"))}
        # (the loop time runs in step with the wall clock while the thread computes: a short cutoff)
        start = now()
        outcomes, _ = await pipeline().submit(plan(members, 1), rows(), start + 0.05)
        assert since(start) == 0.05
        assert [n for n, o in outcomes.items() if not o.answered] == ["thread", "coro"]
        release.set()
    # Leaving the block joined the thread: it has failed, and its call_soon_threadsafe is in
    # the loop's queue (waited for on the wall clock, the fast-forwarded timeout could win).
    await asyncio.wait_for(finished.wait(), 10.0)
    gc.collect()
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


async def test_concurrent_requests_share_one_call_per_member_and_get_their_own_rows():
    members = {"a": Member(1, 0.2), "b": Member(10, 0.0)}
    p = pipeline()
    start = now()
    first = asyncio.ensure_future(p.submit(plan(members, 2), rows(1, 1.0), None))  # runs alone
    await asyncio.sleep(0.05)
    later = [asyncio.ensure_future(p.submit(plan(members, 2), rows(k, float(k)), None)) for k in (1, 2, 3)]
    answers = await asyncio.gather(first, *later)
    assert members["a"].calls == [1, 6] and members["b"].calls == [1, 6]  # the three merged
    assert since(start) == 0.4  # two batches of 0.2 s, one after the other
    for k, (_, results) in zip((1, 1, 2, 3), answers):
        assert results["b"].tolist() == [[10.0 * k] * 2] * k


async def test_requests_with_different_plans_or_row_shapes_are_not_merged():
    members = {"a": Member(1, 0.2)}
    p = pipeline()
    first = asyncio.ensure_future(p.submit(plan(members, 1), rows(), None))
    await asyncio.sleep(0.05)
    others = [p.submit(plan(members, 1, key="other"), rows(), None), p.submit(plan(members, 1), rows(2), None),
              p.submit(plan(members, 1), np.ones((1, 3), np.float32), None)]
    await asyncio.gather(first, *others)
    assert members["a"].calls == [1, 1, 2, 1]


async def test_each_request_of_a_batch_keeps_its_own_cutoff():
    """Two requests merged into one batch: the one with the earlier deadline is answered at
    its cutoff by the members in by then; the other waits for the slower member."""
    members = {"fast": Member(1, 0.0), "slow": Member(2, 2.0)}
    p = pipeline()
    blocker = asyncio.ensure_future(p.submit(plan(members, 1), rows(), None))  # batch 1
    await asyncio.sleep(0)
    start = now()
    early = asyncio.ensure_future(p.submit(plan(members, 1), rows(), start + 1.0))
    late = asyncio.ensure_future(p.submit(plan(members, 1), rows(), start + 30.0))
    early_outcomes, early_results = await early
    assert since(start) == 1.0  # at its cutoff, before the slow member could answer
    assert set(early_results) == {"fast"} and not early_outcomes["slow"].in_time
    _, late_results = await late
    assert since(start) == 2.0  # the other one waited for the slow member
    assert set(late_results) == {"fast", "slow"}
    await blocker
    assert members["slow"].calls == [1, 2]  # early and late went out as one batch


async def test_expired_or_cancelled_while_queued_never_reaches_a_member():
    members = {"a": Member(1, 1.0)}
    p = pipeline()
    start = now()
    busy = asyncio.ensure_future(p.submit(plan(members, 1), rows(), None))
    await asyncio.sleep(0.05)
    with pytest.raises(DeadlineExceeded, match=r"deadline passed after 0\.1000 s in the queue"):
        await p.submit(plan(members, 1), rows(5), now() + 0.1)
    assert since(start) == 0.15  # at its deadline, not when the member came free (1.0)
    cancelled = asyncio.ensure_future(p.submit(plan(members, 1), rows(7), None))
    await asyncio.sleep(0.05)
    cancelled.cancel()
    await busy
    await asyncio.sleep(0.1)
    assert members["a"].calls == [1] and p.queue_depth == 0


# A loop fires a timer once its clock is within its resolution of it (uvloop rounds to the
# millisecond, looptime ticks in microseconds): a deadline between two ticks is due when its
# timer fires. Both waits below were re-armed until the clock passed the deadline: a busy
# loop of up to 0.5 ms per cutoff on uvloop, and an endless one on this clock (hence the
# timeouts: what these guard against is a spin, not a slow answer).
BETWEEN_TICKS_S = 0.3 + 4e-10  # past the 0.3 s tick, within asyncio's 1 ns clock resolution of it


@pytest.mark.timeout(30)
async def test_a_cutoff_between_two_ticks_of_the_clock_is_met_when_its_timer_fires():
    members = {"fast": Member(1, 0.0), "slow": Member(2, 30.0)}
    start = now()
    outcomes, results = await pipeline().submit(plan(members, 1), rows(), start + BETWEEN_TICKS_S)
    assert since(start) == 0.3 and set(results) == {"fast"} and not outcomes["slow"].in_time


@pytest.mark.timeout(30)
async def test_an_expiry_between_two_ticks_of_the_clock_is_met_when_its_timer_fires():
    member = Member(1, 1.0)
    p = pipeline()
    busy = asyncio.ensure_future(p.submit(plan({"a": member}, 1), rows(), None))
    await asyncio.sleep(0)
    start = now()
    with pytest.raises(DeadlineExceeded, match="in the queue"):
        await p.submit(plan({"a": member}, 1), rows(2), start + BETWEEN_TICKS_S)
    assert since(start) == 0.3  # at its deadline, not when the member came free
    await busy
    assert member.calls == [1]


async def test_every_caller_gone_cancels_the_member_calls():
    member = Member(1, 30.0)
    start = now()
    task = asyncio.ensure_future(pipeline().submit(plan({"slow": member}, 1), rows(), None))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(member.cancelled.wait(), 10.0)
    assert since(start) == 0.05  # withdrawn when its caller went, not after its 30 s


class Immediate(Member):
    """Answers without suspending (a model computed on the event loop), or raises."""

    async def infer(self, rows: np.ndarray, deadline: float | None = None, arrivals=None, keep=None) -> np.ndarray:
        self.calls.append(rows.shape[0])
        if self.error is not None:
            raise self.error
        return rows * self.value


async def test_a_lone_request_to_one_member_is_answered_without_a_turn_of_the_loop():
    """An idle pipeline runs a lone request to one member in its caller's step: a member that
    answers at once answers the request at once (no task, no wait in between)."""
    member = Immediate(3, 0.0)
    step = pipeline().submit(plan({"a": member}, 1), rows(2, 1.0), now() + 30.0)
    with pytest.raises(StopIteration) as done:
        step.send(None)
    outcomes, results = done.value.value
    assert results["a"].tolist() == [[3.0, 3.0]] * 2 and outcomes["a"].in_time and member.calls == [2]


@pytest.mark.parametrize("kind, message", [("ensemble", "0 of 1 members answered"),
                                           ("model", "deadline reached after .* before the model answered")])
async def test_a_lone_request_to_one_member_is_answered_at_its_cutoff(kind, message):
    member = Member(1, 30.0)
    p = pipeline(kind=kind)
    start = now()
    with pytest.raises(DeadlineExceeded, match=message):
        await p.submit(plan({"slow": member}, 1, margin_s=0.5), rows(), start + 1.5)
    # at the cutoff (deadline less margin), never before it, and not after the member's 30 s
    assert since(start) == 1.0
    await asyncio.wait_for(member.cancelled.wait(), 10.0)  # its call is withdrawn
    assert since(start) == 1.0
    _, results = await p.submit(plan({"slow": Member(2, 0.0)}, 1), rows(), None)  # idle again
    assert results["slow"].tolist() == [[2.0, 2.0]]


@pytest.mark.parametrize("error", [RuntimeError("member broke"), TimeoutError("the member's own timeout")],
                         ids=["error", "members-own-timeout"])
async def test_a_lone_request_to_one_member_gets_the_members_error(error):
    """The member's error is the answer, unchanged: a TimeoutError the member raises itself
    is its error, not the request's cutoff."""
    with pytest.raises(type(error)) as raised:
        await pipeline().submit(plan({"a": Immediate(1, 0.0, error)}, 1), rows(), now() + 30.0)
    assert raised.value is error


async def test_a_burst_at_an_idle_pipeline_is_merged_behind_its_first_request():
    """Twenty callers scheduled together, a member that answers at once: the first request
    finds the pipeline idle and runs alone, the other nineteen queue meanwhile and share one
    call, each getting its own rows."""
    member = Immediate(1, 0.0)
    p = pipeline()
    answers = await asyncio.gather(*(p.submit(plan({"a": member}, 1), rows(1, float(k)), None) for k in range(20)))
    assert member.calls == [1, 19]
    assert [results["a"][0, 0] for _, results in answers] == [float(k) for k in range(20)]


async def test_full_queue_and_hopeless_deadlines_are_refused_at_once():
    members = {"a": Member(1, 0.3)}
    p = pipeline(max_rows=1, max_queue=1)
    await p.submit(plan(members, 1), rows(), None)  # measures a batch: 0.3 s
    running = []
    for _ in range(2):  # one runs, one waits: the queue is full
        running.append(asyncio.ensure_future(p.submit(plan(members, 1), rows(), None)))
        await asyncio.sleep(0.05)
    with pytest.raises(Overloaded, match="queue full"):
        await p.submit(plan(members, 1), rows(), None)
    await asyncio.gather(*running)
    p.max_queue = 10
    blocker = asyncio.ensure_future(p.submit(plan(members, 1), rows(), None))
    await asyncio.sleep(0.05)
    queued = asyncio.ensure_future(p.submit(plan(members, 1), rows(), None))
    await asyncio.sleep(0.05)
    start = now()
    # the running batch and one queued ahead, at 0.3 s a batch, for a 0.2 s deadline
    with pytest.raises(Overloaded, match=r"1 rows queued ahead, about 600\.0 ms of work \(2 batches of 300\.00 ms\), "
                                         r"more than the 200\.0 ms its deadline leaves"):
        await p.submit(plan(members, 1), rows(), start + 0.2)
    assert since(start) == 0.0  # refused at once
    await asyncio.gather(blocker, queued)
    assert members["a"].calls == [1] * 5  # the refused request never reached the member
    # with time to spare it is admitted and answered
    _, results = await p.submit(plan(members, 1), rows(), now() + 30.0)
    assert set(results) == {"a"}


async def test_an_idle_single_model_admits_whatever_its_last_batch_took():
    member = Member(1, 0.3)
    p = pipeline(kind="model", name="m")
    await p.submit(plan({"m": member}, 1), rows(), None)  # measured: about 0.3 s per batch
    member.delay = 0.0  # the slow moment is over, but only a batch can tell
    _, results = await p.submit(plan({"m": member}, 1), rows(), now() + 0.2)
    assert set(results) == {"m"} and member.calls == [1, 1]


async def test_a_traced_request_gets_the_batch_stages():
    members = {"a": Member(1, 0.0)}
    stages: list = []
    token = COLLECTOR.set(stages)
    try:
        await pipeline().submit(plan(members, 1), rows(), None)
    finally:
        COLLECTOR.reset(token)
    assert [s.name for s in stages] == ["ensemble queue"]
    assert stages[0].attributes == {"quorum.batch_rows": 1}
