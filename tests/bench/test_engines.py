"""bench/engines.py and bench/engine_memory.py, briefly: they run and report what they say; no
timings or sizes asserted (those are measured, in docs/performance.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import onnx_models

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.timeout(400)
def test_engines_bench_reports_each_server(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "engines.py"), "--duration", "0.5", "--warmup", "0.2",
                    "--rounds", "1", "--concurrency", "4", "--variants", "native-uvloop",
                    "--model-repository", str(onnx_models()),
                    "--out", str(tmp_path)], check=True, capture_output=True, timeout=380,
                   env={**os.environ, "QUORUM_DRAIN_DELAY_S": "0"})  # the server it starts exits at once
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {r["server"]: r for r in report["results"]}
    assert set(rows) == {"floor", "quorum-native-uvloop"}
    assert all(r["rps"] > 0 and r["errors"] == 0 for r in rows.values())
    assert rows["floor"]["x_floor"] == 1.0
    assert "quorum-native-uvloop" in (tmp_path / "results.md").read_text()


@pytest.mark.timeout(120)
def test_engine_memory_refuses_the_oversized_request_on_both_engines():
    done = subprocess.run([sys.executable, str(BENCH / "engine_memory.py"), "--mib", "8"],
                          check=True, capture_output=True, text=True, timeout=110)
    rows = [line for line in done.stdout.splitlines() if line.startswith("| grpcio") or line.startswith("| native")]
    assert len(rows) == 4, done.stdout
    assert all("| RESOURCE_EXHAUSTED |" in row for row in rows), done.stdout
