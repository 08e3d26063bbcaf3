"""Per-variant device placement and threading settings, as the manager applies them."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.repository.manager import ModelManager
from service.runtimes.devices import gpu_count, place
from service.settings import Settings
from tests.helpers import ONNX_VARIANT, ONNX_VARIANTS, copy_variant, onnx_ensemble


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
    if gpu_count() == 0:  # no GPU here: asking for one fails loudly instead of degrading silently
        [status] = manager.statuses("asks_gpu")
        assert "no GPU is visible" in status.error
    else:  # a GPU host (the `gpu` extra): it lands on the first GPU and serves
        assert manager.resolve("asks_gpu").device == "gpu:0"
    options = manager.resolve("by_setting").runtime._session.get_session_options()
    assert options.intra_op_num_threads == 1
    asyncio.run(manager.stop())


@pytest.mark.parametrize("spec, slot, gpus, device", [
    ("cpu", 0, 2, "cpu"), ("auto", 0, 0, "cpu"), ("auto", 3, 2, "gpu:1"), ("gpu", 2, 2, "gpu:0"),
    ("gpu:1", 0, 2, "gpu:1"), ("GPU:0", 5, 1, "gpu:0")])
def test_placement_on_hosts_with_and_without_gpus(spec, slot, gpus, device):
    assert place(spec, slot, gpus=gpus) == device


@pytest.mark.parametrize("spec, gpus, message", [
    ("gpu", 0, "no GPU is visible"), ("gpu:0", 0, "no GPU is visible"), ("gpu:2", 2, "only 2 GPU(s) are visible"),
    ("tpu", 1, "device must be auto, cpu, gpu or gpu:N"), ("cpu:1", 1, "device must be")])
def test_placement_that_cannot_be_met_fails_loudly(spec, gpus, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        place(spec, 0, gpus=gpus)


async def test_compute_threads_share_one_thread_between_models_with_the_same_answers(scratch_repo, test_split):
    """compute_threads=1: every member's batches run on one shared thread, and the answers
    are the ones each member's own thread gives (strict mode: bitwise)."""
    from service.dataplane import DataPlane

    x, _ = test_split
    onnx_ensemble(scratch_repo)
    answers = {}
    for threads in (0, 1):
        manager = ModelManager(Settings(model_repository=scratch_repo, poll_interval_s=0, device="cpu",
                                        batch_invariance="strict", compute_threads=threads))
        await manager.start()
        data = DataPlane(manager)
        results = await asyncio.gather(*(data.infer("digits", x[i:i + 3]) for i in range(0, 60, 3)))
        answers[threads] = np.concatenate([r.vote.probabilities for r in results])
        shared = [t for t in threading.enumerate() if t.name.startswith("compute-cpu")]
        assert len(shared) == threads  # one thread for the three members, or none
        assert all(r.vote.members == ONNX_VARIANTS for r in results)
        await manager.stop()
    assert np.array_equal(answers[0], answers[1])


@pytest.mark.parametrize("invariance", ["tolerant", "strict"])
async def test_a_lone_request_to_a_fast_model_computes_on_the_event_loop_with_the_same_answers(
        scratch_repo, test_split, invariance):
    """inline_compute_us: a request alone in the batchers is computed on the event loop's
    thread, concurrent ones on the model's own thread; the answers are the same either way
    (bitwise), and with the setting at 0 nothing is computed on the loop."""
    from service.dataplane import DataPlane

    copy_variant(ONNX_VARIANT, scratch_repo)
    x, _ = test_split
    answers, threads = {}, {}
    for inline_us in (0.0, 1e9):  # never; whenever alone, however slow the model
        manager = ModelManager(Settings(model_repository=scratch_repo, poll_interval_s=0, device="cpu",
                                        batch_invariance=invariance, inline_compute_us=inline_us))
        await manager.start()
        runtime = manager.resolve(ONNX_VARIANT).runtime
        ran_on: list[str] = []
        compute = runtime.predict_sync

        def recording(rows, compute=compute, ran_on=ran_on):  # notes the thread, computes as before
            ran_on.append(threading.current_thread().name)
            return compute(rows)

        runtime.predict_sync = recording
        data = DataPlane(manager)
        alone = [await data.infer(ONNX_VARIANT, x[i:i + 1]) for i in range(20)]
        lone_threads = set(ran_on)
        ran_on.clear()
        together = await asyncio.gather(*(data.infer(ONNX_VARIANT, x[i:i + 1]) for i in range(20, 60)))
        answers[inline_us] = np.concatenate([r.vote.probabilities for r in alone + list(together)])
        threads[inline_us] = (lone_threads, list(ran_on))
        await manager.stop()
    loop_thread = threading.current_thread().name
    model_thread = f"rt-{ONNX_VARIANT}_0"
    assert threads[0.0][0] == set(threads[0.0][1]) == {model_thread}
    assert threads[1e9][0] == {loop_thread}
    # 40 requests at once: the first found the server idle; the batches of the others
    # queued behind it are computed on the model's thread
    burst = threads[1e9][1]
    assert burst.count(loop_thread) <= 1 and burst[1:] and set(burst[1:]) == {model_thread}, burst
    assert np.array_equal(answers[0.0], answers[1e9])
