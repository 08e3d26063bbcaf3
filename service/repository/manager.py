"""The model manager: loads what the repository and its version policies ask for, and keeps
it in step with the disk.

A new version is loaded and warmed up to the side, then swapped in: routing to a model's
newest available version changes in one step on the event loop. Requests already holding
a lease on the old version finish on it; only then is it drained and unloaded. A version
that fails to load is reported and leaves whatever serves in place.

ModelManager is one class assembled from one module per job, each a base class here:
service.repository.queries (the read-only lookups), .ensemble_checks (the ensembles'
contract), .loading (loading and retiring versions), .remote_sync (members served elsewhere,
watched; their records in .remote), .sync (the repository sync), .control
(the explicit model-control RPCs); the records it keeps are in service.repository.served.
This module holds its state and its lifecycle (start, the poller, stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service.batching.requests import Clock
from service.repository.control import ModelControl
from service.repository.remote import Connector, RemoteModel
from service.repository.served import EnsembleModel, ManagerObserver, VariantModel
from service.settings import Settings

log = logging.getLogger(__name__)


class ModelManager(ModelControl):
    def __init__(self, settings: Settings, observer: ManagerObserver | None = None, *,
                 clock: Clock = time.monotonic, connector: Connector | None = None) -> None:
        self.settings = settings
        self.clock = clock
        """The time its batchers (and the data plane serving it) read deadlines on (see
        service.batching.requests.Clock)."""
        self.root = Path(settings.model_repository)
        self.variants: dict[str, VariantModel] = {}
        self.remotes: dict[str, RemoteModel] = {}
        """Members served elsewhere (also in `variants`, under their names)."""
        self._connect = connector  # opens a remote member's link (service.remote); None: no remote calls
        self._remote_conflicts: dict[str, str] = {}  # ensemble -> its remote member that clashes
        self.ensembles: dict[str, EnsembleModel] = {}
        self._observer = observer
        self._slot = 0  # spreads variants over the visible GPUs
        self._pools: dict[str, ThreadPoolExecutor] = {}  # device -> shared batch threads
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self._config_errors: dict[str, str] = {}  # model -> why its model.yaml does not load
        self._errors: dict[str, tuple[str, int]] = {}
        """Last load error per model (or "model/version") and how often it repeated."""
        self._synced = False  # the first scan has registered every model's name
        self._started = False  # the first sync is over (start() returned)
        self.named: set[str] = set()
        """Every model and ensemble the repository names (the last scan), loadable or not."""
        self.settled: list[Callable[[], None]] = []
        """Called after every sync and model-control call, once what serves is settled (the
        data plane fits each ready model's prediction sets there: at load, on version changes)."""
        self._refusals: dict[str, dict[int, Exception]] = {}
        """Member versions the first scan refuses (service.repository.version_plan), as a server
        that had been running would have: model -> {version: why}."""

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await self.sync()
        self._started = True  # from now on each load and recovery logs its own line
        if self.settings.model_control == "poll" and self.settings.poll_interval_s > 0:
            self._poller = asyncio.create_task(self._poll(), name="repository-poller")

    async def stop(self) -> None:
        if self._poller:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        async with self._lock:
            await self._stop_remotes()
            await asyncio.gather(*(
                v.drain_and_unload(self.settings.grace_period_s)
                for m in self.variants.values() for v in m.versions.values()))
            self.variants.clear()
            for pool in self._pools.values():
                pool.shutdown(wait=False)  # every batch has finished: the versions are unloaded
            self._pools.clear()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.sync()
            except Exception:  # a bad scan must not kill the poller
                log.exception("repository poll failed")


__all__ = ["ModelManager"]
