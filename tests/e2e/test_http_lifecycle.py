"""The HTTP port through the server's lifecycle: SIGTERM drains it like the gRPC port (every
request accepted before the signal is answered, then the process exits 0), and with
--workers every worker serves it on the one port (SO_REUSEPORT)."""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import requests

from tests.e2e.fixtures import ENSEMBLE
from tests.helpers import onnx_ensemble
from tests.server import running_server

LINGER_S = 5.0  # the scratch ensemble's batcher holds requests this long to fill a batch
BURST = 12


def _metric(port: int, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(w in line for w in wanted))


def _metric_if_up(port: int, name: str, **labels) -> float:
    """The metric, or 0 while that worker's metrics server is not up yet (it starts on its own)."""
    try:
        return _metric(port, name, **labels)
    except (ConnectionError, urllib.error.URLError):
        return 0.0


def _body(row: np.ndarray) -> dict:
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": row.tolist()}]}


def test_sigterm_answers_every_accepted_http_request(tmp_path, test_split):
    repo = onnx_ensemble(tmp_path / "repo", linger_s=LINGER_S, name=ENSEMBLE)
    x = test_split[0]
    with running_server(tmp_path, repo, env={"QUORUM_GRACE_PERIOD": "30"}) as server:
        url = f"{server.http_url}/v2/models/{ENSEMBLE}/infer"
        results: list[int] = []

        def call(i: int) -> None:
            results.append(requests.post(url, json=_body(x[i]), timeout=60).status_code)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(BURST)]
        for t in threads:
            t.start()
        # Signal once every request is inside the server (the in-flight gauge says so).
        while _metric(server.metrics_port, "quorum_inflight_requests", api="kserve_v2_rest") < BURST:
            assert not results, "an answer came before the whole burst was in flight"
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        code = server.process.wait(timeout=60)
        log = server.output()
    assert results == [200] * BURST, log[-3000:]
    assert code == 0, log[-3000:]
    assert log.index("draining") < log.index("stopped")


def test_workers_share_the_http_port(tmp_path, test_split):
    x = test_split[0]
    with running_server(tmp_path, args=["--workers", "2"]) as server:
        answered = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            per_worker = [_metric_if_up(server.metrics_port + i, "quorum_requests_total", api="kserve_v2_rest",
                                        code="OK") for i in (0, 1)]
            if min(per_worker) > 0:
                break
            # A new connection each time: the kernel spreads connections over the workers.
            response = requests.post(f"{server.http_url}/v2/models/{ENSEMBLE}/infer", json=_body(x[answered]),
                                     headers={"Connection": "close"}, timeout=30)
            # A worker still loading its models answers 503 or, for a member it has not loaded yet, 404.
            assert response.status_code in (200, 404, 503), response.text
            answered += response.status_code == 200
        assert min(per_worker) > 0, per_worker
        assert server.stop(signal.SIGTERM, timeout=60) == 0
