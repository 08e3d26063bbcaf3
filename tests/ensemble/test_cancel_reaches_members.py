"""Cancellation reaches queued work: an ensemble's request that goes away (cancelled, or
answered at its cutoff) while its batch waits in a busy member's queue is not computed by
that member. Real EnsemblePipeline and real DynamicBatchers as its members, with a gated
model standing in for compute, on looptime's loop (`clock=loop.time`): the orderings are
forced by the gate, not by timing."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest

from service.batching.batcher import DynamicBatcher
from service.batching.config import BatchingConfig
from service.ensemble.outcomes import FanOut, Plan
from service.ensemble.pipeline import EnsemblePipeline
from service.errors import DeadlineExceeded

pytestmark = pytest.mark.looptime


class GatedModel:
    """run_batch: rows * value once the gate opens; records each batch's row count."""

    def __init__(self, value: float, gate: asyncio.Event) -> None:
        self.value, self.gate = value, gate
        self.batches: list[int] = []
        self.running = 0

    async def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.batches.append(rows.shape[0])
        self.running += 1
        try:
            await self.gate.wait()
            return rows * self.value
        finally:
            self.running -= 1


class Member:
    """A served member as the pipeline sees it: a lease and infer, through a real batcher."""

    def __init__(self, name: str, value: float, gate: asyncio.Event) -> None:
        self.model = GatedModel(value, gate)
        self.batcher = DynamicBatcher(name, self.model, BatchingConfig(max_batch_size=64),
                                      clock=asyncio.get_running_loop().time)

    @contextlib.contextmanager
    def lease(self):
        yield self

    async def infer(self, rows, deadline=None, arrivals=None, keep=None):
        return await self.batcher.submit(rows, deadline, arrivals, keep)


def answer(plan: Plan, outcomes: FanOut, rows: np.ndarray, spans) -> list:
    return [{n: o.result[a:b] for n, o in outcomes.items() if o.answered} for a, b in spans]


async def until(condition, limit_s: float = 10.0) -> None:
    """Wait (loop time) for a state; fails the test past the limit instead of hanging."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while not condition():
        assert loop.time() < end, "state not reached"
        await asyncio.sleep(0.001)


def rows(n: int, value: float) -> np.ndarray:
    return np.full((n, 2), value, dtype=np.float32)


async def setup():
    gate = asyncio.Event()
    members = {"a": Member("a:1", 1.0, gate), "b": Member("b:1", 2.0, gate)}
    pipeline = EnsemblePipeline("e", answer, 64, 100, clock=asyncio.get_running_loop().time)
    # Both members busy with a batch of their own, held until the gate opens.
    blockers = [asyncio.create_task(m.batcher.submit(rows(1, 0.0))) for m in members.values()]
    await until(lambda: all(m.model.running for m in members.values()))
    return gate, members, pipeline, blockers, Plan(members, {}, 2, 0.0, None, "p")


async def test_a_request_cancelled_while_queued_at_busy_members_is_not_computed():
    gate, members, pipeline, blockers, plan = await setup()
    first = asyncio.create_task(pipeline.submit(plan, rows(2, 1.0), None))  # idle pipeline: its own batch
    await until(lambda: all(m.batcher.queue_depth == 1 for m in members.values()))
    gone = asyncio.create_task(pipeline.submit(plan, rows(1, 2.0), None))
    kept = asyncio.create_task(pipeline.submit(plan, rows(3, 3.0), None))
    await until(lambda: pipeline.queue_depth == 2)
    first.cancel()  # its batch is all gone: it leaves both members' queues
    # The next batch (gone + kept, 4 rows) is merged and queued at both members...
    await until(lambda: pipeline.queue_depth == 0 and all(m.batcher.queue_depth == 1 for m in members.values()))
    gone.cancel()  # ...and one of its requests goes away while queued there
    with pytest.raises(asyncio.CancelledError):
        await gone
    gate.set()
    result = await kept
    await asyncio.gather(*blockers)
    with pytest.raises(asyncio.CancelledError):
        await first
    for member in members.values():
        assert member.model.batches == [1, 3]  # the blocker, then only the kept request's rows
    np.testing.assert_array_equal(result["a"], rows(3, 3.0))
    np.testing.assert_array_equal(result["b"], rows(3, 6.0))


async def test_a_request_answered_at_its_cutoff_leaves_the_members_queues():
    gate, members, pipeline, blockers, plan = await setup()
    loop = asyncio.get_running_loop()
    first = asyncio.create_task(pipeline.submit(plan, rows(1, 1.0), None))  # holds the pipeline
    await until(lambda: all(m.batcher.queue_depth == 1 for m in members.values()))
    short = asyncio.create_task(pipeline.submit(plan, rows(2, 1.0), loop.time() + 0.5))
    long = asyncio.create_task(pipeline.submit(plan, rows(1, 2.0), None))
    await until(lambda: pipeline.queue_depth == 2)
    first.cancel()  # short and long now go to the members as one batch of 3 rows
    await until(lambda: pipeline.queue_depth == 0 and all(m.batcher.queue_depth == 1 for m in members.values()))
    with pytest.raises(DeadlineExceeded):
        await short  # no member answered by its cutoff
    gate.set()
    result = await long
    await asyncio.gather(*blockers)
    for member in members.values():
        assert member.model.batches == [1, 1]  # the blocker's row, then the long request's: not short's two
    np.testing.assert_array_equal(result["b"], rows(1, 4.0))


async def test_a_submission_with_no_row_wanted_is_never_computed_and_a_pruned_one_is_scattered_back():
    gate = asyncio.Event()
    model = GatedModel(10.0, gate)
    batcher = DynamicBatcher("m:1", model, BatchingConfig(), clock=asyncio.get_running_loop().time)
    blocker = asyncio.create_task(batcher.submit(rows(1, 0.0)))
    await until(lambda: model.running == 1)
    wanted = np.array([True, False, True])
    none = asyncio.create_task(batcher.submit(rows(2, 1.0), keep=lambda: np.zeros(2, dtype=bool)))
    some = asyncio.create_task(batcher.submit(np.arange(6, dtype=np.float32).reshape(3, 2), keep=lambda: wanted))
    await until(lambda: batcher.queue_depth == 2)
    gate.set()
    out = await some
    await blocker
    with pytest.raises(asyncio.CancelledError):
        await none
    assert model.batches == [1, 2]
    np.testing.assert_array_equal(out[[0, 2]], np.array([[0, 10], [40, 50]], dtype=np.float32))
    assert batcher.queue_depth == 0 and batcher.in_flight == 0
