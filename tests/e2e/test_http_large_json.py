"""A large JSON request does not hold the server: 65,536 digits rows as JSON (about 12 MB) on
KServe v2 infer and TF Serving's predict are decoded off the event loop, so gRPC calls sent
meanwhile keep answering within a 1 s deadline (the whole decode, on the loop, took 1.1-1.9 s
on a 2-core machine), and so are their large JSON answers (every output of every row: 29 MB for
TF Serving's, 1.2 s to encode on the loop). The answers equal the reference's."""

from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import pytest
import requests

from service._proto.inference import grpc_service_pb2 as pb
from service._proto.inference import grpc_service_pb2_grpc as pb_grpc
from tests.e2e.fixtures import MEMBER, Reference, module_server

ROWS = 65_536
DEADLINE_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory, grpc_engine):
    with module_server(tmp_path_factory, "large-json") as s:
        yield s


@pytest.fixture(scope="module")
def rows(test_split) -> np.ndarray:
    pixels = test_split[0]
    return np.ascontiguousarray(np.tile(pixels, (ROWS // len(pixels) + 1, 1))[:ROWS])


class LiveCalls(threading.Thread):
    """gRPC ServerLive calls back to back, each with a 1 s deadline, until stopped."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address, self.stopping = address, threading.Event()
        self.answered, self.failures, self.slowest_s = 0, [], 0.0

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ServerLive(pb.ServerLiveRequest(), timeout=30)  # connected before the large request
            self.ready = True
            while not self.stopping.is_set():
                start = time.perf_counter()
                try:
                    stub.ServerLive(pb.ServerLiveRequest(), timeout=DEADLINE_S)
                    self.answered += 1
                except grpc.RpcError as exc:
                    self.failures.append(f"{exc.code().name}: {exc.details()}")
                self.slowest_s = max(self.slowest_s, time.perf_counter() - start)


def _json(document) -> bytes:
    """Encoded before the gRPC calls start: encoding here would hold this process's GIL, and
    the calls' thread with it."""
    return json.dumps(document).encode()


def _beside_live_calls(server, send):
    calls = LiveCalls(server.address)
    calls.start()
    while not getattr(calls, "ready", False):
        time.sleep(0.01)
    try:
        answer = send()
    finally:
        calls.stopping.set()
        calls.join(timeout=60)
    print(f"{calls.answered} gRPC calls answered during the request, slowest {calls.slowest_s * 1e3:.0f} ms")
    assert calls.failures == [], calls.failures[:3]
    assert calls.answered > 0
    return answer


def test_a_large_v2_json_request_leaves_grpc_answering(server, rows):
    body = _json({"inputs": [{"name": "pixels", "shape": list(rows.shape), "datatype": "FP32",
                              "data": rows.tolist()}]})
    answer = _beside_live_calls(server, lambda: requests.post(
        f"{server.http_url}/v2/models/{MEMBER}/infer", data=body, timeout=120))
    assert answer.status_code == 200, answer.text[:500]
    outputs = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in answer.json()["outputs"]}
    expected = Reference().outputs(MEMBER, rows)
    np.testing.assert_array_equal(outputs["class_index"], expected["class_index"])
    np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], rtol=1e-5, atol=1e-6)


def test_a_large_tf_rest_predict_leaves_grpc_answering(server, rows):
    body = _json({"inputs": {"pixels": rows.tolist()}})
    answer = _beside_live_calls(server, lambda: requests.post(
        f"{server.http_url}/v1/models/{MEMBER}:predict", data=body, timeout=120))
    assert answer.status_code == 200, answer.text[:500]
    np.testing.assert_array_equal(np.asarray(answer.json()["outputs"]["class_index"]),
                                  Reference().vote(MEMBER, rows).label_index)
