"""Cumulative per-model statistics, as the v2 ModelStatistics RPC reports them (Triton's
semantics: inference_count counts rows, execution_count counts batches)."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStats:
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=lambda: defaultdict(Duration))


class Statistics:
    """Keyed by (model, version); an ensemble has one version, 1."""

    def __init__(self) -> None:
        self.models: dict[tuple[str, int], ModelStats] = defaultdict(ModelStats)

    def on_request(self, model: str, version: int, rows: int, seconds: float, ok: bool) -> None:
        stats = self.models[(model, version)]
        if ok:
            stats.success.add(seconds)
            stats.inference_count += rows
            stats.last_inference_ms = int(time.time() * 1000)
        else:
            stats.fail.add(seconds)

    def on_batch(self, model: str, batch_rows: int, queue_waits_s: list[float]) -> None:
        name, _, version = model.rpartition(":")
        stats = self.models[(name, int(version))]
        stats.queue.add(sum(queue_waits_s), len(queue_waits_s))

    def on_compute(self, model: str, version: int, rows: int, seconds: float) -> None:
        stats = self.models[(model, version)]
        stats.execution_count += 1
        stats.compute.add(seconds)
        stats.batches[rows].add(seconds)

    def on_load_failure(self, model: str, version: int) -> None:
        """Nothing to record: the v2 ModelStatistics message has no field for load failures,
        and an entry for a version that never loaded would list it there as if it served.
        Needed all the same: with monitoring off (QUORUM_MONITORING=false) these statistics
        are the manager's whole observer (`ManagerObserver`), and a load failure calls this.
        (With monitoring on, the monitor counts it as quorum_model_load_failures_total.)"""
