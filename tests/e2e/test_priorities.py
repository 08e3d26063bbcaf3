"""Priority levels on a real server with stock clients (tritonclient's `priority=`): under a
burst above what the ensemble's queue holds, the low class is refused first and the high class
still admitted, every admitted request answered; a priority out of range, negative or not an
integer is refused with INVALID_ARGUMENT (HTTP 400) naming it and the range, before any
inference, on every protocol that carries one.

No timing is relied on: the ensemble's batches wait (60 s) for 8 rows, so the first request's
batch holds the ensemble while the burst queues behind it, and the test lets it go by sending
each member the 7 rows that complete it; every step waits for a state (a refusal, a queue depth)."""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from tritonclient.utils import InferenceServerException

from service._proto.quorum.v1 import ensemble_pb2 as qpb, ensemble_pb2_grpc as qgrpc
from tests.e2e.fixtures import ENSEMBLE, module_server
from tests.e2e.test_shared_feedback import metric
from tests.helpers import ONNX_VARIANTS, onnx_ensemble, wait_until


@pytest.fixture(scope="module")
def server(tmp_path_factory, grpc_engine):
    root = onnx_ensemble(tmp_path_factory.mktemp("priorities") / "models", name=ENSEMBLE)
    (root / ENSEMBLE / "ensemble.yaml").write_text(yaml.safe_dump({
        "members": list(ONNX_VARIANTS), "policy": "confidence",
        "batching": {"max_batch_size": 64, "max_queue_delay_us": 60_000_000, "preferred_batch_sizes": [8],
                     "max_queue_size": 8},
        "priority_levels": 2, "priority_reserve": 0.5}))
    with module_server(tmp_path_factory, "priorities", repository=root) as s:
        yield s


def rows(n: int) -> np.ndarray:
    return np.full((n, 64), 5.0, dtype=np.float32)


def send(client: grpcclient.InferenceServerClient, model: str, n: int, priority: int, answers: queue.Queue) -> None:
    tensor = grpcclient.InferInput("pixels", [n, 64], "FP32")
    tensor.set_data_from_numpy(rows(n))
    client.async_infer(model, [tensor], lambda result, error: answers.put((priority, result, error)),
                       priority=priority)


def take(answers: queue.Queue, count: int) -> list:
    return [answers.get(timeout=60) for _ in range(count)]


def test_under_a_burst_the_low_class_is_refused_first_and_every_admitted_request_answered(server):
    client = grpcclient.InferenceServerClient(server.address)
    depth = lambda: metric(server, "quorum_queue_depth", model=ENSEMBLE)  # noqa: E731
    answered: queue.Queue = queue.Queue()
    send(client, ENSEMBLE, 1, 2, answered)  # its batch holds the ensemble, waiting at the members for 8 rows
    wait_until(lambda: all(metric(server, "quorum_queue_depth", model=m) for m in ONNX_VARIANTS),
               "the first batch waiting at the members")
    refused: queue.Queue = queue.Queue()
    outcomes: queue.Queue = queue.Queue()
    for _ in range(6):
        send(client, ENSEMBLE, 1, 2, outcomes)
    wait_until(lambda: depth() == 4 and outcomes.qsize() == 2, "4 low requests queued and 2 refused")
    low_refusals = take(outcomes, 2)
    for _ in range(4):
        send(client, ENSEMBLE, 1, 1, outcomes)  # the high class still finds room: the reserve
    wait_until(lambda: depth() == 8, "4 high requests queued too")
    assert outcomes.empty()
    send(client, ENSEMBLE, 1, 2, refused)
    send(client, ENSEMBLE, 1, 1, refused)
    full = take(refused, 2)
    for priority, result, error in low_refusals + [f for f in full if f[0] == 2]:
        assert result is None and error.status() == "StatusCode.RESOURCE_EXHAUSTED", error
        assert "places open to priority 2 of 2" in error.message()
    (_, _, high_error), = [f for f in full if f[0] == 1]
    assert high_error.status() == "StatusCode.RESOURCE_EXHAUSTED" and "queue full (8 requests waiting)" in high_error.message()

    fillers: queue.Queue = queue.Queue()
    for member in ONNX_VARIANTS:  # completes the first batch's 8 rows at each member: it goes
        send(client, member, 7, 0, fillers)
    for priority, result, error in take(answered, 1) + take(outcomes, 8) + take(fillers, 3):
        assert error is None, error  # every admitted request is answered
        assert result.as_numpy("label").shape[0] in (1, 7)
    assert depth() == 0
    client.close()


def _v2_http(server, parameters: dict) -> tuple[int, str]:
    body = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [5.0] * 64}],
                       "parameters": parameters}).encode()
    return _post(f"{server.http_url}/v2/models/{ENSEMBLE}/infer", body, {"Content-Type": "application/json"})


def _post(url: str, body: bytes, headers: dict) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_priority_out_of_range_negative_or_not_an_integer_is_refused_before_any_inference(server):
    batches = lambda: sum(metric(server, "quorum_batch_size_rows_count", model=f"{m}:1")  # noqa: E731
                          + metric(server, "quorum_batch_size_rows_count", model=m) for m in ONNX_VARIANTS)
    client = grpcclient.InferenceServerClient(server.address)
    whole = grpcclient.InferInput("pixels", [8, 64], "FP32")
    whole.set_data_from_numpy(rows(8))  # a batch the members need not wait to fill
    assert client.infer(ENSEMBLE, [whole], priority=1).as_numpy("label").shape == (8,)
    before = batches()
    assert before > 0  # the count is read
    tensor = grpcclient.InferInput("pixels", [1, 64], "FP32")
    tensor.set_data_from_numpy(rows(1))
    with pytest.raises(InferenceServerException) as refused:
        client.infer(ENSEMBLE, [tensor], priority=3)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "priority 3 is out of range" in refused.value.message() and "to 2" in refused.value.message()
    client.close()
    for value, shown in ((-1, "priority -1"), (1.5, "priority 1.5"), ("high", "priority 'high'"), (3, "priority 3")):
        status, text = _v2_http(server, {"priority": value})
        assert status == 400 and shown in text and "from 1 (the highest) to 2" in text, (value, status, text)
    tf_body = json.dumps({"instances": [[5.0] * 64]}).encode()
    for header in ("9", "-1", "x"):
        status, text = _post(f"{server.http_url}/v1/models/{ENSEMBLE}:predict", tf_body,
                             {"Content-Type": "application/json", "Quorum-Priority": header})
        assert status == 400 and "out of range" in text, (header, status, text)
    with grpc.insecure_channel(server.address) as channel:
        stub = qgrpc.EnsembleServiceStub(channel)
        with pytest.raises(grpc.RpcError) as bad:
            stub.Predict(qpb.PredictRequest(model=ENSEMBLE, priority=-2, inputs=qpb.Tensor(
                dtype="FP32", shape=[1, 64], content=rows(1).tobytes())), timeout=30)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority -2" in bad.value.details()
    assert batches() == before  # nothing reached a member
    eight = json.dumps({"instances": [[5.0] * 64] * 8}).encode()  # a whole batch: the members need not wait
    status, text = _post(f"{server.http_url}/v1/models/{ENSEMBLE}:predict", eight,
                         {"Content-Type": "application/json", "Quorum-Priority": "1"})
    assert status == 200 and len(json.loads(text)["predictions"]) == 8, text
