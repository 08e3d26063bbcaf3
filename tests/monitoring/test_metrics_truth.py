"""What /metrics says on a real server: counters docs/metrics.md says start at 0 are in the
first scrape, a call the client cancels is counted CANCELLED (not OK), and only /metrics answers."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.fixtures import ENSEMBLE, Reference, module_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with module_server(tmp_path_factory, "metrics-truth") as s:
        yield s


def _scrape(server, path: str = "/metrics") -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}{path}", timeout=10).read().decode()


def test_first_scrape_has_the_counters_that_start_at_zero(server):
    text = _scrape(server)  # the first scrape of this server
    reference = Reference()
    for model in (*reference.ensemble_config()["members"], ENSEMBLE):
        assert f'quorum_model_load_failures_total{{model="{model}"}} 0.0' in text, model
    for member in reference.ensemble_config()["members"]:
        assert f'quorum_ensemble_members_dropped_total{{ensemble="{ENSEMBLE}",member="{member}"}} 0.0' in text


@pytest.mark.parametrize("path", ["/", "/metricsx", "/favicon.ico", "/metrics/../etc/passwd", "/debug"])
def test_other_paths_are_not_found(server, path):
    with pytest.raises(urllib.error.HTTPError) as err:
        _scrape(server, path)
    assert err.value.code == 404
    assert "quorum_requests_total" not in err.value.read().decode()


def test_a_call_the_client_cancels_is_counted_as_cancelled(server):
    # Health/Watch stays open until the client cancels it: the server is mid-call then.
    with grpc.insecure_channel(server.address) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        stream.cancel()
    pattern = re.compile(r'^quorum_requests_total\{api="(\w+)",code="(\w+)",method="Watch",model=""\} (\S+)$', re.M)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        codes = {code: float(value) for _, code, value in pattern.findall(_scrape(server))}
        if codes:
            break
        time.sleep(0.2)
    assert codes == {"CANCELLED": 1.0}, codes
