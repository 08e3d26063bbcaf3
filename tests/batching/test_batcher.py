"""DynamicBatcher with a fake model: a small async function that does real numpy work and
sleeps to stand in for compute. The tests run on looptime's fast-forwarded event loop and the
batcher reads the loop's clock (`clock=loop.time`): a sleep takes no wall time and exactly its
loop time, so delays, deadlines and admission are checked to the microsecond."""

from __future__ import annotations

import asyncio
import contextvars

import numpy as np
import pytest

from service.batching.batcher import DynamicBatcher
from service.batching.config import BatchingConfig
from service.batching.priority import PRIORITY, Priority
from service.errors import DeadlineExceeded, InvalidInput, ModelNotReady, Overloaded

pytestmark = pytest.mark.looptime


def now() -> float:
    """The batchers' clock here: the running (fast-forwarded) loop's."""
    return asyncio.get_running_loop().time()


def since(start: float) -> float:
    """Loop seconds since `start`, rounded to looptime's resolution (1 us): exact."""
    return round(now() - start, 6)


def make_batcher(name: str, run_batch, config: BatchingConfig, observer=None, **kwargs) -> DynamicBatcher:
    return DynamicBatcher(name, run_batch, config, observer, clock=asyncio.get_running_loop().time, **kwargs)


class FakeModel:
    """run_batch stand-in: output = 2 * rows + 1; records every batch it sees."""

    def __init__(self, compute_s: float = 0.0, gate: asyncio.Event | None = None,
                 fail_on: float | None = None) -> None:
        self.compute_s = compute_s
        self.gate = gate
        self.fail_on = fail_on
        self.batches: list[np.ndarray] = []
        self.running = 0
        self.max_running = 0

    async def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.batches.append(rows.copy())
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.compute_s)
            if self.fail_on is not None and np.any(rows == self.fail_on):
                raise RuntimeError("model blew up")
            return rows * 2.0 + 1.0
        finally:
            self.running -= 1

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]

    def saw(self, value: float) -> bool:
        return any(np.any(b == value) for b in self.batches)


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[str, int, list[float]]] = []

    def on_batch(self, model: str, batch_rows: int, queue_waits_s: list[float]) -> None:
        self.batches.append((model, batch_rows, queue_waits_s))


def row(value: float, width: int = 3) -> np.ndarray:
    return np.full((1, width), value, dtype=np.float32)


async def wait_until(predicate, turns: int = 1000) -> None:
    """Turn the event loop until `predicate` holds; no loop time passes meanwhile."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"condition not reached in {turns} turns of the loop")


# -- a lone request on the loop -------------------------------------------------------------
async def test_a_lone_batch_is_computed_on_the_loop_only_up_to_inline_rows():
    """A lone request's batch of at most inline_rows rows is computed by `inline` in the
    caller's step; a larger one goes to run_batch (the model's thread), so a big batch never
    holds the event loop (and every other call with it)."""
    model = FakeModel()
    here: list[int] = []

    def inline(rows: np.ndarray) -> np.ndarray:
        here.append(rows.shape[0])
        return rows * 2.0 + 1.0

    batcher = make_batcher("m", model, BatchingConfig(max_batch_size=16), inline=inline, inline_rows=4)
    small = await batcher.submit(np.ones((4, 3), np.float32))
    big = await batcher.submit(np.ones((5, 3), np.float32))
    assert here == [4] and model.sizes == [5]
    assert small.tolist() == [[3.0] * 3] * 4 and big.tolist() == [[3.0] * 3] * 5
    await batcher.stop()


# -- batching ------------------------------------------------------------------------------
async def test_concurrent_single_rows_are_merged_up_to_max_batch_size():
    model = FakeModel(compute_s=0.02)
    recorder = Recorder()
    batcher = make_batcher("m", model, BatchingConfig(max_batch_size=8), recorder)
    start = now()
    outs = await asyncio.gather(*(batcher.submit(row(i)) for i in range(30)))
    assert sum(model.sizes) == 30
    assert model.sizes == [8, 8, 8, 6]  # all thirty queued before the dispatcher's first turn
    assert since(start) == 4 * 0.02  # one batch after the other
    assert [b[1] for b in recorder.batches] == model.sizes
    assert all(len(b[2]) == b[1] for b in recorder.batches)  # one wait per request
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out, row(i) * 2 + 1)
    await batcher.stop()


async def test_each_caller_gets_its_own_answer():
    model = FakeModel(compute_s=0.003)
    batcher = make_batcher("m", model, BatchingConfig(max_batch_size=16))
    k = 7.0

    async def call(i: int) -> None:
        await asyncio.sleep(np.random.default_rng(i).uniform(0, 0.02))
        out = await batcher.submit(np.arange(4, dtype=np.float64)[None, :] * i * k)
        np.testing.assert_array_equal(out, np.arange(4)[None, :] * i * k * 2 + 1)

    await asyncio.gather(*(call(i) for i in range(200)))
    assert sum(model.sizes) == 200
    assert len(model.sizes) < 200  # some merging happened
    await batcher.stop()


async def test_multi_row_requests_are_merged_and_split_back():
    gate = asyncio.Event()
    model = FakeModel(gate=gate)
    batcher = make_batcher("m", model, BatchingConfig(max_batch_size=16))
    first = asyncio.create_task(batcher.submit(row(-1)))
    await wait_until(lambda: model.running == 1)
    sizes = [1, 3, 2, 5]
    blocks = [np.arange(n * 3, dtype=np.float32).reshape(n, 3) + 100 * i
              for i, n in enumerate(sizes)]
    tasks = [asyncio.create_task(batcher.submit(b)) for b in blocks]
    await wait_until(lambda: batcher.queue_depth == 4)
    gate.set()
    outs = await asyncio.gather(*tasks)
    await first
    assert model.sizes == [1, 11]
    for block, out in zip(blocks, outs):
        assert out.shape == block.shape
        np.testing.assert_array_equal(out, block * 2 + 1)
    await batcher.stop()


async def test_requests_are_never_split_across_batches():
    gate = asyncio.Event()
    model = FakeModel(gate=gate)
    batcher = make_batcher("m", model, BatchingConfig(max_batch_size=8))
    first = asyncio.create_task(batcher.submit(row(-1)))
    await wait_until(lambda: model.running == 1)
    tasks = [asyncio.create_task(batcher.submit(np.zeros((n, 3), np.float32) + n))
             for n in (5, 4, 3, 1)]
    await wait_until(lambda: batcher.queue_depth == 4)
    gate.set()
    await asyncio.gather(first, *tasks)
    assert model.sizes == [1, 5, 8]  # 5 | 4+3+1: the 4 does not fit after the 5


async def test_oversize_request_is_rejected_with_the_sizes():
    batcher = make_batcher("digits", FakeModel(), BatchingConfig(max_batch_size=8))
    with pytest.raises(InvalidInput, match=r"12 rows.*max batch size of 8"):
        await batcher.submit(np.zeros((12, 3)))
    with pytest.raises(InvalidInput, match="at least one row"):
        await batcher.submit(np.zeros((0, 3)))


async def test_incompatible_row_shapes_go_in_separate_batches():
    gate = asyncio.Event()
    model = FakeModel(gate=gate)
    batcher = make_batcher("m", model, BatchingConfig())
    first = asyncio.create_task(batcher.submit(row(-1)))
    await wait_until(lambda: model.running == 1)
    a = asyncio.create_task(batcher.submit(row(1, width=3)))
    b = asyncio.create_task(batcher.submit(row(2, width=4)))
    c = asyncio.create_task(batcher.submit(row(3, width=4)))
    await wait_until(lambda: batcher.queue_depth == 3)
    gate.set()
    await first
    np.testing.assert_array_equal(await a, row(3, 3))
    np.testing.assert_array_equal(await b, row(5, 4))
    np.testing.assert_array_equal(await c, row(7, 4))
    assert model.sizes == [1, 1, 2]


# -- latency -------------------------------------------------------------------------------
async def test_lone_request_is_dispatched_at_once():
    model = FakeModel(compute_s=0.005)
    batcher = make_batcher("m", model, BatchingConfig(preferred_batch_sizes=(8,)))
    await batcher.submit(row(0))  # warm: start the dispatcher
    for i in range(20):
        # alone, with no delay configured: dispatched at once, answered after its compute
        start = now()
        await batcher.submit(row(i))
        assert since(start) == 0.005
    assert model.sizes == [1] * 21
    await batcher.stop()


async def test_lone_request_with_a_delay_waits_it_out():
    """The contrast case: a positive delay is a timer tax on lone requests."""
    delay_s = 0.05
    batcher = make_batcher("m", FakeModel(), BatchingConfig(max_queue_delay_us=int(delay_s * 1e6)))
    start = now()
    await batcher.submit(row(0))
    assert since(start) == delay_s  # the whole delay, though its compute takes none
    await batcher.stop()


async def test_delay_stops_at_the_preferred_batch_size():
    delay_s = 5.0  # far longer than the four arrivals take, even on a loaded machine
    model = FakeModel()
    config = BatchingConfig(max_queue_delay_us=int(delay_s * 1e6), preferred_batch_sizes=(4,))
    batcher = make_batcher("m", model, config)
    start = now()

    async def later(i: int):
        await asyncio.sleep(0.005 * i)
        return await batcher.submit(row(i))

    await asyncio.gather(*(later(i) for i in range(4)))
    assert model.sizes == [4]
    assert since(start) == 0.015  # dispatched as the fourth arrived, not after the delay
    await batcher.stop()


async def test_no_request_waits_longer_than_delay_plus_one_batch():
    # A batcher that held requests for a full batch of 64 would keep them ~2 s (100 arrivals
    # over 3 s); the bounds are exact on this clock.
    delay_s, compute_s = 0.2, 0.1
    recorder = Recorder()
    model = FakeModel(compute_s=compute_s)
    config = BatchingConfig(max_batch_size=64, max_queue_delay_us=int(delay_s * 1e6))
    batcher = make_batcher("m", model, config, recorder)
    rng = np.random.default_rng(0)

    async def call(i: int) -> float:
        await asyncio.sleep(rng.uniform(0, 3.0))
        start = now()
        await batcher.submit(row(i))
        return since(start)

    latencies = await asyncio.gather(*(call(i) for i in range(100)))
    waits = [round(w, 6) for _, _, ws in recorder.batches for w in ws]
    assert len(waits) == 100
    assert max(waits) <= delay_s + compute_s
    assert max(latencies) <= delay_s + 2 * compute_s
    assert sorted(latencies) == sorted(round(w + compute_s, 6) for w in waits)  # a wait, then its batch
    await batcher.stop()


# -- admission, deadlines, cancellation, errors --------------------------------------------
async def test_full_queue_rejects_at_once():
    gate = asyncio.Event()
    model = FakeModel(gate=gate)
    batcher = make_batcher("m", model, BatchingConfig(max_queue_size=2))
    running = asyncio.create_task(batcher.submit(row(0)))
    await wait_until(lambda: model.running == 1)
    queued = [asyncio.create_task(batcher.submit(row(i))) for i in (1, 2)]
    await wait_until(lambda: batcher.queue_depth == 2)
    start = now()
    with pytest.raises(Overloaded, match="queue full"):  # at once: waiting would never end
        await asyncio.wait_for(batcher.submit(row(3)), timeout=10)
    assert since(start) == 0.0 and not gate.is_set() and model.running == 1
    gate.set()
    await asyncio.gather(running, *queued)
    assert not model.saw(3)
    await batcher.stop()


async def test_expired_request_is_dropped_and_never_run():
    gate = asyncio.Event()
    model = FakeModel(gate=gate)
    batcher = make_batcher("m", model, BatchingConfig())
    running = asyncio.create_task(batcher.submit(row(0)))
    await wait_until(lambda: model.running == 1)
    start = now()
    late = asyncio.create_task(batcher.submit(row(42), deadline=start + 0.03))
    kept = asyncio.create_task(batcher.submit(row(1), deadline=start + 10))
    with pytest.raises(DeadlineExceeded, match=r"deadline passed after 0\.0300 s in the queue"):
        await asyncio.wait_for(late, timeout=10)
    # failed at its deadline, not when the model came free: it is still busy
    assert since(start) == 0.03 and model.running == 1
    assert batcher.queue_depth == 1
    gate.set()
    await asyncio.gather(running, kept)
    assert not model.saw(42)
    assert model.sizes == [1, 1]
    await batcher.stop()


async def test_a_request_that_cannot_finish_before_its_deadline_is_refused_at_once():
    model = FakeModel(compute_s=0.2)
    batcher = make_batcher("m", model, BatchingConfig(max_batch_size=1))
    await batcher.submit(row(0))  # one batch measured: about 0.2 s
    backlog = [asyncio.create_task(batcher.submit(row(i))) for i in range(1, 11)]  # ~2 s of work
    await wait_until(lambda: batcher.queue_depth == 9)
    start = now()
    with pytest.raises(Overloaded, match=r"9 rows queued ahead, about 2200\.0 ms of work \(11 batches of 200\.00 ms\), "
                                         r"more than the 1000\.0 ms its deadline leaves"):
        await batcher.submit(row(99), deadline=start + 1.0)  # refused without queueing or waiting
    assert since(start) == 0.0 and batcher.queue_depth == 9  # nothing was queued for it
    admitted = await asyncio.wait_for(batcher.submit(row(98), deadline=start + 60), timeout=60)
    np.testing.assert_array_equal(admitted, row(98) * 2 + 1)
    assert since(start) == 11 * 0.2  # behind the running batch and the nine queued
    await asyncio.gather(*backlog)
    assert not model.saw(99)  # refused work never reaches the model
    await batcher.stop()


async def test_an_idle_model_admits_whatever_the_last_batch_took():
    model = FakeModel(compute_s=0.3)
    batcher = make_batcher("m", model, BatchingConfig(max_batch_size=1))
    await batcher.submit(row(0))  # measured: about 0.3 s per batch
    model.compute_s = 0.0  # the slow moment is over, but only a batch can tell
    answer = await asyncio.wait_for(batcher.submit(row(7), deadline=now() + 0.2), timeout=60)
    np.testing.assert_array_equal(answer, row(7) * 2 + 1)
    assert model.saw(7)
    await batcher.stop()


async def test_no_deadline_or_no_measurement_yet_is_admitted():
    gate = asyncio.Event()
    model = FakeModel(gate=gate)
    batcher = make_batcher("m", model, BatchingConfig(max_batch_size=1))
    # nothing measured yet: even a tight deadline is queued (it expires in the queue instead)
    first = asyncio.create_task(batcher.submit(row(1), deadline=now() + 30))
    second = asyncio.create_task(batcher.submit(row(2)))
    await wait_until(lambda: model.running == 1 and batcher.queue_depth == 1)
    gate.set()
    await asyncio.gather(first, second)
    await batcher.stop()


async def test_past_deadline_is_rejected_before_queueing():
    model = FakeModel()
    batcher = make_batcher("m", model, BatchingConfig())
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(row(5), deadline=now() - 0.001)
    assert not model.batches


async def test_cancelled_caller_is_not_run():
    gate = asyncio.Event()
    model = FakeModel(gate=gate)
    batcher = make_batcher("m", model, BatchingConfig())
    running = asyncio.create_task(batcher.submit(row(0)))
    await wait_until(lambda: model.running == 1)
    doomed = asyncio.create_task(batcher.submit(row(42)))
    kept = asyncio.create_task(batcher.submit(row(1)))
    await wait_until(lambda: batcher.queue_depth == 2)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert batcher.queue_depth == 1
    gate.set()
    await asyncio.gather(running, kept)
    assert not model.saw(42)
    await batcher.stop()


async def test_run_batch_error_reaches_every_request_of_the_batch_then_serving_goes_on():
    gate = asyncio.Event()
    model = FakeModel(gate=gate, fail_on=13.0)
    batcher = make_batcher("m", model, BatchingConfig())
    running = asyncio.create_task(batcher.submit(row(0)))
    await wait_until(lambda: model.running == 1)
    doomed = [asyncio.create_task(batcher.submit(row(v))) for v in (12, 13, 14)]
    await wait_until(lambda: batcher.queue_depth == 3)
    gate.set()
    await running
    results = await asyncio.gather(*doomed, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "blew up" in str(r) for r in results)
    np.testing.assert_array_equal(await batcher.submit(row(2)), row(5))
    assert batcher.in_flight == 0 and batcher.queue_depth == 0
    await batcher.stop()


# -- concurrency and lifecycle -------------------------------------------------------------
async def test_in_flight_and_queue_depth():
    gate = asyncio.Event()
    model = FakeModel(gate=gate)
    batcher = make_batcher("m", model, BatchingConfig())
    running = asyncio.create_task(batcher.submit(np.zeros((3, 2))))
    await wait_until(lambda: model.running == 1)
    queued = asyncio.create_task(batcher.submit(np.zeros((2, 2))))
    await wait_until(lambda: batcher.queue_depth == 1)
    assert batcher.in_flight == 3
    gate.set()
    await asyncio.gather(running, queued)
    assert batcher.in_flight == 0 and batcher.queue_depth == 0
    await batcher.stop()


async def test_one_batch_runs_at_a_time():
    model = FakeModel(compute_s=0.03)
    batcher = make_batcher("m", model, BatchingConfig(max_batch_size=4))
    outs = await asyncio.gather(*(batcher.submit(row(i)) for i in range(16)))
    assert model.max_running == 1 and max(model.sizes) <= 4
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out, row(i) * 2 + 1)
    await batcher.stop()


async def test_stop_drains_queued_and_running_work():
    gate = asyncio.Event()
    model = FakeModel(gate=gate)
    batcher = make_batcher("m", model, BatchingConfig(max_batch_size=2))
    tasks = [asyncio.create_task(batcher.submit(row(i))) for i in range(5)]
    await wait_until(lambda: model.running == 1)
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0.01)
    assert not stopping.done()
    with pytest.raises(ModelNotReady):
        await batcher.submit(row(9))
    gate.set()
    await stopping
    for i, task in enumerate(tasks):
        np.testing.assert_array_equal(task.result(), row(i) * 2 + 1)
    assert model.sizes == [2, 2, 1]  # all five queued before the dispatcher first ran
    with pytest.raises(ModelNotReady):
        await batcher.submit(row(9))


async def test_stop_with_timeout_fails_what_is_still_queued():
    gate = asyncio.Event()
    model = FakeModel(gate=gate)
    batcher = make_batcher("m", model, BatchingConfig())
    running = asyncio.create_task(batcher.submit(row(0)))
    await wait_until(lambda: model.running == 1)
    queued = asyncio.create_task(batcher.submit(row(1)))
    await wait_until(lambda: batcher.queue_depth == 1)
    start = now()
    await batcher.stop(timeout=0.02)
    assert since(start) == 0.02
    with pytest.raises(ModelNotReady):
        await queued
    gate.set()
    np.testing.assert_array_equal(await running, row(1))  # the running batch still answers
    assert not model.saw(1)


async def test_stop_before_start_and_twice():
    batcher = make_batcher("m", FakeModel(), BatchingConfig())
    await batcher.stop()
    await batcher.stop()
    with pytest.raises(ModelNotReady):
        await batcher.submit(row(0))


async def test_observer_failure_does_not_fail_the_batch():
    class Broken:
        def on_batch(self, model, batch_rows, queue_waits_s):
            raise RuntimeError("metrics down")

    batcher = make_batcher("m", FakeModel(), BatchingConfig(), Broken())
    np.testing.assert_array_equal(await batcher.submit(row(1)), row(3))
    await batcher.stop()


# -- config --------------------------------------------------------------------------------
def test_config_validates_and_sorts_preferred_sizes():
    config = BatchingConfig(max_batch_size=32, preferred_batch_sizes=(16, 4, 8, 8))
    assert config.preferred_batch_sizes == (4, 8, 16)
    assert config.target_rows(1) == 4
    assert config.target_rows(8) == 8
    assert config.target_rows(9) == 16
    assert config.target_rows(17) == 32
    for bad in (dict(max_batch_size=0), dict(max_queue_delay_us=-1), dict(max_queue_size=0),
                dict(preferred_batch_sizes=(128,))):
        with pytest.raises(ValueError):
            BatchingConfig(**bad)


async def test_a_higher_priority_overtakes_lower_ones_queued_before_it():
    """A member shared by ensembles queues by priority level (PRIORITY: the request's, or its
    ensemble batch's): with the model busy, two level-2 requests then a level-1 one: the level-1
    row goes in the next batch, the level-2 rows after it, in their order."""
    gate = asyncio.Event()
    model = FakeModel(gate=gate)
    batcher = make_batcher("m", model, BatchingConfig(max_batch_size=1))
    first = asyncio.create_task(batcher.submit(row(0)))
    await wait_until(lambda: model.running == 1)

    def at(level: int, value: float) -> asyncio.Task:
        context = contextvars.copy_context()
        context.run(PRIORITY.set, Priority(level, 2, 0.25))
        return asyncio.create_task(batcher.submit(row(value)), context=context)

    low = [at(2, 20.0), at(2, 21.0)]
    await wait_until(lambda: batcher.queue_depth == 2)
    high = at(1, 10.0)
    await wait_until(lambda: batcher.queue_depth == 3)
    gate.set()
    await asyncio.gather(first, high, *low)
    assert [float(b[0, 0]) for b in model.batches] == [0.0, 10.0, 20.0, 21.0]
    await batcher.stop()
