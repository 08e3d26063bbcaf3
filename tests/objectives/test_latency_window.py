"""The latency window: percentiles over the last N observations, stale ones expiring."""

from __future__ import annotations

from service.objectives.latency import LatencyWindow


def test_percentiles_over_the_last_n():
    window = LatencyWindow(4)
    assert window.percentile(99) is None and window.count == 0
    for value in [100.0, 1.0, 2.0, 3.0, 4.0]:
        window.add(value)
    assert window.count == 4
    assert window.percentile(100) == 4.0  # 100.0 was pushed out
    window.clear()
    assert window.count == 0


def test_old_observations_expire():
    window = LatencyWindow(10, max_age_s=60)
    window.add(0.5, now=0.0)  # an outlier a minute ago
    window.add(0.001, now=50.0)
    window.add(0.002, now=55.0)
    assert window.percentile(100, now=59.0) == 0.5
    assert window.percentile(100, now=61.0) == 0.002
