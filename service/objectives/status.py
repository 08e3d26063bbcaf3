"""The records of satisficing: a member as the selection reads it (MemberInfo), and what the
tracker reports of each constraint and each member (ConstraintStatus, MemberStatus)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MemberInfo:
    """What selection needs to know about one member, read from the serving version."""

    name: str
    version: int
    device: str
    warmup_latency_s: float
    memory_mb: float
    validation_accuracy: float
    validation_indices: tuple[int, ...]
    validation_labels: np.ndarray
    validation_probabilities: np.ndarray


@dataclass(frozen=True)
class ConstraintStatus:
    name: str
    threshold: float
    value: float
    holds: bool
    measured: bool
    """True when `value` is measured (enough samples), False when predicted."""


@dataclass(frozen=True)
class MemberStatus:
    name: str
    validation_accuracy: float
    live_accuracy: float | None
    live_samples: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    selected: bool
