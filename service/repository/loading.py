"""The loading of versions: a version folder read, checked against its ensembles, placed on
a device, warmed up behind its batcher and swapped in; retired versions drained; load errors
logged once per change."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Callable

import numpy as np

from service.batching.batcher import DynamicBatcher
from service.batching.config import BatchingConfig
from service.batching.requests import Clock
from service.repository.config import Batching
from service.repository.ensemble_checks import EnsembleChecks
from service.repository.manifest import VariantManifest, load_version_manifest
from service.repository.served import ServedVersion, State, VariantModel
from service.runtimes import Runtime, RuntimeOptions, create_runtime
from service.runtimes.devices import place

# The manager's lines keep the logger they always had: operators filter the logs on it.
log = logging.getLogger("service.repository.manager")


class VersionLoading(EnsembleChecks):
    """ModelManager's version loading (a part of it: ModelManager.__init__ sets the state)."""

    clock: Clock
    _slot: int
    _pools: dict[str, ThreadPoolExecutor]
    _errors: dict[str, tuple[str, int]]

    async def _load_version(self, model: VariantModel, version: int) -> None:
        folder = model.entry.path / str(version)
        files = folder_fingerprint(folder)  # before reading: a folder still being copied in changes, and is retried
        try:
            manifest, copied_from = load_version_manifest(folder)  # served as the folder's name and version
            self._check_new_member_version(manifest)
            served = await self._start_version(model, folder, manifest)
            served.copied_from = copied_from
        except Exception as exc:  # a version that cannot load must never take the server down
            model.failed[version] = str(exc)
            model.failed_files[version] = files
            self._report(f"{model.entry.name}/{version}", version,
                         f"failed to load {model.entry.name} version {version}: {exc}", model=model.entry.name)
            return
        self._cleared(f"{model.entry.name}/{version}")
        if served.copied_from:
            log.info("%s/%d is a copy of %s (its variant.json says so): served as %s version %d",
                     model.entry.name, version, served.copied_from, model.entry.name, version)
        model.versions[version] = served
        served.state = State.AVAILABLE  # routing switches here, in one step
        serving = model.serving()
        assert serving is not None  # this version, available now (or a later one)
        model.last_manifest = serving.manifest
        for ensemble in self.ensembles.values():  # in the same step: they align the new version at once
            if ensemble.spec is not None:
                self._check_ensemble(ensemble)

    async def _start_version(self, model: VariantModel, folder: Path, manifest: VariantManifest) -> ServedVersion:
        knobs = model.config.batching or self._ensemble_batching(model.entry.name) or Batching()
        batching = BatchingConfig(
            max_batch_size=knobs.max_batch_size or manifest.max_batch_size,
            max_queue_delay_us=knobs.max_queue_delay_us,
            preferred_batch_sizes=tuple(knobs.preferred_batch_sizes),
            max_queue_size=knobs.max_queue_size)
        spec = model.config.device or self.settings.device_overrides.get(model.entry.name) or self.settings.device
        device = place(spec, self._slot)
        self._slot += 1
        options = RuntimeOptions(
            device=device, intra_op_threads=self.settings.intra_op_threads,
            batch_invariance=self.settings.batch_invariance, max_batch_size=batching.max_batch_size,
            executor=self._compute_pool(device))
        runtime = create_runtime(folder, manifest, options)
        await runtime.load()
        inline_rows = runtime.rows_within(self.settings.inline_compute_us / 1e6)
        batcher = DynamicBatcher(f"{manifest.name}:{manifest.version}", self._timed(runtime), batching,
                                 self._observer, inline=self._inline(runtime) if inline_rows else None,
                                 inline_rows=inline_rows, clock=self.clock)
        return ServedVersion(manifest, folder, runtime, batcher, batching)

    def _compute_pool(self, device: str) -> ThreadPoolExecutor | None:
        """The device's shared batch threads (compute_threads), made on first use."""
        if not self.settings.compute_threads:
            return None
        pool = self._pools.get(device)
        if pool is None:
            pool = self._pools[device] = ThreadPoolExecutor(
                self.settings.compute_threads, thread_name_prefix=f"compute-{device.replace(':', '')}")
        return pool

    def _timed(self, runtime: Runtime):
        """runtime.predict, reporting each batch's compute time to the observer."""
        observer = self._observer
        if observer is None:
            return runtime.predict
        name, version = runtime.name, runtime.version

        async def run_batch(rows: np.ndarray) -> np.ndarray:
            start = time.perf_counter()
            out = await runtime.predict(rows)
            observer.on_compute(name, version, rows.shape[0], time.perf_counter() - start)
            return out

        return run_batch

    def _inline(self, runtime: Runtime) -> Callable[[np.ndarray], np.ndarray]:
        """runtime.predict_sync, timed as run_batch is: a lone request's batch computed on the
        event loop, for a batch small enough to take under settings.inline_compute_us."""
        observer = self._observer
        if observer is None:
            return runtime.predict_here
        name, version, predict = runtime.name, runtime.version, runtime.predict_here

        def run_batch(rows: np.ndarray) -> np.ndarray:
            start = time.perf_counter()
            out = predict(rows)
            observer.on_compute(name, version, rows.shape[0], time.perf_counter() - start)
            return out

        return run_batch

    async def _retire_version(self, model: VariantModel, version: int) -> None:
        served = model.versions.pop(version)
        serving = model.serving()
        if serving is not None:
            model.last_manifest = serving.manifest
        await served.drain_and_unload(self.settings.grace_period_s)

    async def _retire(self, model: VariantModel) -> None:
        for version in list(model.versions):
            await self._retire_version(model, version)

    def _report(self, key: str, version: int, message: str, model: str | None = None) -> None:
        """Log and count a load error once per change; a repeat (the poller retrying the
        same broken file) is only counted, and the count logged when the error changes."""
        last, repeats = self._errors.get(key, ("", 0))
        if message == last:
            self._errors[key] = (last, repeats + 1)
            return
        suffix = f" (the previous error repeated {repeats} times)" if repeats else ""
        log.error("%s%s", message, suffix)
        self._errors[key] = (message, 0)
        self._count_failure(model or key, version)

    def _cleared(self, key: str) -> None:
        if key in self._errors:
            _, repeats = self._errors.pop(key)
            log.info("%s: loads again, after %d failed attempt%s", key, repeats + 1, "s" if repeats else "")


def folder_fingerprint(folder: Path) -> tuple:
    """(path, size, mtime) of every file under a version folder: changes when files do."""
    try:
        return tuple(sorted((str(p.relative_to(folder)), st.st_size, st.st_mtime_ns)
                            for p in folder.rglob("*") if (st := p.stat()) and p.is_file()))
    except OSError:  # a folder being written or removed right now: retry next time
        return ()
