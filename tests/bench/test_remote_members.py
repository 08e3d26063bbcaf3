"""bench/remote_members.py, briefly: it starts the local and the split ensemble, loads both and
reports each variant and the added latency per batch; no timings asserted (those are measured
on a quiet host, in docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.timeout(400)
def test_remote_members_bench_reports_both_variants(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "remote_members.py"), "--onnx-only", "--duration", "0.5",
                    "--warmup", "0.2", "--rounds", "1", "--concurrency", "4", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=380)
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["members"] == ["digits_mlp_a", "digits_cnn_a", "digits_logreg"]
    variants = {(r["variant"], r["concurrency"]) for r in report["rows"]}
    assert variants == {(v, c) for v in ("local (members in-process)", "remote (members on 2 other servers)")
                        for c in (4, 1)}
    assert all(r["rps"] > 0 and r["errors"] == 0 for r in report["rows"])
    assert isinstance(report["added_ms_per_batch"], float)
    assert "added latency per batch" in (tmp_path / "results.md").read_text()
