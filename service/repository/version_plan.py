"""Which member versions a fresh server refuses, decided from the repository's content alone,
so that it serves what a long-running server on the same repository serves.

A running server refuses a new member version that would break an ensemble that works (see
service.repository.members.would_break) and keeps the version it served. A server starting
on a repository that already holds such a version has served nothing yet; it refuses the
versions a running server would have refused: for each ensemble (by name), if its members'
newest loadable versions cannot vote together, it looks for the fewest members to take back
to an earlier version (newest first) so that they can. Those members' newer versions are
refused, each for the reason a running server gives, and the member serves the earlier one.
When no such choice exists the ensemble does not work either way, and nothing is refused for
it (it fails with its contract error, as on a running server).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from service.errors import ModelLoadError
from service.repository.config import ModelConfig
from service.repository.contract import EnsembleContractError
from service.repository.manifest import VariantManifest, load_version_manifest
from service.repository.members import NOT_IN_REPOSITORY, Members, contract_of, refusal
from service.repository.scan import ModelEntry

MAX_CHECKS = 4096
"""Most contract checks one ensemble's search makes (a handful in practice)."""


def plan_refusals(ensembles: Mapping[str, Sequence[str]],
                  candidates: Mapping[str, Sequence[VariantManifest]],
                  max_batch_sizes: Mapping[str, Mapping[str, int]] | None = None,
                  problems: Mapping[str, str] | None = None,
                  quorums: Mapping[str, int] | None = None) -> dict[str, dict[int, Exception]]:
    """model -> {version: the error it is refused with}.

    `ensembles`: each ensemble's members, in configuration order. `candidates`: each model's
    versions that the server may serve, with a manifest that loads, newest first (the versions
    its policy selects, and the earlier ones it falls back to). `max_batch_sizes`: per
    ensemble, its members' model.yaml batch sizes. `problems`: members that are not models
    (an ensemble named as a member), which fail the contract whatever is chosen. `quorums`:
    per ensemble, the fewest members that must serve; when no earlier versions fit, members
    whose every version would break the ensemble are left out (all their versions refused,
    as a running server refuses a member that comes back with another label set), provided
    that many still serve."""
    chosen: dict[str, int] = {}  # model -> index into its candidates (its count: left out), once decided
    refused: dict[str, dict[int, Exception]] = {}
    for name in sorted(ensembles):
        members = list(ensembles[name])
        sizes = (max_batch_sizes or {}).get(name, {})
        free = [m for m in members if candidates.get(m) and m not in chosen]

        def at(assignment: Mapping[str, int]) -> Members:
            out: dict[str, VariantManifest | str | None] = {}
            for m in members:
                index = assignment.get(m, chosen.get(m, 0))
                if problems and m in problems:
                    out[m] = problems[m]
                elif candidates.get(m) and index < len(candidates[m]):
                    out[m] = candidates[m][index]
                else:
                    out[m] = NOT_IN_REPOSITORY
            return out

        quorum = (quorums or {}).get(name, 1)
        found = _search(name, free, candidates, at, sizes, 0)
        if found is None:
            found = _search(name, free, candidates, at, sizes, quorum)
        for m in free:
            chosen[m] = (found or {}).get(m, 0)
        for m, index in (found or {}).items():
            for newer in candidates[m][:index]:
                try:
                    contract_of(name, {**at(found or {}), m: newer}, sizes)
                except EnsembleContractError as exc:
                    refused.setdefault(m, {})[newer.version] = refusal(newer, exc)
    return refused


def _search(name: str, free: list[str], candidates: Mapping[str, Sequence[VariantManifest]], at,
            sizes: Mapping[str, int], quorum: int) -> dict[str, int] | None:
    """The assignment that takes the fewest members back (the earliest members in
    configuration order, then their newest earlier versions, first) for which the contract
    holds; {} when it holds as it is; None when none does. With `quorum` (> 0), a member
    may also be left out (index: its number of candidates) if `quorum` members still have one."""
    checks = 0
    for k in range(len(free) + 1):
        for subset in itertools.combinations(free, k):
            options = [range(1, len(candidates[m]) + (1 if quorum else 0)) for m in subset]
            for indices in itertools.product(*options):
                assignment = dict(zip(subset, indices))
                if quorum and (all(i < len(candidates[m]) for m, i in assignment.items())
                               or sum(not isinstance(v, str) and v is not None
                                      for v in at(assignment).values()) < quorum):
                    continue  # (the first pass tried it) or too few members would be left
                checks += 1
                if checks > MAX_CHECKS:
                    return None
                try:
                    contract_of(name, at(assignment), sizes)
                except EnsembleContractError:
                    continue
                return assignment
    return None


MAX_FALLBACKS = 8
"""Earlier versions of a `latest` model read as candidates beyond the ones its policy selects."""


def read_candidates(models: Mapping[str, tuple[ModelEntry, ModelConfig]]) -> dict[str, list[VariantManifest]]:
    """Each model's candidate versions with a manifest that loads, newest first: those its
    version policy selects and, under `latest`, the earlier ones it would fall back to."""
    out: dict[str, list[VariantManifest]] = {}
    for name, (entry, config) in models.items():
        selected = config.version_policy.select(set(entry.versions))
        fallback = config.version_policy.all is None and config.version_policy.specific is None
        limit = len(selected) + (MAX_FALLBACKS if fallback else 0)
        found: list[VariantManifest] = []
        for version in sorted(entry.versions if fallback else selected, reverse=True):
            try:
                manifest, _ = load_version_manifest(entry.path / str(version))
            except ModelLoadError:
                continue  # it fails to load at startup anyway
            found.append(manifest)
            if len(found) >= limit:
                break
        out[name] = found
    return out
