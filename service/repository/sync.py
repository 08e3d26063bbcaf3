"""The repository sync: the loaded versions and ensembles brought in line with the disk and
the version policies (at startup, on each poll, and for a model loaded by request)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from service.errors import ModelLoadError
from service.repository.config import load_ensemble_config, load_model_config
from service.repository.loading import folder_fingerprint
from service.repository.remote_sync import RemoteMembers
from service.repository.scan import ModelEntry, scan_repository
from service.repository.served import EnsembleModel, VariantModel

# The manager's lines keep the logger they always had: operators filter the logs on it.
log = logging.getLogger("service.repository.manager")


class RepositorySync(RemoteMembers):
    """ModelManager's sync with the disk (a part of it: ModelManager.__init__ sets the state)."""

    _lock: asyncio.Lock
    named: set[str]

    async def sync(self) -> None:
        """Bring loaded versions in line with the disk and the version policies."""
        async with self._lock:
            entries = scan_repository(self.root)
            self.named = set(entries)  # every model and ensemble of the repository, loadable or not
            for name in [n for n in self.variants if n not in entries and n not in self.remotes]:
                await self._retire(self.variants.pop(name))
            for name in [n for n in self.ensembles if n not in entries]:
                del self.ensembles[name]
                log.info("ensemble %s: removed from the repository, unloaded", name)
            for entry in entries.values():
                if entry.kind == "ensemble":
                    self._sync_ensemble(entry)
            await self._sync_remotes(entries)  # before the members load: the ensembles see them
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
            if version not in entry.versions or folder_fingerprint(entry.path / str(version)) != model.failed_files.get(version):
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
