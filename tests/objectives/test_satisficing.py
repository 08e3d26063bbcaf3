"""Satisficing selection on the real digits members: latency budgets exclude slow members,
feedback moves live accuracy, degraded versions are dropped and come back when fixed.

Latencies are real, so the margins are wide enough that a fully loaded machine cannot flip
them: a slow member sleeps 0.6-1 s, budgets sit at 0.3-0.5 s, and the digits members answer
in milliseconds (tens under load). Requests that only feed measurements run concurrently."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from service.dataplane import DataPlane
from service.satisficing import member_info
from service.errors import DeadlineExceeded, FailedPrecondition
from service.objectives.selection import predicted_latency, replay_accuracy, subsets
from service.objectives.subset_evaluation import _aligned_validation
from service.repository.manager import ModelManager
from service.settings import Settings
from tests.helpers import VARIANTS, copy_variant


BUDGET_MS = 300.0


def _repo(root: Path, members: list[str], objective: str | None) -> Path:
    for name in members:
        copy_variant(name, root)
    (root / "slo").mkdir()
    config = f"members: [{', '.join(members)}]\npolicy: confidence\n"
    (root / "slo" / "ensemble.yaml").write_text(config + (f"objective:\n{objective}" if objective else ""))
    return root


async def _plane(repo: Path, **settings) -> DataPlane:
    manager = ModelManager(Settings(model_repository=repo, poll_interval_s=0, device="cpu", **settings))
    await manager.start()
    data = DataPlane(manager)
    await data.evaluate_objectives()
    return data


def _slow(data: DataPlane, member: str, seconds: float) -> None:
    served = data.manager.resolve(member)
    original = served.infer

    async def slow(rows, deadline=None, arrivals=None, keep=None):  # a test wrapper adding latency to one member
        await asyncio.sleep(seconds)
        return await original(rows, deadline)

    served.infer = slow


async def test_p99_budget_excludes_a_slow_member_and_picks_the_best_feasible_subset(scratch_repo, test_split):
    x, _ = test_split
    data = await _plane(_repo(scratch_repo, VARIANTS, f"  latency_p99_ms: {BUDGET_MS}\n  hysteresis: 0.0\n"
                                                       "  min_latency_samples: 20\n"))
    tracker = data.tracker("slo")
    slow = tracker.selected.members[0]
    _slow(data, slow, 2 * BUDGET_MS / 1000)  # over the budget on its own
    await asyncio.gather(*(data.infer("slo", x[i:i + 1]) for i in range(40)))
    await data.evaluate_objectives()
    assert slow not in tracker.selected.members, tracker.reason

    for i in range(200):
        await data.infer("slo", x[i:i + 1])
    await data.evaluate_objectives()
    [latency] = [c for c in tracker.constraints if c.name == "latency_p99_ms"]
    assert latency.measured and latency.holds and latency.value <= BUDGET_MS, latency

    # Brute force on the validation probabilities: no feasible subset is more accurate.
    infos = {m: member_info(data.manager.resolve(m)) for m in VARIANTS}
    probs, labels = _aligned_validation(list(infos.values()))
    weights = {m: i.validation_accuracy for m, i in infos.items()}
    p99 = {m: tracker._member_p99(m, infos[m]) for m in VARIANTS}
    device = {m: infos[m].device for m in VARIANTS}
    feasible = [s for s in subsets(VARIANTS) if predicted_latency(s, p99, device) <= BUDGET_MS / 1000]
    assert feasible and all(slow not in s for s in feasible)
    best = max(replay_accuracy("confidence", probs, labels, s, weights) for s in feasible)
    chosen = replay_accuracy("confidence", probs, labels, tracker.selected.members, weights)
    assert chosen == best
    await data.manager.stop()


async def test_per_request_budget_served_by_the_fastest_member_alone_or_refused(scratch_repo, test_split):
    x, _ = test_split
    members = ["digits_mlp_a", "digits_cnn_a", "digits_logreg"]
    data = await _plane(_repo(scratch_repo, members, None))
    _slow(data, "digits_mlp_a", 1.0)
    _slow(data, "digits_cnn_a", 1.0)
    _slow(data, "digits_logreg", 0.2)  # the fastest, by a margin no load can erase
    # without an objective all members vote: measures all three
    results = await asyncio.gather(*(data.infer("slo", x[i:i + 1]) for i in range(30)))
    assert all(len(result.vote.members) == 3 for result in results)
    await data.evaluate_objectives()

    result = await data.infer("slo", x[:1], deadline=time.monotonic() + 0.5)
    assert result.vote.members == ("digits_logreg",)
    assert not result.left_out
    # An explicit budget no subset is predicted to meet (0.1 s after the 5 ms safety
    # margin; the fastest takes 0.2 s) is refused up front...
    with pytest.raises(FailedPrecondition, match="latency budget"):
        await data.infer("slo", x[:1], latency_budget_s=0.105)
    # ...a plain RPC deadline is tried: the members are asked and the cutoff decides.
    with pytest.raises(DeadlineExceeded, match="deadline reached"):
        await data.infer("slo", x[:1], deadline=time.monotonic() + 0.105)
    with pytest.raises(FailedPrecondition, match="min_accuracy 0.9990"):
        await data.infer("slo", x[:1], min_accuracy=0.999)
    await data.manager.stop()


def _degrade(folder: Path) -> None:
    """Shift the final layer's outputs by one class: confidently wrong, same manifest."""
    model = onnx.load(folder / "model.onnx")
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.shape and array.shape[-1] == 10:
            tensor.CopyFrom(numpy_helper.from_array(np.roll(array, 1, axis=-1), tensor.name))
    onnx.save(model, folder / "model.onnx")


def _publish(repo: Path, member: str, version: int, degraded: bool) -> None:
    staged = copy_variant(member, repo / ".staging", version=version)
    if degraded:
        _degrade(staged)
    os.rename(staged, repo / member / str(version))


async def _traffic_with_feedback(data: DataPlane, x: np.ndarray, y: np.ndarray, tag: str) -> None:
    for start in range(0, len(x), 8):
        result = await data.infer("slo", x[start:start + 8])
        data.feedback.record(f"{tag}-{start}", result)
        for row, label in enumerate(y[start:start + 8]):
            assert data.feedback.add(f"{tag}-{start}", row, str(label), time.time())


async def test_degraded_version_is_dropped_after_feedback_and_returns_when_fixed(scratch_repo, test_split):
    x, y = test_split
    members = ["digits_cnn_a", "digits_mlp_a", "digits_logreg"]
    repo = _repo(scratch_repo, members, "  hysteresis: 0.001\n  explore_fraction: 0.25\n")
    data = await _plane(repo)
    tracker = data.tracker("slo")
    assert "digits_cnn_a" in tracker.selected.members

    _publish(repo, "digits_cnn_a", 2, degraded=True)
    await data.manager.sync()
    assert data.manager.resolve("digits_cnn_a").version == 2
    await _traffic_with_feedback(data, x, y, "bad")
    await asyncio.sleep(0.2)  # let the last shadow calls finish
    await _traffic_with_feedback(data, x, y, "bad-2")
    await data.evaluate_objectives()
    assert "digits_cnn_a" not in tracker.selected.members, tracker.reason
    live, samples = data.feedback.live("slo/digits_cnn_a")
    assert samples >= len(y) // 4 and live < 0.2

    shutil.copytree(repo / "digits_cnn_a" / "1", repo / ".staging" / "good")
    _publish(repo, "digits_cnn_a", 3, degraded=False)
    await data.manager.sync()
    assert data.manager.resolve("digits_cnn_a").version == 3
    await _traffic_with_feedback(data, x, y, "good")
    await asyncio.sleep(0.2)
    await _traffic_with_feedback(data, x, y, "good-2")
    await data.evaluate_objectives()
    assert "digits_cnn_a" in tracker.selected.members, tracker.reason
    await data.manager.stop()


async def test_an_objective_asked_before_the_first_evaluation_is_not_ignored(scratch_repo, test_split):
    x, _ = test_split
    repo = _repo(scratch_repo, ["digits_mlp_a", "digits_logreg"], None)
    manager = ModelManager(Settings(model_repository=repo, poll_interval_s=0, device="cpu"))
    await manager.start()
    data = DataPlane(manager)  # no evaluate_objectives(): the ensemble was never evaluated
    try:
        with pytest.raises(FailedPrecondition, match="min_accuracy 0.9995"):
            await data.infer("slo", x[:1], min_accuracy=0.9995)
        assert data.tracker("slo").selected is not None
    finally:
        await manager.stop()


async def test_without_an_objective_a_member_that_comes_back_votes_before_the_next_evaluation(
        scratch_repo, test_split):
    x, _ = test_split
    members = ["digits_mlp_a", "digits_cnn_a", "digits_logreg"]
    data = await _plane(_repo(scratch_repo, members, None), model_control="explicit",
                        allow_unauthenticated_control=True)
    await data.manager.unload_model("digits_logreg")
    await data.evaluate_objectives()  # the selection now holds the two members serving
    assert data.tracker("slo").selected.members == ("digits_mlp_a", "digits_cnn_a")
    await data.manager.load_model("digits_logreg")
    for deadline in (None, time.monotonic() + 60):
        result = await data.infer("slo", x[:4], deadline=deadline)
        assert result.vote.members == tuple(members) and not result.left_out, deadline
    await data.manager.stop()


async def test_a_member_that_stops_or_starts_serving_is_chosen_anew_by_the_next_request(scratch_repo, test_split):
    x, _ = test_split
    members = ["digits_mlp_a", "digits_cnn_a", "digits_logreg"]
    data = await _plane(_repo(scratch_repo, members, "  latency_p99_ms: 60000\n"), model_control="explicit",
                        allow_unauthenticated_control=True)
    tracker = data.tracker("slo")

    def considered() -> set[str]:
        return {m for c in tracker.candidates for m in c.members}

    assert considered() == set(members)
    await data.manager.unload_model("digits_logreg")
    result = await data.infer("slo", x[:4])  # no background evaluation runs in this test
    assert considered() == {"digits_mlp_a", "digits_cnn_a"} and "digits_logreg" not in result.vote.members
    await data.manager.load_model("digits_logreg")
    await asyncio.gather(*(data.infer("slo", x[i:i + 1]) for i in range(8)))  # one evaluation for all
    assert considered() == set(members)
    assert set(tracker.selected.members) <= set(members)
    await data.manager.stop()
