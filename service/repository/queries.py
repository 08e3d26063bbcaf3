"""The model manager's read-only queries: which version serves a request, what is known,
ready, degraded, and the version statuses the status RPCs report."""

from __future__ import annotations

from pathlib import Path

from service.errors import ModelNotFound, ModelNotReady
from service.repository.members import why_not_serving
from service.repository.scan import scan_model, valid_model_name
from service.repository.served import EnsembleModel, ServedVersion, State, VariantModel, VersionStatus
from service.settings import Settings


class ModelQueries:
    """ModelManager's lookups (a part of it: ModelManager.__init__ sets the state below). They
    only read it, so the data plane and the fronts may call them at any step of the loop."""

    settings: Settings
    root: Path
    variants: dict[str, VariantModel]
    ensembles: dict[str, EnsembleModel]
    _config_errors: dict[str, str]
    _synced: bool
    _started: bool

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
        if model.outage():
            return model.outage()
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
