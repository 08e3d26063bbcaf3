"""bench/overload.py, briefly: on both engines it measures a capacity, drives more clients
than that with short deadlines, and accounts for every request it sent (no goodput or
timing asserted: figures are in docs/performance.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import onnx_models

BENCH = Path(__file__).resolve().parents[2] / "bench"
EXPECTED = {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED"}
NO_DRAIN_DELAY = {**os.environ, "QUORUM_DRAIN_DELAY": "0"}  # the server it starts exits at once when done


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", ["grpcio", "native"])
def test_overload_bench_accounts_for_every_request(tmp_path, engine):
    out = tmp_path / "overload.json"
    subprocess.run([sys.executable, str(BENCH / "overload.py"), "--clients", "16", "--seconds", "1",
                    "--capacity-seconds", "1", "--warmup", "0.2", "--deadline-ms", "200", "--backoff-ms", "20",
                    "--grpc-engine", engine, "--model-repository", str(onnx_models()), "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=290, env=NO_DRAIN_DELAY)
    report = json.loads(out.read_text())
    assert report["grpc_engine"] == engine and report["backoff_ms"] == 20
    assert report["capacity_rps"] > 0 and report["requests"] > 0
    assert set(report["codes"]) <= EXPECTED, report["codes"]
    assert sum(report["codes"].values()) == report["requests"]
    assert 0 <= report["in_time"] <= report["codes"].get("OK", 0)  # goodput: answers within their deadline


@pytest.mark.timeout(300)
def test_overload_bench_runs_the_same_load_against_the_floor(tmp_path):
    """--server floor: the reference, the bare grpc.aio server (it has no admission control,
    so it never refuses)."""
    out = tmp_path / "overload.json"
    subprocess.run([sys.executable, str(BENCH / "overload.py"), "--server", "floor", "--clients", "16",
                    "--seconds", "1", "--capacity-seconds", "1", "--warmup", "0.2", "--deadline-ms", "200", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=290)
    report = json.loads(out.read_text())
    assert report["server"] == "floor" and report["grpc_engine"] is None
    assert report["capacity_rps"] > 0 and sum(report["codes"].values()) == report["requests"] > 0
    assert set(report["codes"]) <= EXPECTED - {"RESOURCE_EXHAUSTED"}, report["codes"]


def test_the_floor_has_no_engine_to_choose():
    done = subprocess.run([sys.executable, str(BENCH / "overload.py"), "--server", "floor", "--grpc-engine", "native"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--grpc-engine is Quorum's" in done.stderr
