"""`quorum validate PATH` and `quorum ensemble create NAME --members a,b,c`.

validate checks a repository offline, as the server would load it (manifests, model.yaml and
ensemble.yaml, the ensemble contract, checkpoints present and loadable) and prints what the
server would refuse and why; exit status 1 when it would refuse something, 0 otherwise.
ensemble create checks the members' manifests against each other with the same contract
the server applies, then writes `<repository>/<name>/ensemble.yaml`; exit status 1 when the
members cannot vote together, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import get_args

import yaml
from pydantic import ValidationError

from service.repository.config import ENSEMBLE_CONFIG, EnsembleConfig, Objective, Policy
from service.repository.scan import valid_model_name

DEFAULT_REPOSITORY = Path("models")


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    validate = subparsers.add_parser(
        "validate", help="check a model repository offline and say what the server would refuse",
        description="Check every model folder as the server would load it: model.yaml, the "
                    "manifests of the versions its policy selects, their checkpoints (onnx.checker, "
                    "SavedModel present), ensemble.yaml and the ensemble contract between members. "
                    "Exit status 1 when the server would refuse something.")
    validate.add_argument("path", type=Path, help="repository root")
    ensemble = subparsers.add_parser("ensemble", help="author ensembles")
    actions = ensemble.add_subparsers(dest="action", required=True)
    create = actions.add_parser(
        "create", help="write <repository>/NAME/ensemble.yaml after checking the members",
        description="Check that the members predict the same labels and take the same input "
                    "(the server's ensemble contract), then write ensemble.yaml.")
    create.add_argument("name", help="ensemble name (a folder in the repository)")
    create.add_argument("--members", required=True, help="comma-separated member model names")
    create.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY,
                        help="repository root (default: models)")
    create.add_argument("--policy", choices=get_args(Policy), default=None,
                        help="voting policy (default: confidence)")
    create.add_argument("--quorum", type=int, default=None, help="fewest members whose answers make a vote")
    create.add_argument("--objective-latency-p99-ms", type=float, default=None,
                        help="maximise accuracy while p99 latency stays under this many ms")
    create.add_argument("--force", action="store_true", help="replace an existing ensemble.yaml")


def validate(args: argparse.Namespace) -> int:
    from service.export.repository_check import check_repository

    if not args.path.is_dir():
        print(f"quorum validate: error: {args.path}: not a folder", file=sys.stderr)
        return 2
    reports = check_repository(args.path)
    refused = 0
    for report in reports:
        if report.ignored:
            print(f"ignored  {report.name}: {report.ignored}")
            continue
        status = "REFUSED" if report.refused and not report.served else (
            "partly" if report.refused else "degraded" if report.degraded else "ok")
        print(f"{status:8} {report.name} ({report.kind}){': ' + '; '.join(report.served) if report.served else ''}")
        for why in report.refused:
            print(f"         refused: {why}")
        for why in report.degraded:
            print(f"         serves without: {why}")
        for note in report.notes:
            print(f"         note: {note}")
        refused += bool(report.refused)
    print(f"{len([r for r in reports if not r.ignored])} models, {refused} with something the server would refuse")
    return 1 if refused else 0


def _fail(message: str, code: int = 1) -> int:
    print(f"quorum ensemble create: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def create(args: argparse.Namespace) -> int:
    from service.export.repository_check import member_manifests
    from service.repository.contract import EnsembleContractError, check_ensemble

    root, name = args.repository, args.name
    members = [m.strip() for m in args.members.split(",") if m.strip()]
    if not valid_model_name(name):
        return _fail(f"{name!r}: an ensemble name is a folder name of letters, digits, '_', '.', '-'", 2)
    if not root.is_dir():
        return _fail(f"--repository {root}: not a folder", 2)
    if name in members:
        return _fail(f"--members: the ensemble '{name}' cannot be its own member", 2)
    settings: dict = {"members": members}
    for key, value in (("policy", args.policy), ("quorum", args.quorum)):
        if value is not None:
            settings[key] = value
    if args.objective_latency_p99_ms is not None:
        settings["objective"] = Objective(latency_p99_ms=args.objective_latency_p99_ms)
    try:
        config = EnsembleConfig(**settings)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        return _fail(f"--{field.replace('_', '-')}: {message}" if field else message, 2)
    folder = root / name
    if folder.is_dir() and any(p.is_dir() and p.name.isdigit() for p in folder.iterdir()):
        return _fail(f"{folder} holds model versions; an ensemble needs a folder of its own", 2)
    if (folder / ENSEMBLE_CONFIG).exists() and not args.force:
        return _fail(f"{folder / ENSEMBLE_CONFIG} exists; pass --force to replace it", 2)
    manifests, sizes = member_manifests(root, members)
    try:
        spec = check_ensemble(name, manifests, sizes)
    except EnsembleContractError as exc:
        return _fail(str(exc))
    body = config.model_dump(mode="json", exclude_defaults=True)
    body = {"members": members, "policy": config.policy, **{k: v for k, v in body.items() if k not in ("members", "policy")}}
    folder.mkdir(exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".ensemble-", suffix=".yaml", delete=False) as tmp:
        yaml.safe_dump(body, tmp, sort_keys=False)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, folder / ENSEMBLE_CONFIG)  # a polling server sees the whole file or none
    print(f"wrote {folder / ENSEMBLE_CONFIG}: {len(members)} members, policy {config.policy}, "
          f"labels {', '.join(spec.labels)}, input {spec.input.dtype} {list(spec.input.shape)}")
    return 0


def run(args: argparse.Namespace) -> int:
    return validate(args) if args.command == "validate" else create(args)
