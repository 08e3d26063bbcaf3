"""The model manager: loads what the repository and its version policies ask for, and keeps
it in step with the disk.

A new version is loaded and warmed up to the side, then swapped in: routing to a model's
newest available version changes in one step on the event loop. Requests already holding
a lease on the old version finish on it; only then is it drained and unloaded. A version
that fails to load is reported and leaves whatever serves in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Iterator, Protocol

import numpy as np

from service.batching.batcher import BatchObserver, DynamicBatcher
from service.batching.config import BatchingConfig
from service.batching.requests import Clock
from service.ensemble.calibration import NO_CALIBRATION, VoteCalibration, fit_vote_calibration
from service.errors import (
    InvalidInput, ModelLoadError, ModelNotFound, ModelNotReady, PermissionDenied, QuorumError)
from service.repository.config import (
    Batching, EnsembleConfig, ModelConfig, load_ensemble_config, load_model_config)
from service.repository.contract import EnsembleContractError, EnsembleSpec
from service.repository.manifest import VariantManifest, load_version_manifest
from service.repository.members import (
    NOT_IN_REPOSITORY, Missing, contract_of, degraded_reason, refusal, why_not_serving, would_break)
from service.repository.version_plan import read_candidates, plan_refusals
from service.repository.scan import ModelEntry, scan_model, scan_repository, valid_model_name
from service.runtimes import Runtime, RuntimeOptions, create_runtime
from service.runtimes.devices import place
from service.settings import Settings

log = logging.getLogger(__name__)


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
                    arrivals: Sequence[float] | None = None) -> np.ndarray:
        """Logits for `rows`, through the batcher; more rows than the max batch size go as
        max-batch-size pieces (queued together, each a batch's worth) and come back as one.
        `arrivals`: when the requests the rows merge arrived (see DynamicBatcher.submit);
        a request split in pieces counts its wait once, with its first piece."""
        with self.lease():
            size = self.batching.max_batch_size
            if rows.shape[0] <= size:
                return await self.batcher.submit(rows, deadline, arrivals)
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


class ModelManager:
    def __init__(self, settings: Settings, observer: ManagerObserver | None = None, *,
                 clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        """The time its batchers (and the data plane serving it) read deadlines on (see
        service.batching.requests.Clock)."""
        self.root = Path(settings.model_repository)
        self.variants: dict[str, VariantModel] = {}
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

    # -- syncing with the disk -------------------------------------------------------------
    async def sync(self) -> None:
        """Bring loaded versions in line with the disk and the version policies."""
        async with self._lock:
            entries = scan_repository(self.root)
            self.named = set(entries)  # every model and ensemble of the repository, loadable or not
            for name in [n for n in self.variants if n not in entries]:
                await self._retire(self.variants.pop(name))
            for name in [n for n in self.ensembles if n not in entries]:
                del self.ensembles[name]
                log.info("ensemble %s: removed from the repository, unloaded", name)
            for entry in entries.values():
                if entry.kind == "ensemble":
                    self._sync_ensemble(entry)
            variants = [e for e in entries.values() if e.kind == "variant"]
            for entry in variants:  # known before they load: not ready rather than not found
                if entry.name not in self.variants:
                    with contextlib.suppress(ModelLoadError):
                        self.variants[entry.name] = VariantModel(entry, load_model_config(entry.path))
            if not self._synced:
                self._refusals = self._plan_refusals()
            self._synced = True
            for entry in variants:
                await self._sync_variant(entry)
            self._refusals = {}  # the first scan's: every version it refused was tried by now
            self._check_ensembles()

    def _plan_refusals(self) -> dict[str, dict[int, Exception]]:
        """The member versions a server that had been running would have refused (the first
        scan: the models are registered, none is loaded)."""
        configs = {n: e.config for n, e in self.ensembles.items() if e.config is not None}
        members = {m for c in configs.values() for m in c.members}
        models = {m: (v.entry, v.config) for m, v in self.variants.items() if m in members}
        return plan_refusals(
            {n: c.members for n, c in configs.items()}, read_candidates(models),
            {n: self._member_batch_sizes(c.members) for n, c in configs.items()},
            {m: "it is an ensemble; members must be models" for m in members if m in self.ensembles},
            {n: c.min_members for n, c in configs.items()})

    def _sync_ensemble(self, entry: ModelEntry) -> None:
        current = self.ensembles.get(entry.name)
        try:
            config = load_ensemble_config(entry.path)
        except ModelLoadError as exc:
            self._report(entry.name, 0, f"ensemble {entry.name}: {exc}")  # once per change
            if current is None:
                self.ensembles[entry.name] = EnsembleModel(entry, None, str(exc))
            else:
                current.config_error = str(exc)  # keep serving the last good configuration
            return
        if current is not None and current.config is None:  # it never loaded: its "loaded" line is the one
            self._errors.pop(entry.name, None)
        else:
            self._cleared(entry.name)
        if current is None:
            self.ensembles[entry.name] = EnsembleModel(entry, config)
        else:
            current.config, current.config_error = config, ""

    # -- the ensemble contract -------------------------------------------------------------
    def _member_manifest(self, name: str) -> VariantManifest | str | None:
        """What the contract checks for one member: its manifest, why it has none, or None
        when no such model is in the repository."""
        if name in self.ensembles:
            return "it is an ensemble; members must be models"
        model = self.variants.get(name)
        if model is None:
            error = self._config_errors.get(name)
            return Missing(error) if error else NOT_IN_REPOSITORY
        serving = model.serving()
        if serving is not None:
            return serving.manifest
        if model.last_manifest is not None:
            return model.last_manifest
        if model.failed:
            return Missing("; ".join(f"version {v}: {e}" for v, e in sorted(model.failed.items())))
        return Missing("no version of it is loaded")

    def _member_batch_sizes(self, members) -> dict[str, int]:
        """Members' configured max batch sizes (as _start_version applies them); the others'
        come from their manifests. Independent of which members serve right now."""
        sizes = {}
        for name in members:
            model = self.variants.get(name)
            knobs = (model.config.batching if model else None) or self._ensemble_batching(name)
            if knobs is not None and knobs.max_batch_size:
                sizes[name] = knobs.max_batch_size
        return sizes

    def _check_ensembles(self) -> None:
        for ensemble in self.ensembles.values():
            self._check_ensemble(ensemble)
            self._log_degradation(ensemble)

    def _log_degradation(self, ensemble: EnsembleModel) -> None:
        """One line when an ensemble starts answering without some members, or again with all."""
        name = ensemble.entry.name
        missing = self.missing_members(name) if self.is_ready(name) else {}
        if missing != ensemble.degraded:
            if missing:
                log.warning("ensemble %s: %s", name, degraded_reason(missing))
            elif ensemble.degraded:
                log.info("ensemble %s: every member serves again", name)
            ensemble.degraded = missing

    def _check_ensemble(self, ensemble: EnsembleModel) -> None:
        """Derive the ensemble's spec and vote calibration from its members' manifests, or
        record (and log once) why they cannot vote together."""
        config, name = ensemble.config, ensemble.entry.name
        if config is None:
            ensemble.spec, ensemble.checked = None, ()
            return
        members = {m: self._member_manifest(m) for m in config.members}
        sizes = self._member_batch_sizes(config.members)
        key = (config, tuple((m, id(v) if isinstance(v, VariantManifest) else v) for m, v in members.items()),
               tuple(sorted(sizes.items())))
        if key == ensemble.checked:
            return
        ensemble.checked = key
        try:
            spec = contract_of(name, members, sizes)  # members that are gone: degraded, not broken
        except EnsembleContractError as exc:
            if ensemble.contract_error != str(exc):
                log.error("ensemble %s FAILED to load: %s", name, exc)
                self._count_failure(name, 1)
            ensemble.spec, ensemble.calibration, ensemble.contract_error = None, NO_CALIBRATION, str(exc)
            return
        if ensemble.contract_error:
            log.info("ensemble %s: its members' contract holds again", name)
        elif ensemble.spec is None and self._started:  # at startup, the server lists what it serves
            log.info("ensemble %s loaded (%s vote of %s)", name, config.policy, ", ".join(config.members))
        manifests = {m: v for m, v in members.items() if isinstance(v, VariantManifest)}
        ensemble.calibration = fit_vote_calibration(spec, manifests)
        ensemble.spec, ensemble.contract_error = spec, ""
        for policy, c in ensemble.calibration.policies.items():
            log.debug("ensemble %s vote calibration %s: T=%.3f ECE %.4f -> %.4f, NLL %.4f -> %.4f",
                      name, policy, c.temperature, c.ece_before, c.ece_after, c.nll_before, c.nll_after)

    def _check_new_member_version(self, manifest: VariantManifest) -> None:
        """Refuse a new member version that would break an ensemble whose contract holds now
        (or, at startup, that a server running before it arrived would have refused)."""
        planned = self._refusals.get(manifest.name, {}).pop(manifest.version, None)
        if planned is not None:
            raise planned
        for ensemble in self.ensembles.values():
            config = ensemble.config
            if config is None or ensemble.spec is None or manifest.name not in config.members:
                continue
            members = {m: self._member_manifest(m) for m in config.members}
            broken = would_break(ensemble.entry.name, members, manifest, self._member_batch_sizes(config.members))
            if broken is not None:
                raise refusal(manifest, broken) from broken

    async def _sync_variant(self, entry: ModelEntry) -> None:
        model = self.variants.get(entry.name)
        try:
            config = load_model_config(entry.path)
        except ModelLoadError as exc:
            self._report(entry.name, 0, f"model {entry.name}: {exc}")  # once per change
            self._config_errors[entry.name] = str(exc)
            return
        self._config_errors.pop(entry.name, None)
        self._cleared(entry.name)
        if model is None:
            model = self.variants[entry.name] = VariantModel(entry, config)
        model.entry, model.config = entry, config
        if model.unloaded_by_request:
            return
        policy = config.version_policy
        # Forget failures of versions that were removed or whose files changed since (a
        # version copied in before its manifest was complete), so that they are retried.
        for version in list(model.failed):
            if version not in entry.versions or _fingerprint(entry.path / str(version)) != model.failed_files.get(version):
                del model.failed[version]
                model.failed_files.pop(version, None)
        # Among the versions that load: a failed (or refused) newest version leaves the one
        # before it serving under `latest`, whether that one was serving already or not.
        wanted = policy.select(set(entry.versions) - set(model.failed))
        while todo := sorted(wanted - set(model.versions) - set(model.failed)):
            for version in todo:
                await self._load_version(model, version)
            wanted = policy.select(set(entry.versions) - set(model.failed))
        if policy.select(set(entry.versions)) & set(model.failed) or wanted - set(model.versions):
            return  # a wanted version failed: whatever serves now stays in place
        for version in sorted(set(model.versions) - wanted):
            await self._retire_version(model, version)

    async def _load_version(self, model: VariantModel, version: int) -> None:
        folder = model.entry.path / str(version)
        files = _fingerprint(folder)  # before reading: a folder still being copied in changes, and is retried
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

    def _ensemble_batching(self, member: str) -> Batching | None:
        for ensemble in self.ensembles.values():
            if ensemble.config and member in ensemble.config.members and ensemble.config.batching:
                return ensemble.config.batching
        return None

    async def _retire_version(self, model: VariantModel, version: int) -> None:
        served = model.versions.pop(version)
        serving = model.serving()
        if serving is not None:
            model.last_manifest = serving.manifest
        await served.drain_and_unload(self.settings.grace_period_s)

    async def _retire(self, model: VariantModel) -> None:
        for version in list(model.versions):
            await self._retire_version(model, version)

    def _count_failure(self, name: str, version: int) -> None:
        if self._observer:
            self._observer.on_load_failure(name, version)

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

    # -- explicit load / unload ------------------------------------------------------------
    def check_control(self, rpc: str) -> None:
        """PermissionDenied unless the server runs with --model-control explicit."""
        if self.settings.model_control != "explicit":
            raise PermissionDenied(
                f"{rpc} is disabled: model control is '{self.settings.model_control}'; start the server "
                "with --model-control explicit (QUORUM_MODEL_CONTROL=explicit) to allow it")

    def _entry(self, name: str) -> ModelEntry:
        self._check_name(name)
        entry = scan_model(self.root, name)
        if entry is None:
            raise ModelNotFound(f"model '{name}' is not in the repository")
        return entry

    async def load_model(self, name: str) -> None:
        """Load (or reload) a model by name, as RepositoryModelLoad asks."""
        self.check_control("RepositoryModelLoad")
        entry = self._entry(name)
        async with self._lock:
            await self._load_entry(entry)

    async def _load_entry(self, entry: ModelEntry) -> None:
        """Load a model or an ensemble with its members (the lock is held); the ensembles'
        contracts are checked again afterwards."""
        name = entry.name
        if entry.kind == "ensemble":
            self._sync_ensemble(entry)
            ensemble = self.ensembles[name]
            if ensemble.config is None:
                raise ModelLoadError(str(entry.path), ensemble.error)
            reloaded, ensemble.unloaded_by_request = ensemble.unloaded_by_request, False
            for member in ensemble.config.members:
                if member in self.variants:
                    self.variants[member].unloaded_by_request = False
                    self.variants[member].failed.clear()
                    self.variants[member].failed_files.clear()
                member_entry = scan_model(self.root, member)
                if member_entry and member_entry.kind == "variant":
                    await self._sync_variant(member_entry)
            self._check_ensembles()
            if ensemble.spec is None:
                raise ModelLoadError(str(entry.path), ensemble.error)
            if reloaded:
                log.info("ensemble %s loaded by request", name)
            return
        model = self.variants.get(name)
        if model:
            model.unloaded_by_request = False
            model.failed.clear()
            model.failed_files.clear()
        await self._sync_variant(entry)
        self._check_ensembles()
        model = self.variants.get(name)
        if model and model.serving() is None:
            errors = "; ".join(model.failed.values()) or "no version selected by the policy"
            raise ModelLoadError(str(entry.path), errors)

    async def unload_model(self, name: str) -> None:
        """Unload every version of a model; polling leaves it unloaded until load_model."""
        self.check_control("RepositoryModelUnload")
        self._check_name(name)
        async with self._lock:
            await self._unload(name)

    async def _unload(self, name: str) -> None:
        if name in self.ensembles:
            self.ensembles[name].unloaded_by_request = True
            log.info("ensemble %s unloaded by request", name)
            return
        model = self.variants.get(name)
        if model is None:
            raise ModelNotFound(f"model '{name}' is not loaded")
        model.unloaded_by_request = True
        await self._retire(model)
        self._check_ensembles()

    async def reload_config(self, names: list[str]) -> list[str]:
        """Serve exactly `names` (and their ensembles' members), as TF Serving's
        HandleReloadConfigRequest replaces its model list. The whole list is checked first:
        a name not in the repository, a duplicate or a broken ensemble refuses it all and
        changes nothing. If a listed model then fails to load, the models this call loaded
        are unloaded again and nothing else is unloaded. Returns the load errors."""
        self.check_control("HandleReloadConfigRequest")
        if not names:
            raise InvalidInput("the model config lists no models; it would unload every model")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidInput(f"the model config lists {', '.join(map(repr, duplicates[:5]))} more than once")
        entries, unknown = {}, []
        for name in names:
            try:
                entries[name] = self._entry(name)
            except ModelNotFound:
                unknown.append(name)
        if unknown:
            raise InvalidInput(
                f"the model config names models that are not in the repository: "
                f"{', '.join(_quote(n) for n in unknown[:5])}{' ...' if len(unknown) > 5 else ''}; nothing was changed")
        members: set[str] = set()
        for name, entry in entries.items():
            if entry.kind != "ensemble":
                continue
            config = load_ensemble_config(entry.path)  # ModelLoadError: nothing changed yet
            missing = [m for m in config.members if scan_model(self.root, m) is None]
            if missing:
                raise InvalidInput(f"ensemble '{name}' needs members not in the repository: {missing}; "
                                   "nothing was changed")
            members |= set(config.members)
        async with self._lock:
            before = {n for n in self.variants if self.variants[n].serving() is not None} | {
                n for n, e in self.ensembles.items() if not e.unloaded_by_request}
            errors = []
            for entry in entries.values():
                try:
                    await self._load_entry(entry)
                except QuorumError as exc:
                    errors.append(str(exc))
            keep = set(names) | members
            if errors:  # roll back: unload what this call loaded, keep everything else
                for name in (keep - before):
                    with contextlib.suppress(QuorumError):
                        await self._unload(name)
                return errors
            for name in [n for n in list(self.variants) + list(self.ensembles) if n not in keep]:
                await self._unload(name)
            return []

    @staticmethod
    def _check_name(name: str) -> None:
        if not valid_model_name(name):
            raise ModelNotFound(f"{_quote(name)} is not a valid model name")

    # -- lookups for the data plane --------------------------------------------------------
    def resolve(self, name: str, version: int | None = None) -> ServedVersion:
        """The version to serve: the one asked for, or the newest available."""
        model = self.variants.get(name)
        if model is None:
            if not self._synced and valid_model_name(name) and scan_model(self.root, name) is not None:
                raise ModelNotReady(f"model '{name}' is loading")  # before the first scan registered it
            raise ModelNotFound(f"model '{name}' not found")
        if version:
            served = model.versions.get(version)
            if served is None or served.state != State.AVAILABLE:
                if version in model.failed:
                    raise ModelNotReady(f"model '{name}' version {version} failed to load: {model.failed[version]}")
                raise ModelNotFound(f"model '{name}' has no version {version} being served")
            return served
        served = model.serving()
        if served is None:
            raise ModelNotReady(f"model '{name}' has no version ready: {self._not_ready_reason(name, model)}")
        return served

    def _not_ready_reason(self, name: str, model: VariantModel) -> str:
        """Why no version of a registered model serves, as the operator fixes it."""
        if model.unloaded_by_request:
            return "it was unloaded (RepositoryModelUnload); load it to serve it again"
        if name in self._config_errors:
            return f"its model.yaml does not load: {self._config_errors[name]}"
        if model.failed:
            version = max(model.failed)
            return f"version {version} failed to load: {model.failed[version]}"
        return "no version folder is selected by its version policy" if self._started else "it is loading"

    def check_known(self, name: str, version: int | None = None) -> None:
        """ModelNotFound, naming the model (and the version), unless this server knows them:
        a model or ensemble of the repository, and a version its policy selects on disk,
        serves or failed to load (an ensemble has version 1 only). Every RPC and route that
        names a model asks this first (404 over HTTP); a known model or version that is not
        ready passes: the caller says it is not ready (UNAVAILABLE, 503)."""
        if name in self.ensembles:
            if version not in (None, 0, 1):
                raise ModelNotFound(f"ensemble '{name}' has no version {version} (only version 1)")
            return
        model = self.variants.get(name)
        if model is None:
            if (name in self._config_errors or not self._synced) and valid_model_name(name) and scan_model(
                    self.root, name) is not None:
                return  # in the repository, not loaded (its model.yaml is broken, or still loading)
            raise ModelNotFound(f"model '{name}' not found")
        if not version:
            return
        known = model.config.version_policy.select(set(model.entry.versions)) | set(model.versions) | set(model.failed)
        if version not in known:
            raise ModelNotFound(f"model '{name}' has no version {version} "
                                f"(versions: {', '.join(map(str, sorted(known))) or 'none'})")

    def ensemble(self, name: str) -> EnsembleModel | None:
        return self.ensembles.get(name)

    def is_ready(self, name: str) -> bool:
        ensemble = self.ensembles.get(name)
        if ensemble is not None:
            return (ensemble.config is not None and ensemble.spec is not None and not ensemble.unloaded_by_request
                    and self.serving_members(name) >= ensemble.config.min_members)
        return self._variant_ready(name)

    def ensemble_problem(self, name: str) -> str:
        """Why an ensemble is not ready ("" when it is)."""
        ensemble = self.ensembles[name]
        if ensemble.error:
            return ensemble.error
        if ensemble.unloaded_by_request:
            return "unloaded"
        if ensemble.spec is None or ensemble.config is None:  # no config, no spec: config_error said why
            return "its members are loading"
        serving, quorum = self.serving_members(name), ensemble.config.min_members
        if serving < quorum:
            return (f"{serving} of its {len(ensemble.config.members)} members serve, fewer than its quorum {quorum}; "
                    + "; ".join(f"member '{m}': {why}" for m, why in self.missing_members(name).items()))
        return ""

    def missing_members(self, ensemble: str) -> dict[str, str]:
        """The ensemble's configured members that serve no version now, each with why: while
        its quorum serves, it answers without them (degraded)."""
        config = self.ensembles[ensemble].config
        return {m: why_not_serving(self.variants.get(m), self._config_errors.get(m))
                for m in (config.members if config else ()) if not self._variant_ready(m)}

    def serving_members(self, ensemble: str) -> int:
        """How many of an ensemble's configured members serve now."""
        config = self.ensembles[ensemble].config
        return sum(self._variant_ready(m) for m in config.members) if config else 0

    def _variant_ready(self, name: str) -> bool:
        model = self.variants.get(name)
        return model is not None and model.serving() is not None

    def all_ready(self) -> bool:
        """Every model the repository asks for is serving (for health checks)."""
        names = [n for n, m in self.variants.items() if not m.unloaded_by_request]
        names += [n for n, e in self.ensembles.items() if not e.unloaded_by_request]
        return bool(names) and all(self.is_ready(n) for n in names)

    def statuses(self, name: str | None = None) -> list[VersionStatus]:
        out: list[VersionStatus] = []
        for model in self.variants.values():
            if name and model.entry.name != name:
                continue
            for version, served in sorted(model.versions.items()):
                out.append(VersionStatus(model.entry.name, version, served.state, device=served.device))
            for version, error in sorted(model.failed.items()):
                out.append(VersionStatus(model.entry.name, version, State.END, error=error))
        return out


def _quote(name: str) -> str:
    return repr(name if len(name) <= 64 else name[:64] + "...")


def _fingerprint(folder: Path) -> tuple:
    """(path, size, mtime) of every file under a version folder: changes when files do."""
    try:
        return tuple(sorted((str(p.relative_to(folder)), st.st_size, st.st_mtime_ns)
                            for p in folder.rglob("*") if (st := p.stat()) and p.is_file()))
    except OSError:  # a folder being written or removed right now: retry next time
        return ()


__all__ = ["ModelManager", "ServedVersion", "State", "VersionStatus", "QuorumError"]
