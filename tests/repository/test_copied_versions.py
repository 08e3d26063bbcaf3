"""A version's number is its folder's name, and a model's name its folder's (TF Serving's
rule): a version folder copied to a new number, or under another model, is served as the
folder says, the manifest's own name and version kept as provenance. `quorum validate`
agrees with the server."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from service.monitoring.monitor import Monitor
from service.repository import loading as loading_module
from service.repository.manager import ModelManager
from service.repository.served import State
from service.repository.manifest import load_version_manifest
from service.settings import Settings
from tests.e2e.fixtures import Reference
from tests.helpers import MODELS, ROOT

MEMBER = "digits_mlp_a"


def _copy(repo: Path, to: str) -> Path:
    """The bundled member's version 1 folder copied as is (manifest untouched) to repo/`to`."""
    shutil.copytree(MODELS / MEMBER / "1", repo / to)
    return repo / to


def test_the_folder_names_the_version_and_the_model(scratch_repo):
    original = _copy(scratch_repo, f"{MEMBER}/1")
    manifest, origin = load_version_manifest(original)
    assert (manifest.name, manifest.version, origin) == (MEMBER, 1, "")

    manifest, origin = load_version_manifest(_copy(scratch_repo, f"{MEMBER}/2"))
    assert (manifest.name, manifest.version) == (MEMBER, 2)
    assert origin == f"{MEMBER} version 1"

    manifest, origin = load_version_manifest(_copy(scratch_repo, "digits_other/7"))
    assert (manifest.name, manifest.version) == ("digits_other", 7)
    assert origin == f"{MEMBER} version 1"
    # everything else is the manifest's own
    bundled, _ = load_version_manifest(MODELS / MEMBER / "1")
    assert manifest.labels == bundled.labels and manifest.calibration == bundled.calibration


def test_a_copied_version_serves_as_its_folder_number(scratch_repo, test_split, caplog):
    _copy(scratch_repo, f"{MEMBER}/1")
    _copy(scratch_repo, f"{MEMBER}/2")
    (scratch_repo / MEMBER / "model.yaml").write_text("version_policy: {all: {}}\n")
    pixels = test_split[0][:16].astype(np.float32)
    expected = Reference(repository=MODELS).member(MEMBER).logits(pixels)
    settings = Settings(model_repository=scratch_repo, poll_interval_s=0, device="cpu")

    async def run() -> dict[int, tuple]:
        manager = ModelManager(settings, Monitor(settings))
        await manager.start()
        try:
            answers = {}
            for version in (1, 2):
                served = manager.resolve(MEMBER, version)
                rows = pixels.reshape((len(pixels), *served.manifest.input.shape[1:]))
                answers[version] = (served.version, served.copied_from, await served.infer(rows))
            answers[0] = (manager.resolve(MEMBER).version, "", None)
            return answers
        finally:
            await manager.stop()

    with caplog.at_level(logging.INFO, logger="service.repository.manager"):
        answers = asyncio.run(run())
    assert answers[1][:2] == (1, "")
    assert answers[2][:2] == (2, f"{MEMBER} version 1")
    assert answers[0][0] == 2  # the newest: the copy
    for version in (1, 2):
        np.testing.assert_allclose(answers[version][2], expected, rtol=1e-5, atol=1e-5)
    lines = [r.getMessage() for r in caplog.records if "is a copy of" in r.getMessage()]
    assert lines == [f"{MEMBER}/2 is a copy of {MEMBER} version 1 (its variant.json says so): "
                     f"served as {MEMBER} version 2"]


def test_a_version_read_while_still_being_copied_is_retried(scratch_repo, monkeypatch):
    """`cp -r` is not atomic: a poll may read the new folder before its last file is written.
    That load fails, and the folder as it was when read differs from the finished copy, so the
    next poll loads it again."""
    _copy(scratch_repo, f"{MEMBER}/1")
    target = scratch_repo / MEMBER / "2"
    target.mkdir()
    shutil.copy2(MODELS / MEMBER / "1" / "variant.json", target)  # the checkpoint is not there yet
    read = loading_module.load_version_manifest

    def read_while_the_copy_finishes(folder: Path):
        try:
            return read(folder)
        finally:
            if folder == target and not (target / "model.onnx").exists():
                shutil.copy2(MODELS / MEMBER / "1" / "model.onnx", target)  # the copy ends meanwhile

    monkeypatch.setattr(loading_module, "load_version_manifest", read_while_the_copy_finishes)
    settings = Settings(model_repository=scratch_repo, poll_interval_s=0, device="cpu")

    async def run() -> tuple[list, list]:
        manager = ModelManager(settings, Monitor(settings))
        await manager.start()
        try:
            first = [(s.version, s.state) for s in manager.statuses(MEMBER)]
            await manager.sync()  # the next poll
            return first, [(s.version, s.state) for s in manager.statuses(MEMBER)]
        finally:
            await manager.stop()

    first, then = asyncio.run(run())
    assert first == [(1, State.AVAILABLE), (2, State.END)]  # read half-copied: failed; version 1 serves meanwhile
    assert then == [(2, State.AVAILABLE)]


def _validate(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", "validate", str(repo)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_validate_serves_a_copied_version_and_notes_it(scratch_repo):
    _copy(scratch_repo, f"{MEMBER}/1")
    _copy(scratch_repo, f"{MEMBER}/2")
    _copy(scratch_repo, "digits_renamed/1")
    done = _validate(scratch_repo)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"ok       {MEMBER} (variant): version 2 (onnx" in out, out
    assert f"note: {MEMBER}/2 is a copy of {MEMBER} version 1: served as {MEMBER} version 2" in out, out
    assert "ok       digits_renamed (variant): version 1 (onnx" in out, out
    assert f"note: digits_renamed/1 is a copy of {MEMBER} version 1: served as digits_renamed version 1" in out
    assert "refused" not in out and "but the folder is" not in out
    assert "2 models, 0 with something the server would refuse" in out


def test_validate_still_checks_a_copy(scratch_repo):
    """A copy is checked as any version is: its checkpoint broken, it is refused (and version 1
    serves, as on the server)."""
    _copy(scratch_repo, f"{MEMBER}/1")
    copy = _copy(scratch_repo, f"{MEMBER}/2")
    (copy / "model.onnx").write_bytes(b"not onnx")
    done = _validate(scratch_repo)
    assert done.returncode == 1
    assert f"partly   {MEMBER} (variant): version 1 " in done.stdout, done.stdout
    assert "'model.onnx' fails onnx.checker" in done.stdout and "is a copy of" not in done.stdout
