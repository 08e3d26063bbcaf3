"""Cancellation reaches queued work, on a real server with tritonclient: requests cancelled
while queued at an ensemble whose members are busy never reach a member's batch (counted
through the members' batch sizes), and each is counted CANCELLED once.

No timing is relied on: the members' batches wait (60 s) for 8 rows, so a batch stays queued
at them until the test sends each member the rows that complete it; every step waits for a
state (a queue depth, a counter)."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from tests.e2e.fixtures import ENSEMBLE, module_server
from tests.e2e.test_shared_feedback import metric
from tests.helpers import ONNX_VARIANTS, onnx_ensemble, wait_until


@pytest.fixture(scope="module")
def server(tmp_path_factory, grpc_engine):
    root = onnx_ensemble(tmp_path_factory.mktemp("cancel") / "models", name=ENSEMBLE)
    (root / ENSEMBLE / "ensemble.yaml").write_text(yaml.safe_dump({
        "members": list(ONNX_VARIANTS), "policy": "confidence",
        "batching": {"max_batch_size": 64, "max_queue_delay_us": 60_000_000, "preferred_batch_sizes": [8]}}))
    with module_server(tmp_path_factory, "cancel", repository=root) as s:
        yield s


def send(client, model: str, n: int, answers: queue.Queue, tag: str):
    tensor = grpcclient.InferInput("pixels", [n, 64], "FP32")
    tensor.set_data_from_numpy(np.full((n, 64), 5.0, dtype=np.float32))
    return client.async_infer(model, [tensor], lambda result, error: answers.put((tag, result, error)))


def batches(server, member: str, what: str) -> float:
    return (metric(server, f"quorum_batch_size_rows_{what}", model=f"{member}:1")
            + metric(server, f"quorum_batch_size_rows_{what}", model=member))


def test_requests_cancelled_while_queued_never_reach_a_members_batch_and_count_cancelled_once(server):
    client = grpcclient.InferenceServerClient(server.address)
    depth = lambda model: metric(server, "quorum_queue_depth", model=model)  # noqa: E731
    cancelled = lambda: metric(server, "quorum_requests_total", model=ENSEMBLE, code="CANCELLED")  # noqa: E731
    before = {m: (batches(server, m, "count"), batches(server, m, "sum")) for m in ONNX_VARIANTS}
    answers: queue.Queue = queue.Queue()
    first = send(client, ENSEMBLE, 1, answers, "first")  # its batch waits at the members for 8 rows
    wait_until(lambda: all(depth(m) == 1 for m in ONNX_VARIANTS), "the first batch queued at every member")
    gone = send(client, ENSEMBLE, 1, answers, "gone")
    send(client, ENSEMBLE, 1, answers, "kept")
    wait_until(lambda: depth(ENSEMBLE) == 2, "two requests queued at the ensemble behind it")
    first.cancel()  # its batch leaves the members' queues; the next one (gone + kept) takes its place
    wait_until(lambda: cancelled() == 1 and depth(ENSEMBLE) == 0 and all(depth(m) == 1 for m in ONNX_VARIANTS),
               "the first request cancelled and the next batch queued at every member")
    gone.cancel()  # while its rows wait at the busy members, merged with kept's
    wait_until(lambda: cancelled() == 2, "the second request cancelled")
    for member in ONNX_VARIANTS:  # 6 rows more make the 8 the members wait for: the batch goes
        send(client, member, 6, answers, "filler")
    outcomes = [answers.get(timeout=60) for _ in range(6)]
    by_tag = {}
    for tag, result, error in outcomes:
        by_tag.setdefault(tag, []).append(error)
    assert [e is not None and e.status() == "StatusCode.CANCELLED" for e in by_tag["first"] + by_tag["gone"]] == [True, True]
    assert by_tag["kept"] == [None] and by_tag["filler"] == [None] * 3
    for member in ONNX_VARIANTS:
        count, rows = before[member]
        # one batch, of kept's row and the filler's six: neither cancelled request's row
        assert (batches(server, member, "count") - count, batches(server, member, "sum") - rows) == (1, 7), member
    assert cancelled() == 2  # once each
    client.close()
