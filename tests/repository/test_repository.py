"""Loading a repository: version policies, and broken version folders that must not stop
the other models from loading."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from service.errors import ManifestError, ModelNotFound
from service.monitoring.monitor import Monitor
from service.repository.manager import ModelManager
from service.repository.served import State
from service.repository.manifest import load_manifest
from service.settings import Settings
from tests.helpers import ONNX_VARIANT, copy_variant


def _manager(repo: Path) -> ModelManager:
    settings = Settings(model_repository=repo, poll_interval_s=0, device="cpu")
    return ModelManager(settings, Monitor(settings))  # the server's own observer: real metrics


def _load_failures(manager: ModelManager, model: str) -> float | None:
    """quorum_model_load_failures_total for `model`, as /metrics would show it."""
    return manager._observer.registry.get_sample_value("quorum_model_load_failures_total", {"model": model})


def _load(repo: Path) -> ModelManager:
    manager = _manager(repo)
    asyncio.run(manager.start())
    return manager


def _break(folder: Path, how: str) -> None:
    manifest_path = folder / "variant.json"
    manifest = json.loads(manifest_path.read_text())
    if how == "missing manifest":
        manifest_path.unlink()
    elif how == "missing artifact":
        (folder / manifest["artifact"]).unlink()
    elif how == "not json":
        manifest_path.write_text("{ this is not json")
    elif how == "missing field":
        del manifest["calibration"]
        manifest_path.write_text(json.dumps(manifest))
    elif how == "bad field":
        manifest["calibration"]["temperature"] = -1.0
        manifest_path.write_text(json.dumps(manifest))
    elif how == "unknown schema":
        manifest["schema_version"] = 99
        manifest_path.write_text(json.dumps(manifest))
    elif how == "not onnx":
        (folder / manifest["artifact"]).write_bytes(b"definitely not a protobuf" * 10)


@pytest.mark.parametrize("how, names", [
    ("missing manifest", "variant.json"),
    ("missing artifact", "artifact"),
    ("not json", "variant.json"),
    ("missing field", "calibration"),
    ("bad field", "calibration.temperature"),
    ("unknown schema", "schema_version"),
    ("not onnx", "not a loadable ONNX model"),
])
def test_broken_version_is_reported_and_others_load(scratch_repo, how, names):
    copy_variant(ONNX_VARIANT, scratch_repo, as_name="good")
    broken = copy_variant(ONNX_VARIANT, scratch_repo, as_name="broken")
    _break(broken, how)
    manager = _load(scratch_repo)
    assert manager.resolve("good").state == State.AVAILABLE
    [status] = manager.statuses("broken")
    assert status.state == State.END
    assert str(broken) in status.error and names in status.error
    assert _load_failures(manager, "broken") == 1
    asyncio.run(manager.stop())


def test_manifest_errors_name_folder_and_field(scratch_repo):
    folder = copy_variant(ONNX_VARIANT, scratch_repo)
    _break(folder, "bad field")
    with pytest.raises(ManifestError) as info:
        load_manifest(folder)
    assert info.value.field == "calibration.temperature"
    assert str(folder) in str(info.value)


def _versions(repo: Path, versions: list[int], policy: str | None = None) -> None:
    for v in versions:
        copy_variant(ONNX_VARIANT, repo, version=v, as_name="m")
    if policy:
        (repo / "m" / "model.yaml").write_text(policy)


def test_latest_policy_serves_the_newest_version(scratch_repo):
    _versions(scratch_repo, [1, 2, 3])
    manager = _load(scratch_repo)
    assert [s.version for s in manager.statuses("m")] == [3]
    assert manager.resolve("m").version == 3
    with pytest.raises(ModelNotFound, match="no version 1"):
        manager.resolve("m", 1)
    asyncio.run(manager.stop())


@pytest.mark.parametrize("policy, expected", [
    ("version_policy: {all: {}}\n", [1, 2, 3]),
    ("version_policy: {latest: {num_versions: 2}}\n", [2, 3]),
    ("version_policy: {specific: {versions: [1, 3]}}\n", [1, 3]),
])
def test_version_policies(scratch_repo, policy, expected):
    _versions(scratch_repo, [1, 2, 3], policy)
    manager = _load(scratch_repo)
    assert [s.version for s in manager.statuses("m")] == expected
    assert manager.resolve("m").version == max(expected)
    for v in expected:
        assert manager.resolve("m", v).version == v
    asyncio.run(manager.stop())


def test_bad_model_yaml_is_reported(scratch_repo):
    _versions(scratch_repo, [1], "version_policy: {latest: {}, all: {}}\n")
    copy_variant(ONNX_VARIANT, scratch_repo, as_name="good")
    manager = _load(scratch_repo)
    assert manager.resolve("good")
    assert _load_failures(manager, "m") == 1
    asyncio.run(manager.stop())
