"""Offline evaluation through the data plane: each member's and each voting policy's
accuracy (and calibration) on a labelled set, exactly as the server would answer it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.dataplane import DataPlane
from service.ensemble.voting import Policy, calibrate
from service.ensemble.calibration import ece
from service.export.calibration import accuracy

POLICIES = tuple(p.value for p in Policy)


@dataclass(frozen=True)
class MemberScore:
    name: str
    framework: str
    temperature: float
    accuracy: float
    ece_uncalibrated: float
    ece_calibrated: float


async def _chunked(data: DataPlane, model: str, rows: np.ndarray, chunk: int, **kwargs) -> np.ndarray:
    """Probabilities for all rows, sent in requests of at most `chunk` rows."""
    parts = []
    for start in range(0, rows.shape[0], chunk):
        result = await data.infer(model, rows[start:start + chunk], **kwargs)
        parts.append(result.vote.probabilities)
    return np.concatenate(parts)


async def member_scores(data: DataPlane, ensemble: str, rows: np.ndarray, labels: np.ndarray,
                        chunk: int = 64) -> list[MemberScore]:
    model = data.manager.ensemble(ensemble)
    if model is None or model.config is None:
        raise ValueError(f"{ensemble!r} is not an ensemble whose ensemble.yaml has loaded")
    config = model.config
    scores = []
    for name in config.members:
        served = data.manager.resolve(name)
        logits = np.concatenate([await served.infer(rows[i:i + chunk]) for i in range(0, len(rows), chunk)])
        temperature = served.manifest.calibration.temperature
        raw, calibrated = calibrate(logits, 1.0), calibrate(logits, temperature)
        scores.append(MemberScore(name, served.runtime.framework, temperature, accuracy(calibrated, labels),
                                  ece(raw, labels), ece(calibrated, labels)))
    return scores


async def policy_accuracy(data: DataPlane, ensemble: str, rows: np.ndarray, labels: np.ndarray,
                          chunk: int = 64) -> dict[str, float]:
    return {policy: accuracy(await _chunked(data, ensemble, rows, chunk, policy=policy), labels)
            for policy in POLICIES}
