"""Which sets and selective threshold an answer gets: the request's coverage and risk (or its
model's defaults), checked before inference, and each model's and member subset's
Uncertainty, fitted once from its members' manifests and kept while those versions serve.

Every ready model's sets over the members that serve are fitted when the manager settles
(at load and after every version change: `refit`), so no request pays for a fit; a member
subset that answers alone (a straggler cut, a member down) is fitted the first time it does."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service.ensemble.calibration import aligned_validation
from service.ensemble.conformal import check_fraction, max_coverage
from service.ensemble.uncertainty import Uncertainty
from service.errors import InvalidInput
from service.repository.config import UncertaintyDefaults

if TYPE_CHECKING:
    from service.results import InferenceResult
    from service.repository.manager import ModelManager

log = logging.getLogger(__name__)

KEPT = 64  # fitted Uncertainty objects kept (a few per model: one per member subset that answers)


@dataclass(frozen=True)
class Asked:
    """What one request asks of its answer's uncertainty (None: nothing)."""

    coverage: float | None
    max_risk: float | None
    score: str
    class_conditional: bool

    @property
    def anything(self) -> bool:
        return self.coverage is not None or self.max_risk is not None


NOTHING = Asked(None, None, "lac", False)
KEPT_CHECKS = 4096


@dataclass(frozen=True)
class Figures:
    """What GetStatus shows of a model's sets (at its default coverage, or STATUS_COVERAGE)."""

    coverage: float
    is_default: bool
    score: str
    class_conditional: bool
    fit_rows: int
    calibration_rows: int
    max_coverage: float
    quantile: float
    mean_set_size: float


STATUS_COVERAGE = 0.9


class Uncertainties:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self._fitted: OrderedDict[tuple, Uncertainty] = OrderedDict()
        self._checked: dict[tuple, tuple[UncertaintyDefaults, Asked]] = {}
        self._unfitted: dict[str, str] = {}  # model -> why its sets could not be fitted

    def refit(self) -> None:
        """Fit each ready model's sets, at its configured score, over what serves now (a
        lookup when nothing changed: fits are cached by member versions)."""
        manager = self.manager
        for model in [*manager.variants, *manager.ensembles]:
            if not manager.is_ready(model):
                continue
            defaults = self._defaults(model)
            try:
                self.for_model(model, None, Asked(None, None, defaults.score, defaults.class_conditional))
                self._unfitted.pop(model, None)
            except (InvalidInput, ValueError) as exc:  # asked of it later, it says the same
                if self._unfitted.get(model) != str(exc):  # once, not on every poll
                    log.warning("model %s: its prediction sets cannot be fitted: %s", model, exc)
                self._unfitted[model] = str(exc)

    def _defaults(self, model: str) -> UncertaintyDefaults:
        ensemble = self.manager.ensemble(model)
        if ensemble is not None:
            return ensemble.config.uncertainty if ensemble.config else UncertaintyDefaults()
        variant = self.manager.variants.get(model)
        return variant.config.uncertainty if variant is not None else UncertaintyDefaults()

    def asked(self, model: str, version: int | None, coverage: float | None, max_risk: float | None,
              outputs: list[str]) -> Asked:
        """The request's ask, its model's default coverage filling in; InvalidInput before any
        inference for a value out of range, a coverage or risk the model's calibration rows
        cannot support (naming the limit), or an uncertainty output asked without its value."""
        defaults = self._defaults(model)
        if coverage is None and max_risk is None and defaults.coverage is None and not outputs:
            return NOTHING  # the common case, on every request: nothing more to check
        key = (model, version, coverage, max_risk, tuple(outputs))
        known = self._checked.get(key)
        if known is not None and known[0] is defaults:  # asked before, under this configuration
            return known[1]
        coverage = defaults.coverage if coverage is None else check_fraction("coverage", coverage)
        max_risk = None if max_risk is None else check_fraction("max_risk", max_risk)
        asked = Asked(coverage, max_risk, defaults.score, defaults.class_conditional)
        if coverage is None and {"prediction_set", "set_size"} & set(outputs):
            raise InvalidInput(f"model '{model}': outputs prediction_set and set_size need a coverage (the request "
                               f"parameter 'coverage', or 'uncertainty: coverage' in its configuration)")
        if max_risk is None and "abstained" in outputs:
            raise InvalidInput(f"model '{model}': output abstained needs the request parameter 'max_risk'")
        if asked.anything:
            # Checked once per value and configuration, not per request (resolving every member
            # costs more than the sets); member versions that change under it are checked again
            # when the answer is made (InvalidInput then, after inference, in that rare case).
            self.for_model(model, version, asked).check(coverage, max_risk)
        if len(self._checked) >= KEPT_CHECKS:
            self._checked.clear()
        self._checked[key] = (defaults, asked)
        return asked

    def answer(self, result: InferenceResult, asked: Asked) -> dict[str, np.ndarray]:
        """The uncertainty outputs of `result`'s rows: its batch's slice when the batch computed
        them (the data plane does, for requests that say they ask), else computed now."""
        if not asked.anything:
            return {}
        if result.uncertain_outputs is not None:
            return result.uncertain_outputs
        uncertainty = self._for(result.model, self._versions(result), result.policy, asked)
        p = uncertainty.scorer.probabilities(result.member_probabilities)
        return uncertainty.answer_from(p, asked.coverage, asked.max_risk)

    def status(self, model: str) -> Figures:
        """The sets of a ready model, at its default coverage (STATUS_COVERAGE without one,
        or the most its rows support if less)."""
        defaults = self._defaults(model)
        asked = Asked(defaults.coverage, None, defaults.score, defaults.class_conditional)
        fitted = self.for_model(model, None, asked)
        n = fitted.calibration_rows
        coverage = defaults.coverage or min(STATUS_COVERAGE, max_coverage(n))
        try:
            quantile, size = float(np.mean(fitted.conformal.threshold(coverage))), fitted.mean_set_size(coverage)
        except InvalidInput:  # a class with too few rows for it (Mondrian): no figures to show
            quantile = size = float("nan")
        return Figures(coverage, defaults.coverage is not None, defaults.score, defaults.class_conditional,
                       fitted.fit_rows, n, max_coverage(n), quantile, size)

    def for_model(self, model: str, version: int | None, asked: Asked) -> Uncertainty:
        """The model's Uncertainty over every member it is configured with (an ensemble) or
        over the version that would answer (a single model)."""
        ensemble = self.manager.ensemble(model)
        if ensemble is None:
            served = self.manager.resolve(model, version)
            return self._for(model, ((model, served.version),), "soft", asked)
        assert ensemble.config is not None  # asked of a ready ensemble: the data plane checked
        members = tuple((m, self.manager.resolve(m).version) for m in ensemble.config.members
                        if self.manager.is_ready(m))
        return self._for(model, members, ensemble.config.policy, asked)

    @staticmethod
    def _versions(result: InferenceResult) -> tuple[tuple[str, int], ...]:
        version = {m.name: m.version for m in result.members}
        return tuple((m, version[m]) for m in result.vote.members)

    def _for(self, model: str, members: tuple[tuple[str, int], ...], policy: str, asked: Asked) -> Uncertainty:
        key = (model, members, str(policy), asked.score, asked.class_conditional)
        fitted = self._fitted.get(key)
        if fitted is None:
            fitted = self._fitted[key] = self._fit(model, members, str(policy), asked)
            while len(self._fitted) > KEPT:
                self._fitted.popitem(last=False)
        else:
            self._fitted.move_to_end(key)
        return fitted

    def _fit(self, model: str, members: tuple[tuple[str, int], ...], policy: str, asked: Asked) -> Uncertainty:
        manifests = {m: self.manager.resolve(m, v).manifest for m, v in members}
        ensemble = self.manager.ensemble(model)
        if ensemble is None:
            validation = manifests[model].validation
            probabilities = {model: np.asarray(validation.probabilities, dtype=np.float64)}
            labels = np.asarray(validation.labels, dtype=np.int64)
        else:
            assert ensemble.spec is not None
            probabilities, labels = aligned_validation(ensemble.spec, manifests)
        return Uncertainty.fit(policy, probabilities, labels, asked.score, asked.class_conditional)
