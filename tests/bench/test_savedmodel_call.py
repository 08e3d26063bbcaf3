"""bench/savedmodel_call.py, briefly: it serves the bundled SavedModel members on their prepared
call, times both calls and reports them (no timing asserted: docs/performance.md has them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.timeout(300)
def test_savedmodel_call_reports_both_calls():
    done = subprocess.run([sys.executable, str(BENCH / "savedmodel_call.py"), "--calls", "20", "--rounds", "2"],
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "digits_cnn_b (prepared: True)" in done.stdout and "digits_mlp_b (prepared: True)" in done.stdout
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert {"prepared", "signature"} <= set(rows)
    assert "prepared / signature: wall" in done.stdout
