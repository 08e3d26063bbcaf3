"""Calibration metrics and temperature scaling, all in float64 numpy.

Temperature scaling (Guo et al. 2017) divides logits by one scalar T > 0, so it changes
confidences but never the argmax: the vote's labels stay the model's, only its weights move.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from service.ensemble.calibration import ece  # the maths lives with the server, which runs it too

T_BOUNDS = (0.05, 20.0)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / T, shifted by the row max so exp never overflows."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels, via log-sum-exp (no log(0) for tiny probs)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    picked = z[np.arange(len(z)), np.asarray(labels, dtype=np.int64)]
    return float(np.mean(log_norm - picked))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == np.asarray(labels)))


def metrics(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> dict[str, float]:
    """accuracy / nll / ece at one temperature, keyed like the manifest's SplitMetrics."""
    probs = softmax(logits, temperature)
    return {"accuracy": accuracy(probs, labels), "nll": nll(logits, labels, temperature),
            "ece": ece(probs, labels)}


def fit_temperature(logits: np.ndarray, labels: np.ndarray,
                    bounds: tuple[float, float] = T_BOUNDS) -> float:
    """T minimising the NLL of `labels`, searched on log T (the loss is smoother there and
    T stays positive); 1.0 exactly when the fit does not lower the NLL."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    result = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))),
                             bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                             options={"xatol": 1e-6})
    temperature = float(np.exp(result.x))
    if not nll(logits, labels, temperature) < nll(logits, labels, 1.0):
        return 1.0
    return temperature
