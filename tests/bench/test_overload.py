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


@pytest.mark.timeout(300)
def test_open_loop_overload_in_two_priority_classes_reports_each_server_and_class(tmp_path):
    """--open: the same open-loop Poisson load (twice each server's capacity, 20 % high
    priority) offered to the floor and to Quorum on both engines, in one run; each server's
    report accounts for every request it was sent, per class and in all."""
    out = tmp_path / "overload_open.json"
    done = subprocess.run([sys.executable, str(BENCH / "overload.py"), "--open", "--servers", "floor,grpcio,native",
                           "--seconds", "1", "--count", "2000", "--capacity-seconds", "1", "--warmup", "0.2",
                           "--deadline-ms", "50", "--model-repository", str(onnx_models()), "--out", str(out)],
                          check=True, capture_output=True, text=True, timeout=290, env=NO_DRAIN_DELAY)
    report = json.loads(out.read_text())
    assert report["load"] == 2.0 and report["high_share"] == 0.2
    assert [r["server"] for r in report["results"]] == ["floor", "grpcio", "native"]
    for result in report["results"]:
        assert result["capacity_rps"] > 0 and 0 < result["sent"] <= 2000
        classes = result["classes"]
        assert classes["high"]["offered"] + classes["low"]["offered"] == classes["all"]["offered"] == result["sent"]
        for name in ("high", "low", "all"):
            c = classes[name]
            assert set(c["codes"]) <= EXPECTED, c["codes"]
            assert sum(c["codes"].values()) == c["offered"]
            assert 0 <= c["in_time"] <= c["codes"].get("OK", 0)
            assert c["goodput_share"] >= 0
            for key in ("refusal_p50_ms", "refusal_p99_ms", "admitted_p99_ms", "in_time_share"):
                assert key in c
        assert result["server"] + ": capacity" in done.stdout
