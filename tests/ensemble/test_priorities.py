"""Priority levels at a pipeline's queue: batches formed from the highest level first, the
queue's places refused to the lowest level first, a higher level's admission not counting
the lower levels' rows. Real EnsemblePipeline, a gated stand-in member, looptime's loop: the
orderings are forced by the gate, not by timing."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars

import numpy as np
import pytest

from service.batching.batcher import DynamicBatcher
from service.batching.config import BatchingConfig
from service.batching.priority import PRIORITY, Priority
from service.ensemble.outcomes import FanOut, Plan
from service.ensemble.pipeline import EnsemblePipeline
from service.errors import Overloaded
from service.monitoring.stages import COLLECTOR

pytestmark = pytest.mark.looptime


class Member:
    """Answers rows * 1 once the gate opens, after `delay` s; records the rows of each call."""

    def __init__(self, delay: float = 0.0) -> None:
        self.gate = asyncio.Event()
        self.delay = delay
        self.calls: list[list[float]] = []

    @contextlib.contextmanager
    def lease(self):
        yield self

    async def infer(self, rows, deadline=None, arrivals=None, keep=None):
        self.calls.append(rows[:, 0].tolist())
        await self.gate.wait()
        await asyncio.sleep(self.delay)
        return rows


def answer(plan: Plan, outcomes: FanOut, rows: np.ndarray, spans) -> list:
    return [rows[a:b, 0].tolist() for a, b in spans]


def rows(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, 2), value, dtype=np.float32)


def at(level: int, coro, levels: int = 2, reserve: float = 0.5) -> asyncio.Task:
    """The coroutine in a task of its own, as a request of priority `level` (as a front sets it)."""
    context = contextvars.copy_context()
    context.run(PRIORITY.set, Priority(level, levels, reserve))
    return asyncio.create_task(coro, context=context)


async def until(condition, limit_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while not condition():
        assert loop.time() < end, "state not reached"
        await asyncio.sleep(0.001)


async def busy(max_rows: int = 64, max_queue: int = 100, delay: float = 0.0):
    """A pipeline whose one member is busy with a first request (held at the gate)."""
    member = Member(delay)
    pipeline = EnsemblePipeline("e", answer, max_rows, max_queue, kind="model", clock=asyncio.get_running_loop().time)
    plan = Plan({"m": member}, {}, 1, 0.0, None, "p")
    first = at(2, pipeline.submit(plan, rows(0.0), None))
    await until(lambda: len(member.calls) == 1)
    return member, pipeline, plan, first


async def test_a_batch_is_formed_from_the_highest_priority_first():
    member, pipeline, plan, first = await busy(max_rows=3)
    low = [at(2, pipeline.submit(plan, rows(10.0 + i), None)) for i in range(3)]
    await until(lambda: pipeline.queue_depth == 3)
    high = [at(1, pipeline.submit(plan, rows(1.0 + i), None)) for i in range(2)]
    await until(lambda: pipeline.queue_depth == 5)
    member.gate.set()
    await asyncio.gather(first, *low, *high)
    # both high ones first, then the oldest low one fills the batch; the rest after
    assert member.calls == [[0.0], [1.0, 2.0, 10.0], [11.0, 12.0]]
    assert [t.result() for t in high] == [[1.0], [2.0]]


async def test_the_lowest_priority_is_refused_first_and_the_reserve_kept_for_the_highest():
    member, pipeline, plan, first = await busy(max_queue=4)
    low = [at(2, pipeline.submit(plan, rows(10.0 + i), None)) for i in range(2)]
    await until(lambda: pipeline.queue_depth == 2)
    with pytest.raises(Overloaded, match="2 of 4 places open to priority 2 of 2"):
        await at(2, pipeline.submit(plan, rows(12.0), None))  # half the queue kept for level 1
    high = [at(1, pipeline.submit(plan, rows(1.0 + i), None)) for i in range(2)]
    await until(lambda: pipeline.queue_depth == 4)
    with pytest.raises(Overloaded, match=r"queue full \(4 requests waiting\)"):
        await at(1, pipeline.submit(plan, rows(3.0), None))
    member.gate.set()
    await asyncio.gather(first, *low, *high)  # every admitted request answered
    assert [t.result() for t in low + high] == [[10.0], [11.0], [1.0], [2.0]]


async def test_a_higher_priority_does_not_count_the_lower_ones_queued_ahead_but_its_deadline_rules():
    member, pipeline, plan, first = await busy(max_rows=1, delay=1.0)
    member.gate.set()
    await first  # one batch measured: 1 s a batch
    blocker = at(2, pipeline.submit(plan, rows(0.0), None))
    await until(lambda: len(member.calls) == 2)
    low = [at(2, pipeline.submit(plan, rows(10.0 + i), None)) for i in range(3)]
    await until(lambda: pipeline.queue_depth == 3)
    loop = asyncio.get_running_loop()
    # 2.5 s left: behind the running batch and three low batches it could not start in time...
    with pytest.raises(Overloaded):
        await at(2, pipeline.submit(plan, rows(13.0), loop.time() + 2.5))
    # ...but a high one overtakes them and is admitted, and answered first
    high = at(1, pipeline.submit(plan, rows(1.0), loop.time() + 2.5))
    # the deadline still rules: a high one that could not finish in time is refused all the same
    with pytest.raises(Overloaded, match="more than the 500.0 ms its deadline leaves"):
        await at(1, pipeline.submit(plan, rows(2.0), loop.time() + 0.5))
    assert await high == [1.0]
    await asyncio.gather(blocker, *low)
    assert member.calls[2:] == [[1.0], [10.0], [11.0], [12.0]]


class SharedMember:
    """A member whose queue is a real DynamicBatcher (one row a batch), shared by ensembles."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.batches: list[float] = []
        self.batcher = DynamicBatcher("m:1", self._run, BatchingConfig(max_batch_size=1),
                                      clock=asyncio.get_running_loop().time)

    async def _run(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(float(batch[0, 0]))
        await self.gate.wait()
        return batch

    @contextlib.contextmanager
    def lease(self):
        yield self

    async def infer(self, rows, deadline=None, arrivals=None, keep=None):
        return await self.batcher.submit(rows, deadline, arrivals, keep)


async def test_a_member_shared_by_ensembles_serves_their_batches_by_priority_not_arrival():
    """Ensembles a and b share one busy member: b's low request reaches the member's queue
    first, its batch through b's dispatcher (a traced request goes that way), which runs in a
    context of its own and carries its request's level to the member; then a's high request
    (a was idle: its request is its batch, in the caller's task). The member's next batch is
    a's row, then b's."""
    member = SharedMember()
    loop_time = asyncio.get_running_loop().time
    a, b = (EnsemblePipeline(name, answer, 8, 100, clock=loop_time) for name in ("a", "b"))
    plan = Plan({"m": member}, {}, 1, 0.0, None, "p")
    filler = asyncio.create_task(member.batcher.submit(rows(0.0)))  # holds the member
    await until(lambda: member.batches == [0.0])
    context = contextvars.copy_context()
    context.run(PRIORITY.set, Priority(2, 2, 0.5))
    context.run(COLLECTOR.set, [])  # traced: queued at b, dispatched in a batch context of its own
    low = asyncio.create_task(b.submit(plan, rows(20.0), None), context=context)
    await until(lambda: member.batcher.queue_depth == 1)
    high = at(1, a.submit(plan, rows(10.0), None))
    await until(lambda: member.batcher.queue_depth == 2)
    member.gate.set()
    await asyncio.gather(filler, low, high)
    assert member.batches == [0.0, 10.0, 20.0]
    await member.batcher.stop()
