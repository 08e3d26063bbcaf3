"""The data plane on the real digits ensemble: policies' accuracy, stragglers, and batching
that never changes an answer."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.dataplane import DataPlane
from service.errors import DeadlineExceeded
from service.evaluation import member_scores, policy_accuracy
from service.monitoring.statistics import Statistics
from service.repository.manager import ModelManager
from service.settings import Settings
from tests.helpers import MODELS


async def _data_plane(statistics: Statistics | None = None, **settings) -> DataPlane:
    manager = ModelManager(Settings(model_repository=MODELS, poll_interval_s=0, device="cpu", **settings),
                           statistics)
    await manager.start()
    return DataPlane(manager)


async def test_confidence_and_soft_at_least_as_accurate_as_best_member(test_split):
    x, y = test_split
    data = await _data_plane()
    members = await member_scores(data, "digits", x, y)
    policies = await policy_accuracy(data, "digits", x, y)
    await data.manager.stop()
    best = max(m.accuracy for m in members)
    print({m.name: m.accuracy for m in members}, policies)
    assert len(y) == 360
    assert policies["confidence"] >= best
    assert policies["soft"] >= best
    assert all(0.9 < value <= 1.0 for value in policies.values())


async def test_member_past_the_deadline_is_left_out_and_named(test_split):
    x, _ = test_split
    data = await _data_plane()
    slow = data.manager.resolve("digits_cnn_b")
    original = slow.infer

    async def sleepy(rows, deadline=None):  # a test wrapper adding latency to one member
        await asyncio.sleep(20.0)
        return await original(rows, deadline)

    slow.infer = sleepy
    start = time.monotonic()
    result = await data.infer("digits", x[:8], deadline=start + 2.0)
    elapsed = time.monotonic() - start
    # It answers at the deadline less the safety margin, not after the slow member's 20 s
    # (margins no load can erase: the others answer in milliseconds).
    assert 2.0 - 0.005 - 0.001 <= elapsed < 2.0 + 3.0
    assert result.left_out == ("digits_cnn_b",)
    assert "digits_cnn_b" not in result.vote.members and len(result.vote.members) == 4
    by_name = {m.name: m for m in result.members}
    assert not by_name["digits_cnn_b"].in_time and by_name["digits_mlp_a"].in_time
    assert result.vote.label_index.shape == (8,)
    # Below the quorum (all 5 members needed), the same deadline is an error naming who was late.
    quorate = data.manager.ensemble("digits")
    quorate.config = quorate.config.model_copy(update={"quorum": 5})
    with pytest.raises(DeadlineExceeded, match="digits_cnn_b"):
        await data.infer("digits", x[:8], deadline=time.monotonic() + 2.0)
    await data.manager.stop()


@pytest.mark.parametrize("mode", ["strict", "tolerant"])
async def test_batched_live_traffic_equals_rows_run_alone(test_split, mode):
    """Concurrent requests of 1-3 rows are merged by the batchers; every answer must equal
    the same rows answered on their own."""
    x, _ = test_split
    statistics = Statistics()
    data = await _data_plane(statistics, batch_invariance=mode)
    sizes = np.random.default_rng(0).integers(1, 4, 120)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) % (len(x) - 3)
    requests = [x[s:s + n] for s, n in zip(starts, sizes)]
    alone = [(await data.infer("digits", r)).vote.probabilities for r in requests]
    statistics.models.clear()
    together = await asyncio.gather(*(data.infer("digits", r) for r in requests))
    await data.manager.stop()
    batches = [size for stats in statistics.models.values() for size in stats.batches]
    assert max(batches) > 3, "requests were never merged"
    deviation = max(float(np.abs(a - t.vote.probabilities).max()) for a, t in zip(alone, together))
    print(f"{mode}: largest batch {max(batches)} rows, max deviation {deviation:.3g}")
    if mode == "strict":
        assert deviation == 0.0
    else:
        assert deviation <= 1e-6
