"""What a manager serves is a function of the repository's content: a member version that a
running manager refuses is refused by one started after it arrived, with the same reason; a
member that is gone leaves its ensemble serving without it while its quorum holds."""

from __future__ import annotations

import json
import shutil

from service.repository.manager import ModelManager
from service.settings import Settings
from tests.helpers import copy_variant

MEMBERS = ["digits_mlp_a", "digits_logreg", "digits_cnn_a"]


def _repo(root):
    for name in MEMBERS:
        copy_variant(name, root)
    (root / "trio").mkdir()
    (root / "trio" / "ensemble.yaml").write_text(f"members: [{', '.join(MEMBERS)}]\n")
    return root


def _relabelled(root, name, version):
    """A new version of `name` with another label set, renamed into place."""
    staged = copy_variant(name, root / ".staging", version=version)
    manifest = json.loads((staged / "variant.json").read_text())
    manifest["labels"] = [f"c{i}" for i in range(10)]
    (staged / "variant.json").write_text(json.dumps(manifest))
    (root / name).mkdir(exist_ok=True)
    return staged.rename(root / name / str(version))


def _without_manifest(root, name, version):
    staged = copy_variant(name, root / ".staging", version=version)
    (staged / "variant.json").unlink()
    return staged.rename(root / name / str(version))


def _manager(root) -> ModelManager:
    return ModelManager(Settings(model_repository=root, poll_interval_s=0, device="cpu"))


def _served(manager: ModelManager) -> dict:
    return {name: (sorted(m.versions), dict(sorted(m.failed.items()))) for name, m in sorted(manager.variants.items())}


async def _both(root, change) -> tuple[dict, dict]:
    """What a manager that ran before `change` serves after it, and what a fresh one does."""
    running = _manager(root)
    await running.start()
    try:
        change(root)
        await running.sync()
        fresh = _manager(root)
        await fresh.start()
        try:
            for m in (running, fresh):
                assert m.is_ready("trio") and m.missing_members("trio") == {}
            return _served(running), _served(fresh)
        finally:
            await fresh.stop()
    finally:
        await running.stop()


async def test_a_version_of_another_label_set_is_refused_by_a_fresh_manager_as_by_a_running_one(scratch_repo):
    running, fresh = await _both(_repo(scratch_repo), lambda root: _relabelled(root, "digits_logreg", 2))
    assert running == fresh
    versions, failed = fresh["digits_logreg"]
    assert versions == [1]
    assert failed[2].startswith("digits_logreg version 2: refused: it would break ensemble 'trio': "
                                "member 'digits_logreg' predicts labels that 'digits_mlp_a' does not")


async def test_the_first_member_refused_is_named_as_on_a_running_manager(scratch_repo):
    running, fresh = await _both(_repo(scratch_repo), lambda root: _relabelled(root, "digits_mlp_a", 2))
    assert running == fresh and fresh["digits_mlp_a"][0] == [1]
    assert "refused: it would break ensemble 'trio'" in fresh["digits_mlp_a"][1][2]


async def test_a_version_without_its_manifest_falls_back_to_the_one_before(scratch_repo):
    running, fresh = await _both(_repo(scratch_repo), lambda root: _without_manifest(root, "digits_cnn_a", 2))
    assert running == fresh
    versions, failed = fresh["digits_cnn_a"]
    assert versions == [1] and "variant.json" in failed[2]


async def test_two_members_with_a_new_label_set_are_both_refused(scratch_repo):
    def change(root):
        _relabelled(root, "digits_mlp_a", 2)
        _relabelled(root, "digits_cnn_a", 2)
    running, fresh = await _both(_repo(scratch_repo), change)
    assert running == fresh
    assert fresh["digits_mlp_a"][0] == fresh["digits_cnn_a"][0] == [1]


async def test_a_member_folder_gone_degrades_its_ensemble_and_its_return_restores_it(scratch_repo, tmp_path):
    root = _repo(scratch_repo)
    manager = _manager(root)
    await manager.start()
    try:
        spec = manager.ensemble("trio").spec
        shutil.move(root / "digits_logreg", tmp_path / "digits_logreg")
        await manager.sync()
        assert manager.is_ready("trio")  # 2 of 3: its majority quorum
        assert manager.missing_members("trio") == {"digits_logreg": "it is not in the repository"}
        assert manager.ensemble("trio").spec.labels == spec.labels
        fresh = _manager(root)  # a server started now serves it degraded too
        await fresh.start()
        try:
            assert fresh.is_ready("trio") and fresh.missing_members("trio") == manager.missing_members("trio")
        finally:
            await fresh.stop()
        shutil.move(root / "digits_mlp_a", tmp_path / "digits_mlp_a")
        await manager.sync()
        assert not manager.is_ready("trio")
        problem = manager.ensemble_problem("trio")
        assert problem == ("1 of its 3 members serve, fewer than its quorum 2; member 'digits_mlp_a': it is not "
                           "in the repository; member 'digits_logreg': it is not in the repository")
        for name in ("digits_logreg", "digits_mlp_a"):
            shutil.move(tmp_path / name, root / name)
        await manager.sync()
        assert manager.is_ready("trio") and manager.missing_members("trio") == {}
        assert manager.ensemble("trio").spec.labels == spec.labels
    finally:
        await manager.stop()


async def test_validate_reports_what_a_fresh_manager_refuses_and_serves(scratch_repo, tmp_path):
    from service.export.repository_check import check_repository

    root = _repo(scratch_repo)
    _relabelled(root, "digits_mlp_a", 2)
    _without_manifest(root, "digits_cnn_a", 2)
    running, fresh = await _both(root, lambda root: None)
    reports = {r.name: r for r in check_repository(root)}
    for name in ("digits_mlp_a", "digits_cnn_a"):
        versions, failed = fresh[name]
        assert reports[name].served[0].startswith(f"version {versions[-1]} ")
        assert reports[name].refused == [failed[2]]
    assert reports["trio"].refused == [] and reports["trio"].degraded == []
    shutil.move(root / "digits_logreg", tmp_path / "digits_logreg")
    trio = {r.name: r for r in check_repository(root)}["trio"]
    assert trio.served and trio.degraded == ["member 'digits_logreg' has no loadable version "
                                             "(it is not in the repository)"]


async def test_a_member_back_with_another_label_set_is_refused_by_a_fresh_manager_as_by_a_running_one(
        scratch_repo, tmp_path):
    root = _repo(scratch_repo)
    running = _manager(root)
    await running.start()
    try:
        shutil.move(root / "digits_logreg", tmp_path / "digits_logreg")
        await running.sync()
        _relabelled(root, "digits_logreg", 1)  # back, as another model
        await running.sync()
        fresh = _manager(root)
        await fresh.start()
        try:
            assert _served(running) == _served(fresh)
            for m in (running, fresh):
                assert m.is_ready("trio") and list(m.missing_members("trio")) == ["digits_logreg"]
            [(version, error)] = fresh.variants["digits_logreg"].failed.items()
            assert version == 1 and "refused: it would break ensemble 'trio'" in error
        finally:
            await fresh.stop()
    finally:
        await running.stop()


async def test_a_member_that_fails_to_load_degrades_its_ensemble(scratch_repo):
    root = _repo(scratch_repo)
    (root / "digits_cnn_a" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    manager = _manager(root)
    await manager.start()
    try:
        assert manager.is_ready("trio")
        [(member, why)] = manager.missing_members("trio").items()
        assert member == "digits_cnn_a" and why.startswith("version 1 failed to load (")
    finally:
        await manager.stop()
