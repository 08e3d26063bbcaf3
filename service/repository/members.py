"""An ensemble's contract over the members that are there: a missing member degrades it, a
member version that would break a working ensemble is refused.

The server (at startup, on reload and on load), `quorum export` and the startup plan
(service.repository.version_plan) ask these, so that every one of them refuses the same
member versions for the same reason. `quorum validate` and `quorum ensemble create` check the
whole configuration (service.repository.contract.check_ensemble), missing members included.
"""

from __future__ import annotations

from collections.abc import Mapping

from service.errors import ModelLoadError
from service.repository.contract import EnsembleContractError, EnsembleSpec, check_ensemble
from service.repository.manifest import VariantManifest


class Missing(str):
    """Why a member has no manifest to check right now (its folder is gone, every version of
    it fails to load, its model.yaml is broken): the ensemble votes without it while its
    quorum holds. A plain str in a member mapping is a configuration problem instead (a
    member that is an ensemble), which fails the contract."""


NOT_IN_REPOSITORY = Missing("it is not in the repository")

Members = Mapping[str, "VariantManifest | str | None"]
"""member -> its manifest, Missing (or None: not in the repository), or a configuration
problem (str), in configuration order."""


def missing(members: Members) -> dict[str, str]:
    """The members without a manifest, each with why."""
    return {m: str(v) if v is not None else str(NOT_IN_REPOSITORY)
            for m, v in members.items() if v is None or isinstance(v, Missing)}


def contract_of(ensemble: str, members: Members, max_batch_sizes: Mapping[str, int] | None = None) -> EnsembleSpec:
    """The ensemble's spec from the members that have a manifest; EnsembleContractError when
    those cannot vote together, a member is misconfigured, or no member has a manifest."""
    present = {m: v for m, v in members.items() if v is not None and not isinstance(v, Missing)}
    if not present:
        gone = missing(members)
        raise EnsembleContractError(ensemble, [f"member '{m}' has no loadable version ({why})"
                                               for m, why in gone.items()] or ["it has no members"])
    return check_ensemble(ensemble, present, max_batch_sizes)


def would_break(ensemble: str, members: Members, candidate: VariantManifest,
                max_batch_sizes: Mapping[str, int] | None = None) -> EnsembleContractError | None:
    """Why `candidate` (a version of one of the members) would break the ensemble, which
    works with `members` as they are; None when it works with it too, or does not work
    without it either (then there is nothing to break)."""
    try:
        contract_of(ensemble, members, max_batch_sizes)
    except EnsembleContractError:
        return None
    try:
        contract_of(ensemble, {**members, candidate.name: candidate}, max_batch_sizes)
    except EnsembleContractError as exc:
        return exc
    return None


def refusal(manifest: VariantManifest, broken: EnsembleContractError) -> ModelLoadError:
    """The error a refused member version is reported with, at startup and on reload alike."""
    return ModelLoadError(f"{manifest.name} version {manifest.version}", f"refused: it would break {broken}")


def why_not_serving(model, config_error: str | None) -> str:
    """Why a member (a service.repository.served.VariantModel, or None when the repository
    has no such model) serves no version right now, in a few words for an operator."""
    if model is None:
        return f"its model.yaml does not load ({config_error})" if config_error else str(NOT_IN_REPOSITORY)
    if model.outage():
        return model.outage()
    if model.unloaded_by_request:
        return "it was unloaded"
    if model.failed:
        return "; ".join(f"version {v} failed to load ({e})" for v, e in sorted(model.failed.items()))
    return "it is loading"


def degraded_reason(missing_members: Mapping[str, str]) -> str:
    """What an ensemble that serves without some members reports (status RPCs, the log)."""
    return "degraded: answering without " + "; ".join(f"member '{m}' ({why})" for m, why in missing_members.items())
