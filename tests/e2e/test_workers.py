"""Several worker processes on one port: connections spread over them, each answers, and
SIGTERM to the parent drains them all."""

from __future__ import annotations

import re
import signal
import time
import urllib.request

import grpc
import numpy as np

from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from tests.server import running_server, wait_serving

BOTH_ENGINES = True  # the subject is the transport (tests/e2e/conftest.py)


def _requests_served(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("quorum_requests_total{") and 'method="Predict"' in line and 'code="OK"' in line)


def _predict(stub, row: np.ndarray) -> pb.PredictResponse:
    """Both workers have loaded; a connection the kernel hands a worker whose listener is
    still coming up is refused (UNAVAILABLE): retried with backoff, anything else fails."""
    for attempt in range(10):
        try:
            return stub.Predict(pb.PredictRequest(model="digits", inputs=pb.Tensor(
                dtype="FP32", shape=[1, 64], content=row.tobytes())), timeout=30)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            time.sleep(0.05 * 2 ** attempt)
    raise AssertionError("UNAVAILABLE ten times in a row (about 50 s)")


def test_two_workers_share_the_port_and_stop_together(tmp_path, test_split):
    x, y = test_split
    with running_server(tmp_path, args=["--workers", "2"]) as server:
        end = time.monotonic() + 120
        while server.output().count("ensemble digits (") < 2:  # both workers have loaded
            assert time.monotonic() < end, server.output()[-3000:]
            time.sleep(0.1)
        answers = []
        for i in range(24):  # a new connection each time: the kernel spreads them over the workers
            with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                response = _predict(pb_grpc.EnsembleServiceStub(ch), x[i:i + 1])
                answers.append(int(response.predictions[0].label))
        assert np.mean(np.asarray(answers) == y[:24]) > 0.9
        served = [_requests_served(server.metrics_port), _requests_served(server.metrics_port + 1)]
        assert sum(served) == 24 and min(served) > 0, served
        assert server.stop(signal.SIGTERM, timeout=60) == 0
    assert "started 2 workers" in server.output()


def test_the_ports_open_once_every_worker_has_loaded(tmp_path, test_split):
    """Readiness SERVING from one worker while another still loads would send new connections
    to the loading one (the kernel spreads them over every listener on the port): the workers
    listen only after all have loaded, so every connection after readiness reaches a ready one."""
    x, y = test_split
    with running_server(tmp_path, args=["--workers", "2"], wait=False) as server:
        wait_serving(server, timeout=120)
        for i in range(40):  # a new connection each time, no retry: UNAVAILABLE (loading) fails the test
            with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                response = pb_grpc.EnsembleServiceStub(ch).Predict(pb.PredictRequest(model="digits", inputs=pb.Tensor(
                    dtype="FP32", shape=[1, 64], content=x[i:i + 1].tobytes())), timeout=30)
                assert response.predictions, response
        out = server.output()
        opened = out.index("every worker has loaded: opening the ports")
        loaded = [m.start() for m in re.finditer(r"ensemble digits \(", out)]
        listening = [m.start() for m in re.finditer(r"gRPC on port \d+", out)]
        assert len(loaded) == 2 and max(loaded) < opened, out[-3000:]
        assert len(listening) == 2 and min(listening) > opened, out[-3000:]
        assert server.stop(signal.SIGTERM, timeout=60) == 0
