"""The data plane on the real digits ensemble: policies' accuracy, stragglers, and batching
that never changes an answer."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.dataplane import DataPlane
from service.errors import DeadlineExceeded, Overloaded
from service.evaluation import member_scores, policy_accuracy
from service.monitoring.statistics import Statistics
from service.repository.manager import ModelManager
from service.settings import Settings
from tests.helpers import MODELS, copy_variant, monitored_data_plane

MEMBERS = ["digits_mlp_a", "digits_mlp_b", "digits_cnn_a", "digits_cnn_b", "digits_logreg"]


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

    async def sleepy(rows, deadline=None, arrivals=None):  # a test wrapper adding latency to one member
        await asyncio.sleep(20.0)
        return await original(rows, deadline, arrivals)

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


def _two_version_repo(repo):
    """Model `m`: version 1 is digits_mlp_a, version 2 digits_logreg (same input and labels,
    different answers), both served."""
    copy_variant("digits_mlp_a", repo, 1, as_name="m")
    copy_variant("digits_logreg", repo, 2, as_name="m")
    (repo / "m" / "model.yaml").write_text("version_policy: {all: {}}\n")


@pytest.mark.parametrize("mode", ["strict", "tolerant"])
async def test_a_single_model_merges_requests_and_each_answer_equals_its_rows_alone(scratch_repo, test_split, mode):
    """A single model is an ensemble of one: concurrent requests of 1-3 rows, to two versions
    at once, are merged into batches (never across versions) and calibrated once per batch;
    every answer (vote, probabilities, logits, version) equals the same rows asked alone."""
    x, _ = test_split
    _two_version_repo(scratch_repo)
    statistics = Statistics()
    manager = ModelManager(Settings(model_repository=scratch_repo, poll_interval_s=0, device="cpu",
                                    batch_invariance=mode), statistics)
    await manager.start()
    data = DataPlane(manager)
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 4, 160)
    versions = rng.integers(1, 3, 160)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) % (len(x) - 3)
    requests = [(x[s:s + n], int(v)) for s, n, v in zip(starts, sizes, versions)]
    try:
        alone = [await data.infer("m", r, version=v) for r, v in requests]
        statistics.models.clear()
        together = await asyncio.gather(*(data.infer("m", r, version=v) for r, v in requests))
    finally:
        await manager.stop()
    batches = [size for stats in statistics.models.values() for size in stats.batches]
    assert max(batches) > 3, "requests were never merged"
    assert sum(s.execution_count for s in statistics.models.values()) < len(requests)
    tolerance = 0.0 if mode == "strict" else 1e-6
    for (rows, version), a, t in zip(requests, alone, together):
        assert t.version == a.version == version and t.model == "m"
        assert t.vote.label_index.shape == (rows.shape[0],)
        np.testing.assert_array_equal(t.vote.label_index, a.vote.label_index)
        np.testing.assert_allclose(t.vote.probabilities, a.vote.probabilities, rtol=0, atol=tolerance)
        np.testing.assert_allclose(t.logits, a.logits, rtol=0, atol=tolerance)
        np.testing.assert_allclose(t.member_probabilities, a.member_probabilities, rtol=0, atol=tolerance)
        assert t.inputs is not None and np.array_equal(t.inputs, rows)
    # the two versions answer differently, so a batch mixing them could not have passed
    assert any(not np.array_equal(a.logits, b.logits) for a, b in zip(
        alone, [await _alone_at(scratch_repo, r, 3 - v) for r, v in requests[:8]]))


async def _alone_at(repo, rows, version):
    manager = ModelManager(Settings(model_repository=repo, poll_interval_s=0, device="cpu"))
    await manager.start()
    try:
        return await DataPlane(manager).infer("m", rows, version=version)
    finally:
        await manager.stop()


async def test_a_single_model_request_that_expires_queued_never_reaches_the_model(test_split):
    """Behind a batch that takes long, a request whose deadline passes fails then, at once,
    with DeadlineExceeded naming the model; its rows are never computed. Once a batch's time
    is measured, a request whose deadline leaves less is refused at once (Overloaded). One
    whose deadline passes while its own batch computes fails at its deadline, not when the
    model answers. An idle model admits whatever its last batch took: only a batch measures
    anew."""
    x, _ = test_split
    data = await _data_plane()
    served = data.manager.resolve("digits_mlp_a")
    original = served.infer
    release = asyncio.Event()
    calls = []

    async def held(rows, deadline=None, arrivals=None):  # the first batch waits until the test releases it
        calls.append(rows.shape[0])
        if len(calls) == 1:
            await release.wait()
        return await original(rows, deadline, arrivals)

    served.infer = held
    try:
        first = asyncio.ensure_future(data.infer("digits_mlp_a", x[:2]))
        while not calls:
            await asyncio.sleep(0.01)
        with pytest.raises(DeadlineExceeded, match=r"model 'digits_mlp_a': deadline passed after .* in the queue"):
            await data.infer("digits_mlp_a", x[2:5], deadline=time.monotonic() + 0.2)
        assert not first.done() and calls == [2]
        await asyncio.sleep(1.0)
        release.set()
        assert (await first).vote.label_index.shape == (2,)
        assert calls == [2]  # the expired request's 3 rows never reached the model

        # the first batch took over 1.2 s (it waited for the release), but with nothing
        # ahead a request whose deadline leaves less is let in, and answered
        assert (await data.infer("digits_mlp_a", x[:3], deadline=time.monotonic() + 0.6)).vote.label_index.shape == (3,)
        assert calls == [2, 3]

        release.clear()
        calls.clear()
        held_batch = asyncio.ensure_future(data.infer("digits_mlp_a", x[:4], deadline=time.monotonic() + 3.0))
        while not calls:
            await asyncio.sleep(0.01)
        # behind a batch measured at about a second, 50 ms cannot be enough: refused at once
        with pytest.raises(Overloaded, match=r"model 'digits_mlp_a': 0 rows queued ahead, .* more than the "):
            await data.infer("digits_mlp_a", x[:4], deadline=time.monotonic() + 0.05)
        assert calls == [4]
        with pytest.raises(DeadlineExceeded, match=r"model 'digits_mlp_a': deadline reached after .* before "
                                                   r"the model answered"):
            await held_batch
        assert calls == [4]
        release.set()
    finally:
        release.set()
        await data.manager.stop()


async def test_queue_depth_counts_requests_waiting_at_a_model_before_its_batcher(test_split):
    """quorum_queue_depth (what the autoscaler reads) counts the requests waiting at the
    model's own queue while a batch runs, not only those inside its batcher."""
    x, _ = test_split
    data, monitor = await monitored_data_plane()
    manager = data.manager
    served = manager.resolve("digits_mlp_a")
    original = served.infer
    release = asyncio.Event()

    async def held(rows, deadline=None, arrivals=None):
        await release.wait()
        return await original(rows, deadline, arrivals)

    served.infer = held
    get = monitor.registry.get_sample_value
    try:
        assert get("quorum_queue_depth", {"model": "digits_mlp_a"}) == 0
        running = asyncio.ensure_future(data.infer("digits_mlp_a", x[:1]))
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(data.infer("digits_mlp_a", x[i:i + 1])) for i in range(1, 4)]
        while data.queued().get("digits_mlp_a") != 3:
            await asyncio.sleep(0.01)
        assert get("quorum_queue_depth", {"model": "digits_mlp_a"}) == 3
        release.set()
        answers = await asyncio.gather(running, *waiting)
        assert [a.vote.label_index.shape for a in answers] == [(1,)] * 4
        assert get("quorum_queue_depth", {"model": "digits_mlp_a"}) == 0
    finally:
        release.set()
        await manager.stop()


async def test_per_request_metrics_and_drift_stay_exact_when_recorded_per_batch(test_split):
    """Concurrent requests merged into batches are recorded once per batch, yet every
    per-request and per-row figure counts each request: rows answered, queue waits (one
    per request, at the model and at each member), agreement per row, drift rows."""
    x, _ = test_split
    data, monitor = await monitored_data_plane()
    manager = data.manager
    get = monitor.registry.get_sample_value
    sizes = [1 + i % 3 for i in range(40)]
    starts = np.cumsum([0] + sizes[:-1])
    try:
        before = {m: get("quorum_queue_wait_seconds_count", {"model": m}) or 0.0 for m in MEMBERS}
        ensemble = [data.infer("digits", x[s:s + n]) for s, n in zip(starts, sizes)]
        single = [data.infer("digits_mlp_a", x[s:s + n]) for s, n in zip(starts, sizes)]
        answers = await asyncio.gather(*ensemble, *single)
        assert [a.vote.label_index.shape[0] for a in answers] == sizes * 2
        rows = sum(sizes)
        assert get("quorum_inference_rows_total", {"model": "digits"}) == rows
        assert get("quorum_inference_rows_total", {"model": "digits_mlp_a"}) == rows
        assert get("quorum_ensemble_agreement_ratio_count", {"ensemble": "digits"}) == rows
        assert get("quorum_vote_seconds_count", {"model": "digits"}) < len(sizes), "never merged"
        for member in MEMBERS:  # each ensemble request waited once at each member
            waits = get("quorum_queue_wait_seconds_count", {"model": member}) - before[member]
            assert waits == len(sizes) * (2 if member == "digits_mlp_a" else 1), member
        for name in ("digits", "digits_mlp_a"):
            assert monitor.drift_windows[name].fill == pytest.approx(rows / monitor.window)
    finally:
        await manager.stop()
