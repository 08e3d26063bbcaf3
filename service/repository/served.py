"""The records the model manager keeps: a served version, a model's versions, an ensemble.

A ServedVersion is one loaded checkpoint behind its batcher, leased by the requests running
on it; VariantModel and EnsembleModel are what the manager knows of each model of the
repository; State and VersionStatus are what the status RPCs report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from collections.abc import Sequence
from typing import Iterator, Protocol

import numpy as np

from service.batching.batcher import DynamicBatcher
from service.batching.dispatcher import BatchObserver
from service.batching.queue import Keep
from service.batching.config import BatchingConfig
from service.ensemble.calibration import NO_CALIBRATION, VoteCalibration
from service.repository.config import EnsembleConfig, ModelConfig
from service.repository.contract import EnsembleSpec
from service.repository.manifest import VariantManifest
from service.repository.scan import ModelEntry
from service.runtimes import Runtime

# The manager's lines keep the logger they always had: operators filter the logs on it.
log = logging.getLogger("service.repository.manager")


class State(IntEnum):
    """TF Serving's ModelVersionStatus.State values."""

    UNKNOWN = 0
    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


class ManagerObserver(BatchObserver, Protocol):
    """What the manager reports: batches (from the batchers), compute time, load failures."""

    def on_compute(self, model: str, version: int, rows: int, seconds: float) -> None: ...

    def on_load_failure(self, model: str, version: int) -> None: ...


@dataclass(eq=False)
class ServedVersion:
    """One loaded checkpoint: its runtime behind its own dynamic batcher."""

    manifest: VariantManifest
    folder: Path
    runtime: Runtime
    batcher: DynamicBatcher
    batching: BatchingConfig
    state: State = State.LOADING
    copied_from: str = ""
    """Provenance of a copied version folder: the model and version its manifest names
    ("digits_mlp_a version 1"), when they are not the folder's; "" otherwise."""
    _leases: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def device(self) -> str:
        return self.runtime.device

    @contextlib.contextmanager
    def lease(self) -> Iterator["ServedVersion"]:
        """Held by each request for its whole run, so unload waits for it. Synchronous, so a
        caller can take it in the same step as resolving the version (no swap in between)."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def acquire(self) -> None:
        """lease() without a context manager (a request's hot path holds several): every
        acquire is paired with one release."""
        self._leases += 1
        self._idle.clear()

    def release(self) -> None:
        self._leases -= 1
        if self._leases == 0:
            self._idle.set()

    async def infer(self, rows: np.ndarray, deadline: float | None = None,
                    arrivals: Sequence[float] | None = None, keep: Keep | None = None) -> np.ndarray:
        """Logits for `rows`, through the batcher; more rows than the max batch size go as
        max-batch-size pieces (queued together, each a batch's worth) and come back as one.
        `arrivals`: when the requests the rows merge arrived (see DynamicBatcher.submit);
        a request split in pieces counts its wait once, with its first piece. `keep`: which
        rows are still wanted once queued (see Keep; a request split in pieces keeps them all,
        since a piece left empty would fail the whole)."""
        with self.lease():
            size = self.batching.max_batch_size
            if rows.shape[0] <= size:
                return await self.batcher.submit(rows, deadline, arrivals, keep)
            parts = [asyncio.ensure_future(self.batcher.submit(
                         rows[i:i + size], deadline, arrivals if i == 0 or arrivals is None else ()))
                     for i in range(0, rows.shape[0], size)]
            try:
                return np.concatenate(await asyncio.gather(*parts))
            except BaseException:  # the first failure is the answer (its own status code)
                for part in parts:
                    part.cancel()  # a queued piece leaves the queue: no work for nobody
                raise

    async def drain_and_unload(self, grace_s: float) -> None:
        self.state = State.UNLOADING
        end = self.batcher.clock() + grace_s
        if self._leases:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
            except asyncio.TimeoutError:
                log.warning("%s version %d: %d requests still running after %.1fs; unloading",
                            self.name, self.version, self._leases, grace_s)
        await self.batcher.stop(timeout=max(0.0, end - self.batcher.clock()))
        await self.runtime.unload()
        self.state = State.END
        log.info("unloaded %s version %d", self.name, self.version)


@dataclass(frozen=True)
class VersionStatus:
    model: str
    version: int
    state: State
    error: str = ""
    device: str = ""


@dataclass(eq=False)
class VariantModel:
    entry: ModelEntry
    config: ModelConfig
    versions: dict[int, ServedVersion] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    failed_files: dict[int, tuple] = field(default_factory=dict)
    """Fingerprint of each failed version's files: the poller retries when it changes."""
    unloaded_by_request: bool = False
    last_manifest: VariantManifest | None = None
    """The manifest of the version served last: an unloaded member keeps its place in its
    ensembles' contract (and so their metadata) until it is removed from the repository."""

    def outage(self) -> str:
        """Why it serves nothing though it should, when its versions do not say (a member
        served elsewhere: service.repository.remote); "" for a model of the repository."""
        return ""

    def serving(self) -> ServedVersion | None:
        """The newest available version (every request asks, for each member: a plain loop)."""
        best = None
        for v in self.versions.values():
            if v.state is State.AVAILABLE and (best is None or v.version > best.version):
                best = v
        return best


@dataclass(eq=False)
class EnsembleModel:
    entry: ModelEntry
    config: EnsembleConfig | None
    config_error: str = ""
    """Why ensemble.yaml does not load (the last good configuration keeps serving)."""
    unloaded_by_request: bool = False
    contract_error: str = ""
    """Why its members cannot vote together (see service.repository.contract)."""
    spec: EnsembleSpec | None = None
    """What the ensemble answers with (input, labels, max batch size, label alignment),
    checked from its members' manifests; None until the contract holds."""
    calibration: VoteCalibration = NO_CALIBRATION
    """Vote temperatures per policy, fitted on the members' validation replay."""
    checked: tuple = ()
    """What `spec` and `calibration` were derived from (recomputed only when it changes)."""
    degraded: dict[str, str] = field(default_factory=dict)
    """The members it was last logged answering without (empty: whole, or not ready)."""

    @property
    def error(self) -> str:
        return "; ".join(e for e in (self.config_error, self.contract_error) if e)
