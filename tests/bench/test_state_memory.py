"""bench/state_memory.py runs against a real redis-server and server and reports its samples
(no size asserted: the figures are measured, in docs/performance.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import onnx_models

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.timeout(300)
def test_state_memory_reports_redis_and_the_server_over_the_stream():
    done = subprocess.run([sys.executable, str(BENCH / "state_memory.py"), "--minutes", "0.2", "--every", "4",
                           "--concurrency", "4", "--model-repository", str(onnx_models())],
                          capture_output=True, text=True, timeout=280, env={**os.environ, "QUORUM_DRAIN_DELAY": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and " s |" in line]
    assert len(rows) >= 2, done.stdout
    assert "errors {}" in done.stdout and "largest: Redis used" in done.stdout
