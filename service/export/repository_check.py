"""Offline checks of a model repository, as the server would make them when loading it:
used by `quorum validate` and `quorum ensemble create`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import ModelLoadError
from service.repository.config import load_ensemble_config, load_model_config
from service.repository.contract import EnsembleContractError
from service.repository.manifest import VariantManifest, load_version_manifest
from service.repository.members import Missing, contract_of, missing, would_break
from service.repository.version_plan import plan_refusals, read_candidates
from service.repository.scan import ModelEntry, scan_model, valid_model_name


@dataclass
class ModelReport:
    name: str
    kind: str
    served: list[str] = field(default_factory=list)
    """What would serve, e.g. 'version 2 (onnx)'."""
    refused: list[str] = field(default_factory=list)
    """What the server would refuse, and why."""
    ignored: str = ""
    """Why the server would not even see this folder as a model."""
    notes: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)
    """Members an ensemble would answer without (its quorum serves), and why."""
    """What the server serves differently from what a manifest says (a copied version folder)."""


def check_artifact(folder: Path, manifest: VariantManifest) -> None:
    """The checkpoint is there and is what the manifest says (ONNX: onnx.checker and the graph's
    input/output names; SavedModel: saved_model.pb)."""
    path = folder / manifest.artifact
    if manifest.framework == "savedmodel":
        if not (path / "saved_model.pb").is_file():
            raise ModelLoadError(str(folder), f"'{manifest.artifact}' is not a SavedModel (no saved_model.pb)")
        return
    import onnx

    try:
        onnx.checker.check_model(str(path))
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # onnx's ValidationError, protobuf's DecodeError
        raise ModelLoadError(str(folder), f"'{manifest.artifact}' fails onnx.checker: "
                             f"{' '.join(str(exc).split())[:300]}") from exc
    initializers = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    outputs = [o.name for o in graph.output]
    if manifest.input.name not in inputs:
        raise ModelLoadError(str(folder), f"manifest input '{manifest.input.name}' not in graph inputs {inputs}")
    if len(inputs) != 1:  # the server feeds only the manifest's input
        raise ModelLoadError(str(folder), f"the graph needs inputs {inputs}; the server feeds only "
                             f"'{manifest.input.name}'")
    if manifest.output.name not in outputs:
        raise ModelLoadError(str(folder), f"manifest output '{manifest.output.name}' not in graph outputs {outputs}")


def served_manifest(entry: ModelEntry, notes: list[str] | None = None,
                    refused: Mapping[int, Exception] | None = None
                    ) -> tuple[VariantManifest | str, list[str], int | None]:
    """(the newest served version's manifest, or why there is none; problems of every version
    the policy wants; that model's max batch size from model.yaml, if set). As the server
    does, a version that fails (or is in `refused`, see version_plan) leaves the newest
    earlier one that loads serving under `latest`. Copied version folders, served as the
    folder's name and version, are added to `notes`."""
    try:
        config = load_model_config(entry.path)
    except ModelLoadError as exc:
        return str(exc), [str(exc)], None
    batch = config.batching.max_batch_size if config.batching else None
    policy = config.version_policy
    if not policy.select(set(entry.versions)):
        why = f"{entry.path}: the version policy selects none of versions {sorted(entry.versions)}"
        return why, [why], batch
    problems: list[str] = []
    good: dict[int, VariantManifest] = {}
    failed: set[int] = set()
    while todo := sorted(policy.select(set(entry.versions) - failed) - set(good)):
        for version in reversed(todo):
            folder = entry.path / str(version)
            try:
                if refused and version in refused:
                    raise refused[version]
                manifest, copied_from = load_version_manifest(folder)
                check_artifact(folder, manifest)
                if copied_from and notes is not None:
                    notes.append(f"{entry.name}/{version} is a copy of {copied_from}: served as {entry.name} "
                                 f"version {version}")
                good[version] = manifest
            except ModelLoadError as exc:
                problems.append(str(exc))
                failed.add(version)
    if good:
        return good[max(good)], problems, batch
    return "; ".join(problems), problems, batch


def member_manifests(root: Path, members: list[str], refusals: Mapping[str, Mapping[int, Exception]] | None = None
                     ) -> tuple[dict[str, VariantManifest | str | None], dict[str, int]]:
    """What check_ensemble takes: each member's manifest, or why it has none (Missing), or
    None; with `refusals` (see version_plan), the versions a server starting now serves."""
    found: dict[str, VariantManifest | str | None] = {}
    sizes: dict[str, int] = {}
    for member in members:
        entry = scan_model(root, member) if valid_model_name(member) else None
        if entry is None:
            found[member] = None
        elif entry.kind == "ensemble":
            found[member] = "it is an ensemble; members are single models"
        else:
            manifest, _, batch = served_manifest(entry, refused=(refusals or {}).get(member))
            found[member] = Missing(manifest) if isinstance(manifest, str) else manifest  # as the server sees it
            if batch is not None:
                sizes[member] = batch
    return found, sizes


def _refusals(root: Path, entries: list[ModelEntry]) -> dict[str, dict[int, Exception]]:
    """The member versions a server starting on this repository refuses (version_plan)."""
    ensembles: dict[str, tuple[str, ...]] = {}
    quorums: dict[str, int] = {}
    for entry in entries:
        if entry.kind == "ensemble":
            try:
                config = load_ensemble_config(entry.path)
            except ModelLoadError:
                continue
            ensembles[entry.name], quorums[entry.name] = tuple(config.members), config.min_members
    members = {m for names in ensembles.values() for m in names}
    kinds = {e.name: e for e in entries}
    models = {}
    for name in members:
        member = kinds.get(name)
        if member is not None and member.kind == "variant":
            try:
                models[name] = (member, load_model_config(member.path))
            except ModelLoadError:
                pass
    problems = {m: "it is an ensemble; members are single models" for m in members
                if m in kinds and kinds[m].kind == "ensemble"}
    return plan_refusals(ensembles, read_candidates(models), None, problems, quorums)


def check_repository(root: Path) -> list[ModelReport]:
    """What a server starting on `root` would serve, refuse and serve degraded, model by model."""
    reports: list[ModelReport] = []
    children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    entries = [e for e in (scan_model(root, p.name) for p in children) if e is not None]
    refusals = _refusals(root, entries)
    for path in children:
        entry = scan_model(root, path.name)
        if entry is None:
            why = ("not a valid model name" if not valid_model_name(path.name)
                   else "no ensemble.yaml and no numeric version folder")
            reports.append(ModelReport(path.name, "ignored", ignored=why))
            continue
        report = ModelReport(entry.name, entry.kind)
        if entry.kind == "variant":
            manifest, problems, _ = served_manifest(entry, report.notes, refusals.get(entry.name))
            report.refused += problems
            if not isinstance(manifest, str):
                report.served.append(f"version {manifest.version} ({manifest.framework}, "
                                     f"{manifest.input.name} {manifest.input.dtype} {list(manifest.input.shape)}, "
                                     f"{len(manifest.labels)} labels)")
        else:
            _check_ensemble(root, entry, refusals, report)
        reports.append(report)
    return reports


def _check_ensemble(root: Path, entry: ModelEntry, refusals: Mapping[str, Mapping[int, Exception]],
                    report: ModelReport) -> None:
    """The server's rules: the contract over the members that are there; fewer than the
    quorum of them is a refusal (naming the missing members), more is degraded."""
    try:
        config = load_ensemble_config(entry.path)
        elsewhere = {m.name: m for m in config.remote if m.manifest is None}  # only their endpoint knows them
        local, sizes = member_manifests(root, [m for m in config.members if m not in elsewhere], refusals)
        for member in config.remote:
            if member.manifest is not None:  # a foreign server's member: its manifest stands beside the ensemble
                manifest = VariantManifest.model_validate_json((entry.path / member.manifest).read_text())
                local[member.name] = manifest.model_copy(update={"name": member.name})
        members = {m: local[m] for m in config.members if m in local}
        if not members:
            report.served.append(f"{len(config.members)} members ({', '.join(config.members)}), all served "
                                 "elsewhere: the server checks them against each other when it reaches them")
            return
        spec = contract_of(entry.name, members, sizes)
    except EnsembleContractError as exc:
        report.refused += [f"ensemble '{entry.name}': {p}" for p in exc.problems]
        return
    except (ModelLoadError, OSError, ValueError) as exc:
        report.refused.append(str(exc))
        return
    gone = missing(members)
    lines = [f"member '{m}' has no loadable version ({why})" for m, why in gone.items()]
    if len(config.members) - len(gone) < config.min_members:
        report.refused += [f"ensemble '{entry.name}': {len(config.members) - len(gone)} of its "
                           f"{len(config.members)} members serve, fewer than its quorum {config.min_members}"]
        report.refused += [f"ensemble '{entry.name}': {line}" for line in lines]
        return
    report.served.append(f"{len(config.members)} members ({', '.join(config.members)}), "
                         f"policy {config.policy}, {len(spec.labels)} labels"
                         + (f"; {', '.join(elsewhere)} served elsewhere, checked when the server reaches them"
                            if elsewhere else ""))
    report.degraded += lines


def ensembles_broken_by(root: Path, manifest: VariantManifest) -> list[EnsembleContractError]:
    """The ensembles of the repository at `root` that work now and that `manifest`, a new
    version of one of their members, would break: the versions a server refuses (it keeps
    serving the member's version before), by the server's own check (would_break)."""
    broken: list[EnsembleContractError] = []
    if not root.is_dir():
        return broken
    for path in sorted(root.iterdir()):
        entry = scan_model(root, path.name)
        if entry is None or entry.kind != "ensemble":
            continue
        try:
            config = load_ensemble_config(entry.path)
        except ModelLoadError:
            continue  # a broken ensemble.yaml: the server serves no configuration of it to break
        if manifest.name not in config.members:
            continue
        members, sizes = member_manifests(root, list(config.members))
        error = would_break(entry.name, members, manifest, sizes)
        if error is not None:
            broken.append(error)
    return broken
