"""The ensembles' contract as the manager keeps it: each ensemble's spec and vote calibration
derived from its members' manifests, and the member versions that would break one refused."""

from __future__ import annotations

import logging
from collections.abc import Callable

from service.ensemble.calibration import NO_CALIBRATION, fit_vote_calibration
from service.repository.config import Batching
from service.repository.contract import EnsembleContractError
from service.repository.manifest import VariantManifest
from service.repository.members import (
    NOT_IN_REPOSITORY, Missing, contract_of, degraded_reason, refusal, would_break)
from service.repository.queries import ModelQueries
from service.repository.served import EnsembleModel, ManagerObserver
from service.repository.version_plan import plan_refusals, read_candidates

# The manager's lines keep the logger they always had: operators filter the logs on it.
log = logging.getLogger("service.repository.manager")


class EnsembleChecks(ModelQueries):
    """ModelManager's ensemble contract (a part of it: ModelManager.__init__ sets the state)."""

    _observer: ManagerObserver | None
    settled: list[Callable[[], None]]
    _refusals: dict[str, dict[int, Exception]]

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
        return Missing(model.outage() or "no version of it is loaded")

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
        """Runs last in every sync and model-control call: what serves is settled, so the
        `settled` callbacks (fits that depend on the serving versions) run after it."""
        for ensemble in self.ensembles.values():
            self._check_ensemble(ensemble)
            self._log_degradation(ensemble)
        for callback in self.settled:
            callback()

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

    def _ensemble_batching(self, member: str) -> Batching | None:
        for ensemble in self.ensembles.values():
            if ensemble.config and member in ensemble.config.members and ensemble.config.batching:
                return ensemble.config.batching
        return None

    def _count_failure(self, name: str, version: int) -> None:
        if self._observer:
            self._observer.on_load_failure(name, version)
