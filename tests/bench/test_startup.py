"""bench/startup.py, briefly: it serves the repository it is given and reports whether
TensorFlow was loaded (no timings or sizes asserted: those are in docs/performance.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.timeout(200)
def test_startup_bench_reports_an_onnx_only_repository_without_tensorflow():
    done = subprocess.run([sys.executable, str(BENCH / "startup.py"), "--only", "digits_mlp_a,digits_cnn_a",
                           "--runs", "1"], check=True, capture_output=True, text=True, timeout=190,
                          env={**os.environ, "QUORUM_DRAIN_DELAY": "0"})  # its server exits at once when measured
    [row] = [line for line in done.stdout.splitlines() if line.startswith("| /")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0 and float(cells[2]) > 0, done.stdout
    assert cells[3] == "no", done.stdout
