"""The data plane on real digits models: policies' accuracy, stragglers, and batching that
never changes an answer.

The ensemble is the bundled ONNX members' (tests.helpers.onnx_ensemble, loaded in
milliseconds), except where the five bundled members are what a claim is about. The tests
that depend on time run on looptime's fast-forwarded loop, with the manager (and so its
batchers and the data plane) on the loop's clock: their deadlines are checked exactly. The
models still compute in their threads, which takes no loop time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from service.dataplane import DataPlane
from service.errors import DeadlineExceeded, Overloaded
from service.evaluation import member_scores, policy_accuracy
from service.monitoring.statistics import Statistics
from service.repository.manager import ModelManager
from service.settings import Settings
from tests.helpers import MODELS, ONNX_VARIANTS, copy_variant, monitored_data_plane, onnx_ensemble


async def _data_plane(repository: Path, statistics: Statistics | None = None, *, loop_clock: bool = False,
                      **settings) -> DataPlane:
    """`repository` served on the CPU; `loop_clock`: the manager reads the running loop's
    clock (a looptime test), else its default."""
    clock = {"clock": asyncio.get_running_loop().time} if loop_clock else {}
    manager = ModelManager(Settings(model_repository=repository, poll_interval_s=0, device="cpu", **settings),
                           statistics, **clock)
    await manager.start()
    return DataPlane(manager)


def now() -> float:
    return asyncio.get_running_loop().time()


def since(start: float) -> float:
    """Loop seconds since `start`, rounded to looptime's resolution (1 us): exact."""
    return round(now() - start, 6)


async def turn_until(predicate, turns: int = 1000) -> None:
    """Turn the event loop until `predicate` holds; no loop time passes meanwhile."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"condition not reached in {turns} turns of the loop")


async def test_confidence_and_soft_at_least_as_accurate_as_best_member(test_split):
    """The bundled five-member ensemble (TensorFlow members included): on the three ONNX
    members alone soft voting is not (0.975 against digits_cnn_a's 0.981), so the claim is
    about these five."""
    x, y = test_split
    data = await _data_plane(MODELS)
    members = await member_scores(data, "digits", x, y)
    policies = await policy_accuracy(data, "digits", x, y)
    await data.manager.stop()
    best = max(m.accuracy for m in members)
    print({m.name: m.accuracy for m in members}, policies)
    assert len(y) == 360
    assert policies["confidence"] >= best
    assert policies["soft"] >= best
    assert all(0.9 < value <= 1.0 for value in policies.values())


@pytest.mark.looptime
async def test_member_past_the_deadline_is_left_out_and_named(scratch_repo, test_split):
    x, _ = test_split
    data = await _data_plane(onnx_ensemble(scratch_repo), loop_clock=True)
    slow = data.manager.resolve("digits_cnn_a")
    original = slow.infer
    calls = []

    async def sleepy(rows, deadline=None, arrivals=None, keep=None):  # a test wrapper adding latency to one member
        calls.append(rows.shape[0])
        await asyncio.sleep(20.0)
        return await original(rows, deadline, arrivals, keep)

    slow.infer = sleepy
    start = now()
    result = await data.infer("digits", x[:8], deadline=start + 2.0)
    # It answers at the deadline less the ensemble's 5 ms safety margin, not after the slow
    # member's 20 s (the others' compute takes no loop time).
    assert since(start) == 1.995
    assert result.left_out == ("digits_cnn_a",)
    assert "digits_cnn_a" not in result.vote.members and len(result.vote.members) == 2
    by_name = {m.name: m for m in result.members}
    assert not by_name["digits_cnn_a"].in_time and by_name["digits_mlp_a"].in_time
    assert round(by_name["digits_cnn_a"].latency_s, 6) == 1.995  # waited for until the cutoff
    assert result.vote.label_index.shape == (8,)
    # Below the quorum (all 3 members needed), the same deadline is an error naming who was late.
    quorate = data.manager.ensemble("digits")
    quorate.config = quorate.config.model_copy(update={"quorum": 3})
    start = now()
    with pytest.raises(DeadlineExceeded, match=r"2 of 3 members answered \(quorum 3\).*left out: digits_cnn_a "
                                               r"\(no answer after 1\.9950 s\)"):
        await data.infer("digits", x[:8], deadline=start + 2.0)
    assert since(start) == 1.995 and calls == [8, 8]
    await data.manager.stop()


@pytest.mark.parametrize("mode", ["strict", "tolerant"])
async def test_batched_live_traffic_equals_rows_run_alone(scratch_repo, test_split, mode):
    """Concurrent requests of 1-3 rows are merged by the batchers; every answer must equal
    the same rows answered on their own."""
    x, _ = test_split
    statistics = Statistics()
    data = await _data_plane(onnx_ensemble(scratch_repo), statistics, batch_invariance=mode)
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
        at_the_other_version = [await data.infer("m", r, version=3 - v) for r, v in requests[:8]]
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
    assert any(not np.array_equal(a.logits, b.logits) for a, b in zip(alone, at_the_other_version))


@pytest.mark.looptime
async def test_a_single_model_request_that_expires_queued_never_reaches_the_model(scratch_repo, test_split):
    """Behind a batch that takes long, a request whose deadline passes fails then, at once,
    with DeadlineExceeded naming the model; its rows are never computed. Once a batch's time
    is measured, a request whose deadline leaves less is refused at once (Overloaded). One
    whose deadline passes while its own batch computes fails at its deadline, not when the
    model answers. An idle model admits whatever its last batch took: only a batch measures
    anew."""
    x, _ = test_split
    copy_variant("digits_mlp_a", scratch_repo)
    data = await _data_plane(scratch_repo, loop_clock=True)
    served = data.manager.resolve("digits_mlp_a")
    original = served.infer
    release = asyncio.Event()
    calls = []

    async def held(rows, deadline=None, arrivals=None, keep=None):  # the first batch waits until the test releases it
        calls.append(rows.shape[0])
        if len(calls) == 1:
            await release.wait()
        return await original(rows, deadline, arrivals, keep)

    served.infer = held
    try:
        start = now()
        first = asyncio.ensure_future(data.infer("digits_mlp_a", x[:2]))
        await turn_until(lambda: calls)
        with pytest.raises(DeadlineExceeded, match=r"model 'digits_mlp_a': deadline passed after 0\.2000 s in the queue"):
            await data.infer("digits_mlp_a", x[2:5], deadline=now() + 0.2)
        assert since(start) == 0.2  # at its deadline: the model is still busy
        assert not first.done() and calls == [2]
        await asyncio.sleep(1.0)
        release.set()
        assert (await first).vote.label_index.shape == (2,)
        assert calls == [2]  # the expired request's 3 rows never reached the model

        # the first batch took 1.2 s (it waited for the release), but with nothing ahead a
        # request whose deadline leaves less is let in, and answered
        assert (await data.infer("digits_mlp_a", x[:3], deadline=now() + 0.6)).vote.label_index.shape == (3,)
        assert calls == [2, 3]

        release.clear()
        calls.clear()
        start = now()
        held_batch = asyncio.ensure_future(data.infer("digits_mlp_a", x[:4], deadline=start + 3.0))
        await turn_until(lambda: calls)
        # behind a batch measured at about a second (1.2 s, then a batch in no loop time),
        # 50 ms cannot be enough: refused at once
        with pytest.raises(Overloaded, match=r"model 'digits_mlp_a': 0 rows queued ahead, about 1920\.0 ms of work "
                                             r"\(2 batches of 960\.00 ms\), more than the 50\.0 ms "):
            await data.infer("digits_mlp_a", x[:4], deadline=now() + 0.05)
        assert since(start) == 0.0 and calls == [4]
        with pytest.raises(DeadlineExceeded, match=r"model 'digits_mlp_a': deadline reached after 3\.0000 s of compute, "
                                                   r"before the model answered"):
            await held_batch
        assert since(start) == 3.0 and calls == [4]
        release.set()
    finally:
        release.set()
        await data.manager.stop()


@pytest.mark.looptime
async def test_queue_depth_counts_requests_waiting_at_a_model_before_its_batcher(scratch_repo, test_split):
    """quorum_queue_depth (what the autoscaler reads) counts the requests waiting at the
    model's own queue while a batch runs, not only those inside its batcher."""
    x, _ = test_split
    copy_variant("digits_mlp_a", scratch_repo)
    data, monitor = await monitored_data_plane(scratch_repo, clock=asyncio.get_running_loop().time)
    manager = data.manager
    served = manager.resolve("digits_mlp_a")
    original = served.infer
    release = asyncio.Event()

    async def held(rows, deadline=None, arrivals=None, keep=None):
        await release.wait()
        return await original(rows, deadline, arrivals, keep)

    served.infer = held
    get = monitor.registry.get_sample_value
    try:
        assert get("quorum_queue_depth", {"model": "digits_mlp_a"}) == 0
        running = asyncio.ensure_future(data.infer("digits_mlp_a", x[:1]))
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(data.infer("digits_mlp_a", x[i:i + 1])) for i in range(1, 4)]
        await turn_until(lambda: data.queued().get("digits_mlp_a") == 3)
        assert get("quorum_queue_depth", {"model": "digits_mlp_a"}) == 3
        release.set()
        answers = await asyncio.gather(running, *waiting)
        assert [a.vote.label_index.shape for a in answers] == [(1,)] * 4
        assert get("quorum_queue_depth", {"model": "digits_mlp_a"}) == 0
    finally:
        release.set()
        await manager.stop()


async def test_per_request_metrics_and_drift_stay_exact_when_recorded_per_batch(scratch_repo, test_split):
    """Concurrent requests merged into batches are recorded once per batch, yet every
    per-request and per-row figure counts each request: rows answered, queue waits (one
    per request, at the model and at each member), agreement per row, drift rows."""
    x, _ = test_split
    data, monitor = await monitored_data_plane(onnx_ensemble(scratch_repo))
    manager = data.manager
    get = monitor.registry.get_sample_value
    sizes = [1 + i % 3 for i in range(40)]
    starts = np.cumsum([0] + sizes[:-1])
    try:
        before = {m: get("quorum_queue_wait_seconds_count", {"model": m}) or 0.0 for m in ONNX_VARIANTS}
        ensemble = [data.infer("digits", x[s:s + n]) for s, n in zip(starts, sizes)]
        single = [data.infer("digits_mlp_a", x[s:s + n]) for s, n in zip(starts, sizes)]
        answers = await asyncio.gather(*ensemble, *single)
        assert [a.vote.label_index.shape[0] for a in answers] == sizes * 2
        rows = sum(sizes)
        assert get("quorum_inference_rows_total", {"model": "digits"}) == rows
        assert get("quorum_inference_rows_total", {"model": "digits_mlp_a"}) == rows
        assert get("quorum_ensemble_agreement_ratio_count", {"ensemble": "digits"}) == rows
        assert get("quorum_vote_seconds_count", {"model": "digits"}) < len(sizes), "never merged"
        for member in ONNX_VARIANTS:  # each ensemble request waited once at each member
            waits = get("quorum_queue_wait_seconds_count", {"model": member}) - before[member]
            assert waits == len(sizes) * (2 if member == "digits_mlp_a" else 1), member
        for name in ("digits", "digits_mlp_a"):
            assert monitor.drift_windows[name].fill == pytest.approx(rows / monitor.window)
    finally:
        await manager.stop()
