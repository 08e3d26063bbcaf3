"""bench/uncertainty_cost.py runs and reports each variant against the plain runs that open and
close its round (no figure asserted: those are measured, in docs/performance.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import onnx_models

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.timeout(300)
def test_uncertainty_cost_reports_every_variant_against_plain():
    done = subprocess.run([sys.executable, str(BENCH / "uncertainty_cost.py"), "--rounds", "1", "--duration", "0.5",
                           "--warmup", "0.2", "--concurrency", "4", "--model-repository", str(onnx_models())],
                          capture_output=True, text=True, timeout=280, env={**os.environ, "QUORUM_DRAIN_DELAY": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| 1 |")]
    assert [r[1].strip() for r in rows] == ["plain", "coverage 0.9", "coverage 0.9 + max_risk 0.05",
                                            "plain (control)"]
    assert all(float(r[2]) > 0 and float(r[-1]) > 0 for r in rows)  # req/s, and the CPU ratio
    # the throughput ratios are to the mean of the two plain runs, so theirs average to one
    assert abs((float(rows[0][-2]) + float(rows[-1][-2])) / 2 - 1) <= 0.001
    assert "coverage 0.9: median throughput x plain" in done.stdout
    assert "plain (control): median throughput x plain" in done.stdout
    assert "coverage 0.9: median server CPU per request, plain / this" in done.stdout
