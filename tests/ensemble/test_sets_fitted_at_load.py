"""Prediction sets are fitted when the manager loads a model and when a member's version
changes, not by the first request that asks for them (service/uncertainties.py `refit`).

Fits are counted by wrapping Uncertainty.fit (it still fits: the count is the observation)."""

from __future__ import annotations

import numpy as np
import pytest

from service.dataplane import DataPlane
from service.ensemble import uncertainty
from service.repository.manager import ModelManager
from service.settings import Settings
from tests.helpers import ONNX_VARIANTS, copy_variant, onnx_ensemble


@pytest.fixture
def fits(monkeypatch) -> list[tuple[str, ...]]:
    """The member sets of every Uncertainty fitted from now on."""
    seen: list[tuple[str, ...]] = []
    fit = uncertainty.Uncertainty.fit

    def counted(policy, probabilities, labels, score="lac", mondrian=False):
        seen.append(tuple(probabilities))
        return fit(policy, probabilities, labels, score, mondrian)

    monkeypatch.setattr(uncertainty.Uncertainty, "fit", staticmethod(counted))
    return seen


async def test_sets_are_fitted_at_load_and_on_a_new_member_version_not_by_requests(scratch_repo, test_split, fits):
    onnx_ensemble(scratch_repo)
    manager = ModelManager(Settings(model_repository=scratch_repo, poll_interval_s=0, device="cpu"))
    data = DataPlane(manager)  # before the first sync, as the server builds them
    await manager.start()
    try:
        assert sorted(fits) == sorted([*((v,) for v in ONNX_VARIANTS), tuple(ONNX_VARIANTS)])
        fits.clear()
        rows = test_split[0][:8].astype(np.float32)
        for model in ("digits", ONNX_VARIANTS[0]):
            asked = data.uncertainties.asked(model, None, 0.9, 0.05, [])
            result = await data.infer(model, rows, asked=asked)
            assert data.uncertainties.answer(result, asked)["prediction_set"].shape == (8, 10)
        assert fits == []  # every request found its sets fitted

        member = ONNX_VARIANTS[1]
        copy_variant(member, scratch_repo, 2)
        await manager.sync()
        assert manager.resolve(member).version == 2
        assert sorted(fits) == sorted([(member,), tuple(ONNX_VARIANTS)])  # refitted in the sync
        fits.clear()
        await manager.sync()  # nothing changed: nothing fitted again
        asked = data.uncertainties.asked("digits", None, 0.9, None, [])
        await data.infer("digits", rows, asked=asked)
        assert fits == []
    finally:
        await manager.stop()
