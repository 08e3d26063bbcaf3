"""bench/loadgen.py against bench/floor_server.py for about a second: sane JSON, no timings asserted."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _floor(*args: str):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(BENCH / "floor_server.py"), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()  # printed once the server is serving
        assert "floor server on port" in line, line
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def floor_port():
    with _floor() as server:
        yield server


def _loadgen(port: int, pid: int, tmp_path: Path, *load: str, protocol_args: tuple = ()) -> dict:
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, str(BENCH / "loadgen.py"), "--target", f"localhost:{port}",
                    "--duration", "1", "--warmup", "0.2", "--server-pid", str(pid), "--json", str(out),
                    *load, *protocol_args], check=True, capture_output=True, timeout=60)
    return json.loads(out.read_text())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("load", [("--concurrency", "4"), ("--rate", "200")])
def test_loadgen_reports_sane_json(floor_port, tmp_path, load):
    port, pid = floor_port
    r = _loadgen(port, pid, tmp_path, *load)
    assert r["mode"] == ("closed" if load[0] == "--concurrency" else "open")
    assert r["requests"] > 0 and r["errors"] == {}
    assert r["throughput_rps"] > 0 and r["rows_per_s"] == pytest.approx(r["throughput_rps"])
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert r["server_cpu_cores"] is not None and r["server_cpu_cores"] >= 0
    assert r["client_cpu_cores"] >= 0
    assert r["request_bytes"] > 256 and r["response_bytes"] > 0
    assert r["extra"]["check"].startswith("probabilities:FP32[1, 10]")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variant", [("--handler", "wrapped"), ("--grpc-engine", "native"),
                                     ("--grpc-engine", "native", "--handler", "wrapped")],
                         ids=["grpcio-wrapped", "native", "native-wrapped"])
def test_each_floor_variant_answers_as_the_floor_does(tmp_path, variant):
    """The floor taken apart (docs/performance.md): on pygrpc-native, and behind Quorum's own
    handler wrapper; each answers every call with the same precomputed answer."""
    with _floor(*variant) as (port, pid):
        r = _loadgen(port, pid, tmp_path, "--concurrency", "4")
    assert r["requests"] > 0 and r["errors"] == {}
    assert r["extra"]["check"] == "probabilities:FP32[1, 10],label:BYTES[1],class_index:INT64[1],confidence:FP32[1]"


@pytest.fixture(scope="module")
def quorum(tmp_path_factory):
    from tests.server import running_server

    with running_server(tmp_path_factory.mktemp("quorum"), args=["--http-port", "0"]) as server:
        yield server


@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol, check", [
    ("v2", "probabilities:FP32[1, 10]"),
    ("quorum", "1 predictions"),
    ("tfserving", "class_index:[1],confidence:[1],label:[1],logits:[1, 10],probabilities:[1, 10]")])
def test_loadgen_speaks_each_protocol_to_quorum(quorum, tmp_path, protocol, check):
    r = _loadgen(quorum.grpc_port, quorum.process.pid, tmp_path, "--concurrency", "2",
                 protocol_args=("--protocol", protocol, "--model", "digits_mlp_a", "--input-name", "pixels"))
    assert r["protocol"] == protocol and r["requests"] > 0 and r["errors"] == {}
    assert r["extra"]["check"].startswith(check), r["extra"]["check"]
