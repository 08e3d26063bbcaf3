"""Deadlines are tried, not refused: a plain RPC deadline below every subset's predicted
latency is still answered when the members can answer in time; only an explicit latency
budget or accuracy floor that no subset meets is refused. And a constraint's value before
enough samples is what was measured, not the bare warm-up compute."""

from __future__ import annotations

import numpy as np
import pytest

from service.dataplane import DataPlane
from service.satisficing import member_info
from service.errors import FailedPrecondition
from service.objectives.tracker import ObjectiveTracker
from service.repository.config import Objective
from service.repository.manager import ModelManager
from service.settings import Settings
from tests.helpers import copy_variant

MEMBERS = ["digits_mlp_a", "digits_cnn_a", "digits_logreg"]


async def _plane(root, objective: str = "") -> DataPlane:
    for name in MEMBERS:
        copy_variant(name, root)
    (root / "slo").mkdir()
    (root / "slo" / "ensemble.yaml").write_text(f"members: [{', '.join(MEMBERS)}]\npolicy: confidence\n{objective}")
    manager = ModelManager(Settings(model_repository=root, poll_interval_s=0, device="cpu"))
    await manager.start()
    return DataPlane(manager)


@pytest.mark.parametrize("objective", ["", "objective:\n  latency_p99_ms: 20\n"])
async def test_deadline_below_every_subsets_predicted_latency_is_tried_and_answered(scratch_repo, test_split,
                                                                                   objective):
    x, _ = test_split
    data = await _plane(scratch_repo, objective)
    tracker = data.tracker("slo")
    for _ in range(tracker.objective.min_latency_samples + 5):  # every member measured at 5 s
        tracker.observe({m: 5.0 for m in MEMBERS}, 5.0)
    await data.evaluate_objectives()
    assert min(c.latency_s for c in tracker.candidates) >= 5.0
    # A 2 s RPC deadline is below every subset's predicted p99, and generous for the members
    # (on the data plane's clock, the one it compares deadlines with).
    result = await data.infer("slo", x[:4], deadline=data.clock() + 2.0)
    assert result.vote.label_index.shape == (4,)
    assert set(result.vote.members) == set(tracker.choose()) and not result.left_out
    # The same 2 s as the client's explicit budget is an objective no subset meets.
    with pytest.raises(FailedPrecondition, match="latency budget 1995.0 ms is below the fastest subset"):
        await data.infer("slo", x[:4], latency_budget_s=2.0)
    with pytest.raises(FailedPrecondition, match="min_accuracy 0.9990"):
        await data.infer("slo", x[:4], deadline=data.clock() + 2.0, min_accuracy=0.999)
    await data.manager.stop()


async def test_constraint_before_enough_samples_reads_the_measured_latency(scratch_repo):
    data = await _plane(scratch_repo)
    infos = {m: member_info(data.manager.resolve(m)) for m in MEMBERS}
    await data.manager.stop()
    objective = Objective(latency_p99_ms=20, min_latency_samples=20)
    tracker = ObjectiveTracker("slo", MEMBERS, objective, "confidence")
    # warm-up compute of one row is microseconds; requests through the batcher take ms
    infos = {m: type(i)(**{**i.__dict__, "warmup_latency_s": 10.5e-6}) for m, i in infos.items()}
    for _ in range(5):  # fewer than min_latency_samples
        tracker.observe({m: 1.33e-3 for m in MEMBERS}, 1.5e-3)
    tracker.evaluate(infos, [], {})
    [latency] = [c for c in tracker.constraints if c.name == "latency_p99_ms"]
    assert not latency.measured
    assert latency.value >= 1.33, latency  # not 0.0105 ms
    assert all(c.latency_s >= 1.33e-3 for c in tracker.candidates)
    np.testing.assert_allclose([m.latency_p99_ms for m in tracker.member_status], 1.33, rtol=1e-6)
