"""The explicit model-control RPCs (load, unload, reload_config), allowed only with
--model-control explicit; each checks what it is asked first and changes nothing on a refusal."""

from __future__ import annotations

import contextlib
import logging

from service.errors import FailedPrecondition, InvalidInput, ModelLoadError, ModelNotFound, PermissionDenied, QuorumError
from service.repository.config import load_ensemble_config
from service.repository.scan import ModelEntry, scan_model, valid_model_name
from service.repository.sync import RepositorySync

# The manager's lines keep the logger they always had: operators filter the logs on it.
log = logging.getLogger("service.repository.manager")


class ModelControl(RepositorySync):
    """ModelManager's model control (a part of it: ModelManager.__init__ sets the state)."""

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
        remote = self.remotes.get(name)
        if remote is not None and remote.spec is not None:
            raise FailedPrecondition(f"model '{name}' is a member served at {remote.spec.endpoint}: "
                                     "unload it on that server")
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
            elsewhere = {m.name for m in config.remote}  # served by other servers: not in this repository
            missing = [m for m in config.members if m not in elsewhere and scan_model(self.root, m) is None]
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
            for name in [n for n in list(self.variants) + list(self.ensembles) if n not in keep and n not in self.remotes]:
                await self._unload(name)
            return []

    @staticmethod
    def _check_name(name: str) -> None:
        if not valid_model_name(name):
            raise ModelNotFound(f"{_quote(name)} is not a valid model name")


def _quote(name: str) -> str:
    return repr(name if len(name) <= 64 else name[:64] + "...")
