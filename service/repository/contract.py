"""The ensemble contract: which members can vote together, checked from their manifests.

Members must predict the same set of labels (in any order: each member's class axis is
permuted to the ensemble's order) and take the same input (dtype and non-batch shape; the
graph input's name may differ). The ensemble's own metadata is derived here once, when it
loads, not borrowed from one member at request time. The server (on load and hot reload),
`quorum ensemble create` and `quorum validate` all use this one check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from service.errors import ModelLoadError
from service.repository.manifest import TensorSpec, VariantManifest


class EnsembleContractError(ModelLoadError):
    """The members cannot vote together; the message names each offending member."""

    def __init__(self, ensemble: str, problems: list[str]) -> None:
        super().__init__(f"ensemble '{ensemble}'", "; ".join(problems))
        self.ensemble = ensemble
        self.problems = tuple(problems)


@dataclass(frozen=True)
class EnsembleSpec:
    """What an ensemble answers with, derived from its members when it loads."""

    labels: tuple[str, ...]
    """The ensemble's class order: its first member's."""
    input: TensorSpec
    """The first member's input spec (every member takes the same dtype and row shape)."""
    max_batch_size: int
    """The smallest of the members' max batch sizes."""
    permutations: Mapping[str, tuple[int, ...] | None]
    """member -> indices that reorder its class axis into `labels` order (None: already in
    order): `member_probs[..., perm]` is in the ensemble's order."""

    def align(self, member: str, values: np.ndarray) -> np.ndarray:
        """`values` (..., C) of `member` in the ensemble's class order."""
        perm = self.permutations.get(member)
        return values if perm is None else values[..., list(perm)]

    def align_labels(self, member: str, class_indices: np.ndarray) -> np.ndarray:
        """Class indices of `member` (e.g. its validation labels) as ensemble indices."""
        perm = self.permutations.get(member)
        if perm is None:
            return class_indices
        inverse = np.empty(len(perm), dtype=np.int64)
        inverse[list(perm)] = np.arange(len(perm))
        return inverse[np.asarray(class_indices, dtype=np.int64)]


    def aligned_manifest(self, member: str, manifest: VariantManifest) -> VariantManifest:
        """`manifest` with its class axis in the ensemble's order: labels, stored validation
        probabilities and labels, and the drift reference's predicted-class frequencies."""
        perm = self.permutations.get(member)
        if perm is None:
            return manifest
        validation = manifest.validation
        probabilities = self.align(member, np.asarray(validation.probabilities, dtype=np.float64))
        labels = self.align_labels(member, np.asarray(validation.labels, dtype=np.int64))
        frequencies = self.align(member, np.asarray(manifest.drift_reference.predicted_class_frequencies))
        return manifest.model_copy(update={
            "labels": self.labels,
            "validation": validation.model_copy(update={
                "probabilities": tuple(map(tuple, probabilities.tolist())), "labels": tuple(labels.tolist())}),
            "drift_reference": manifest.drift_reference.model_copy(update={
                "predicted_class_frequencies": tuple(frequencies.tolist())})})


MAX_LISTED = 20
"""Most labels one contract problem lists; the rest are counted ("and N more")."""


def _listed(items: list[str], limit: int) -> str:
    """`[a, b, c]`, or `[a, b, and 7 more]` past `limit` items."""
    rest = len(items) - min(len(items), limit)
    return "[" + ", ".join(items[:limit] + ([f"and {rest} more"] if rest else [])) + "]"


def _label_difference(name: str, labels: tuple[str, ...], first_name: str, first: tuple[str, ...]) -> str:
    """The labels each of two members predicts and the other does not, each at its index in
    its member's list, at most MAX_LISTED of them shown in all."""
    theirs, ours = set(first), set(labels)
    extra = [f"{label!r} at {i}" for i, label in enumerate(labels) if label not in theirs]
    missing = [f"{label!r} at {i}" for i, label in enumerate(first) if label not in ours]
    shown_extra = min(len(extra), max(MAX_LISTED // 2, MAX_LISTED - len(missing)))
    shown_missing = min(len(missing), MAX_LISTED - shown_extra)
    parts = []
    if extra:
        parts.append(f"predicts labels that '{first_name}' does not: {_listed(extra, shown_extra)}")
    if missing:
        parts.append(f"lacks labels that '{first_name}' predicts: {_listed(missing, shown_missing)}")
    return f"member '{name}' " + " and ".join(parts)


def _repeats(name: str, labels: tuple[str, ...]) -> str:
    """The labels a member lists more than once, each with the indices it is at."""
    at: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        at.setdefault(label, []).append(i)
    repeated = [f"{label!r} at {_listed([str(i) for i in where], 5)}" for label, where in at.items() if len(where) > 1]
    return f"member '{name}' repeats labels: {_listed(repeated, MAX_LISTED)}"


def _row(spec: TensorSpec) -> str:
    return f"{spec.dtype} {list(spec.shape[1:])}"


def check_ensemble(ensemble: str, members: Mapping[str, VariantManifest | str | None],
                   max_batch_sizes: Mapping[str, int] | None = None) -> EnsembleSpec:
    """The ensemble's spec, or EnsembleContractError naming every offending member.

    `members` maps each configured member, in configuration order, to its manifest, or to
    why it has none (a string), or to None when no such model is in the repository.
    `max_batch_sizes` overrides a member's manifest value (its model.yaml batching)."""
    problems: list[str] = []
    manifests: dict[str, VariantManifest] = {}
    for name, manifest in members.items():
        if manifest is None:
            problems.append(f"member '{name}' is not in the repository")
        elif isinstance(manifest, str):
            problems.append(f"member '{name}' has no loadable version ({manifest})")
        else:
            manifests[name] = manifest
    if not manifests:
        raise EnsembleContractError(ensemble, problems or ["it has no members"])
    first_name, first = next(iter(manifests.items()))
    reference = set(first.labels)
    for name, m in manifests.items():
        if name != first_name and set(m.labels) != reference:
            problems.append(_label_difference(name, m.labels, first_name, first.labels))
        if len(set(m.labels)) != len(m.labels):
            problems.append(_repeats(name, m.labels))
        if name != first_name and (m.input.dtype, m.input.shape[1:]) != (first.input.dtype, first.input.shape[1:]):
            problems.append(f"member '{name}' takes input {_row(m.input)} per row but "
                            f"'{first_name}' takes {_row(first.input)}")
    if problems:
        raise EnsembleContractError(ensemble, problems)
    permutations: dict[str, tuple[int, ...] | None] = {}
    for name, m in manifests.items():
        perm = tuple(m.labels.index(label) for label in first.labels)
        permutations[name] = None if perm == tuple(range(len(perm))) else perm
    sizes = [(max_batch_sizes or {}).get(n, m.max_batch_size) for n, m in manifests.items()]
    return EnsembleSpec(first.labels, first.input, min(sizes), permutations)
