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
                   env={**os.environ, "QUORUM_DRAIN_DELAY": "0"})  # the server it starts exits at once
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {r["server"]: r for r in report["results"]}
    assert set(rows) == {"floor", "quorum-native-uvloop"}
    assert all(r["rps"] > 0 and r["errors"] == 0 for r in rows.values())
    assert rows["floor"]["x_floor"] == 1.0
    assert "quorum-native-uvloop" in (tmp_path / "results.md").read_text()


@pytest.mark.timeout(300)
def test_engine_memory_refuses_every_oversized_request_on_both_engines():
    """Every case (plain, gzip, gzip 4x, four at once) on each engine, against a real server
    with a 1 MiB limit: each answer RESOURCE_EXHAUSTED, and a growth figure printed."""
    done = subprocess.run([sys.executable, str(BENCH / "engine_memory.py"), "--mib", "8", "--limit-mib", "1",
                           "--model-repository", str(onnx_models())],
                          check=True, capture_output=True, text=True, timeout=280)
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith(("| grpcio", "| native"))]
    assert len(rows) == 8, done.stdout
    assert {(engine.strip(), case.strip()) for engine, case, *_ in rows} == {
        (engine, case) for engine in ("grpcio", "native") for case in ("plain", "gzip", "gzip x4 size", "gzip, 4 at once")}
    assert all(answers.strip() == "RESOURCE_EXHAUSTED" for _, _, _, answers, _ in rows), done.stdout
    assert all(grown.strip().startswith("+") and grown.strip().endswith(" MiB") for *_, grown in rows), done.stdout
