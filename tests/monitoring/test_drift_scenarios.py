"""Drift on the real digits models: the server's data plane answers, the monitor's drift
windows compare with the manifests' references. In-distribution traffic (the test split)
raises nothing over a full window; shifted traffic raises the relevant flags within one.
Run with -s to see the measured distances and p-values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.server import QuorumServer
from service.settings import Settings
from tests.helpers import SPLIT

WINDOW = 500


def scenarios() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    test = np.array(json.loads(SPLIT.read_text())["test"])
    rng = np.random.default_rng(0)
    stream = np.concatenate([test, rng.choice(test, WINDOW - len(test))])
    rows = x[stream]
    return {
        "in_distribution": rows,
        "inverted": 16 - rows,
        "noisy": np.clip(rows + rng.normal(0, 4, rows.shape), 0, 16).astype(np.float32),
        "class_imbalanced": x[rng.choice(test[np.isin(y[test], [0, 1])], WINDOW)],
    }


EXPECTED = {  # signals that must be flagged (empty: none may be)
    "in_distribution": set(),
    "inverted": {"input", "prediction", "confidence"},
    "noisy": {"input", "prediction", "confidence"},
    "class_imbalanced": {"input", "prediction"},
}


async def run_scenario(server: QuorumServer, model: str, rows: np.ndarray) -> dict:
    monitor = server.monitor
    monitor.drift_windows.pop(model, None)
    for start in range(0, len(rows), 10):
        await server.api.data.infer(model, rows[start:start + 10])  # recorded by the data plane's observer
    assert monitor.drift_windows[model].fill == 1.0
    monitor.evaluate_drift()
    return monitor.drift_results[model]


@pytest.mark.timeout(300)
async def test_drift_scenarios_on_the_digits_models():
    settings = Settings(grpc_port=0, metrics_port=0, grpc_host="127.0.0.1", metrics_host="127.0.0.1",
                        device="cpu", poll_interval_s=0, drift_window=WINDOW, drift_interval_s=3600)
    server = QuorumServer(settings)
    await server.start()
    try:
        for model in ("digits", "digits_mlp_a"):
            for scenario, rows in scenarios().items():
                results = await run_scenario(server, model, rows)
                signals = {s.signal: s for s in results if s.signal != "feature"}
                features = [s for s in results if s.signal == "feature"]
                flagged = {k for k, s in signals.items() if s.detected}
                print(f"\n{model:13s} {scenario:17s} " + "  ".join(
                    f"{k}: d={s.distance:.3f} p={s.pvalue:.2g}{' DRIFT' if s.detected else ''}"
                    for k, s in signals.items())
                    + f"  features flagged: {sum(f.detected for f in features)}/{len(features)}")
                if not EXPECTED[scenario]:
                    assert not flagged and not any(f.detected for f in features), (model, scenario)
                else:
                    assert EXPECTED[scenario] <= flagged, (model, scenario, flagged)
                if model == "digits" and scenario in ("inverted", "noisy"):
                    assert signals["disagreement"].detected
    finally:
        await server.stop()
