"""What /metrics says on a real server: counters docs/metrics.md says start at 0 are in the
first scrape, and only /metrics answers."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

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
    for model in ("digits_mlp_a", "digits_cnn_b", ENSEMBLE):
        assert f'quorum_model_load_failures_total{{model="{model}"}} 0.0' in text, model
    for member in reference.ensemble_config()["members"]:
        assert f'quorum_ensemble_members_dropped_total{{ensemble="{ENSEMBLE}",member="{member}"}} 0.0' in text


@pytest.mark.parametrize("path", ["/", "/metricsx", "/favicon.ico", "/metrics/../etc/passwd", "/debug"])
def test_other_paths_are_not_found(server, path):
    with pytest.raises(urllib.error.HTTPError) as err:
        _scrape(server, path)
    assert err.value.code == 404
    assert "quorum_requests_total" not in err.value.read().decode()
