"""bench/inprocess.py on the bundled repository: it runs as the docs show and reports one time
per repeat (no timing asserted: figures are in docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_inprocess_bench_times_real_answers(tmp_path):
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "inprocess.py"), "--calls", "20", "--repeats", "2",
                          "--json", str(out)], capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["model"] == "digits_mlp_a" and len(result["per_request_us"]) == 2
    assert 0 < result["best_us"] <= result["median_us"]
    assert "us per request (best of 2)" in run.stdout
