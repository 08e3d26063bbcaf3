"""The manager applies the ensemble contract on load and on hot reload: failures reported
once, a breaking member version refused while the serving one stays, and an ensemble that
is loading answers 'not ready', never 'not found'."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from service.dataplane import DataPlane
from service.errors import ModelNotFound, ModelNotReady
from service.repository.manager import ModelManager
from service.settings import Settings
from tests.helpers import copy_variant

MEMBERS = ["digits_mlp_a", "digits_logreg"]


def _repo(root, members=MEMBERS):
    for name in MEMBERS:
        copy_variant(name, root)
    (root / "pair").mkdir()
    (root / "pair" / "ensemble.yaml").write_text(f"members: [{', '.join(members)}]\n")
    return root


def _relabel(folder, labels):
    manifest = json.loads((folder / "variant.json").read_text())
    manifest["labels"] = labels
    (folder / "variant.json").write_text(json.dumps(manifest))


class Failures:
    def __init__(self):
        self.counts: dict[str, int] = {}

    def on_load_failure(self, model, version):
        self.counts[model] = self.counts.get(model, 0) + 1

    def on_batch(self, *args):
        pass

    def on_compute(self, *args):
        pass


async def test_a_failed_contract_is_logged_and_counted_once_over_many_syncs(scratch_repo, caplog):
    _repo(scratch_repo, ["digits_mlp_a", "digits_relabelled"])  # (one that is gone only degrades it)
    _relabel(copy_variant("digits_logreg", scratch_repo, as_name="digits_relabelled"), [f"c{i}" for i in range(10)])
    failures = Failures()
    manager = ModelManager(Settings(model_repository=scratch_repo, poll_interval_s=0, device="cpu"), failures)
    with caplog.at_level(logging.ERROR):
        await manager.start()
        for _ in range(3):
            await manager.sync()
    try:
        ensemble = manager.ensemble("pair")
        assert ensemble.spec is None and "member 'digits_relabelled' predicts labels that" in ensemble.error
        assert not manager.is_ready("pair")
        assert failures.counts == {"pair": 1}
        assert sum("ensemble pair FAILED" in r.message for r in caplog.records) == 1
        # fixed on disk: the ensemble loads at the next sync
        (scratch_repo / "pair" / "ensemble.yaml").write_text(f"members: [{', '.join(MEMBERS)}]\n")
        await manager.sync()
        assert ensemble.spec is not None and ensemble.error == "" and manager.is_ready("pair")
    finally:
        await manager.stop()


async def test_a_member_version_that_breaks_the_contract_is_refused_and_the_old_one_serves(scratch_repo):
    _repo(scratch_repo)
    manager = ModelManager(Settings(model_repository=scratch_repo, poll_interval_s=0, device="cpu"))
    await manager.start()
    try:
        spec = manager.ensemble("pair").spec
        staged = copy_variant("digits_logreg", scratch_repo / ".staging", version=2)
        _relabel(staged, [f"c{i}" for i in range(10)])
        staged.rename(scratch_repo / "digits_logreg" / "2")
        await manager.sync()
        assert manager.resolve("digits_logreg").version == 1
        assert "refused: it would break ensemble 'pair'" in manager.variants["digits_logreg"].failed[2]
        assert manager.ensemble("pair").spec is spec and manager.is_ready("pair")
        # a new version with the same labels in another order is accepted and aligned
        staged = copy_variant("digits_logreg", scratch_repo / ".staging", version=3)
        _relabel(staged, [str(i) for i in reversed(range(10))])  # (a relabelling, enough for the contract)
        staged.rename(scratch_repo / "digits_logreg" / "3")
        await manager.sync()
        assert manager.resolve("digits_logreg").version == 3
        assert manager.ensemble("pair").spec.permutations["digits_logreg"] == tuple(reversed(range(10)))
    finally:
        await manager.stop()


async def test_while_loading_an_ensemble_and_its_members_are_not_ready_not_unknown(scratch_repo):
    _repo(scratch_repo)
    manager = ModelManager(Settings(model_repository=scratch_repo, poll_interval_s=0, device="cpu"))
    data = DataPlane(manager)
    for name in ("pair", "digits_logreg"):  # before the first scan
        with pytest.raises(ModelNotReady, match="loading"):
            data.info(name)
    with pytest.raises(ModelNotFound):
        data.info("no_such_model")
    start = asyncio.create_task(manager.start())
    while "pair" not in manager.ensembles:  # the scan registers names before any model loads
        await asyncio.sleep(0)
    for name in ("pair", "digits_logreg"):
        with pytest.raises(ModelNotReady):
            data.info(name)
    await start
    assert data.info("pair").labels == tuple(str(i) for i in range(10))
    await manager.stop()


async def test_satisficing_replays_a_permuted_members_validation_in_the_ensembles_order(scratch_repo):
    import numpy as np

    from tests.e2e.contract_models import permuted_member

    members = ["digits_mlp_a", "digits_cnn_a", "digits_logreg"]
    for name in members:
        copy_variant(name, scratch_repo)
    permuted_member("digits_cnn_a", scratch_repo, "digits_cnn_a_permuted", np.random.default_rng(3).permutation(10))
    objective = "objective:\n  latency_p99_ms: 1000\n"
    for ensemble, names in (("aligned", members), ("permuted", ["digits_mlp_a", "digits_cnn_a_permuted",
                                                                 "digits_logreg"])):
        (scratch_repo / ensemble).mkdir()
        (scratch_repo / ensemble / "ensemble.yaml").write_text(f"members: [{', '.join(names)}]\n{objective}")
    manager = ModelManager(Settings(model_repository=scratch_repo, poll_interval_s=0, device="cpu"))
    await manager.start()
    try:
        data = DataPlane(manager)
        await data.evaluate_objectives()
        rename = {"digits_cnn_a_permuted": "digits_cnn_a"}
        replay = {name: {tuple(rename.get(m, m) for m in c.members): c.validation_accuracy
                         for c in data.tracker(name).candidates} for name in ("aligned", "permuted")}
        assert replay["permuted"] == replay["aligned"]
        assert replay["aligned"][tuple(members)] > 0.95
    finally:
        await manager.stop()
