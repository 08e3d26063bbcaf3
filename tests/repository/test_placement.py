"""Per-variant device placement and threading settings, as the manager applies them."""

from __future__ import annotations

import asyncio

from service.repository.manager import ModelManager
from service.settings import Settings
from tests.helpers import ONNX_VARIANT, copy_variant


def test_per_variant_device_overrides(scratch_repo):
    for name in ("by_setting", "by_model_yaml", "asks_gpu"):
        copy_variant(ONNX_VARIANT, scratch_repo, as_name=name)
    (scratch_repo / "by_model_yaml" / "model.yaml").write_text("device: cpu\n")
    settings = Settings(model_repository=scratch_repo, poll_interval_s=0, device="gpu",
                        device_overrides={"by_setting": "cpu"}, intra_op_threads=1)
    manager = ModelManager(settings)
    asyncio.run(manager.start())
    assert manager.resolve("by_setting").device == "cpu"
    assert manager.resolve("by_model_yaml").device == "cpu"
    # No GPU on this machine: asking for one fails loudly instead of degrading silently.
    [status] = manager.statuses("asks_gpu")
    assert "no GPU is visible" in status.error
    options = manager.resolve("by_setting").runtime._session.get_session_options()
    assert options.intra_op_num_threads == 1
    asyncio.run(manager.stop())
