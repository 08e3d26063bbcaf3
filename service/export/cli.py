"""`quorum export`: turn a trained model and its data splits into a repository version.

Every failure is one line on stderr, `quorum export: error: ...`, naming the file, array,
shape or option at fault. Exit status: 0 exported; 2 the command line is wrong (an option, a
path that does not exist, a kind of file export does not read); 1 the inputs were read but
no version could be made from them. Warnings go to stderr as `quorum export: warning: ...`
and into the manifest's `warnings`.
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from service.export.errors import ExportError, UsageError

PROG = "quorum export"
REQUIRED = ("x_train", "y_train", "x_val", "y_val")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export", help="export a trained model as a new version in a model repository",
        description="Fit the calibration temperature on the validation split, compute the "
                    "normalisation statistics and drift reference on the training split, and "
                    "write <repository>/<name>/<version>/ with the checkpoint and variant.json.",
        epilog="Exit status: 0 exported, 2 usage error (options, missing paths, unreadable kinds "
               "of file), 1 the export failed (data that does not fit the model, a model that "
               "fails to load or run).")
    parser.add_argument("--model", required=True, type=Path,
                        help="a .keras file, a SavedModel folder, an .onnx file (any framework), or a "
                             "fitted scikit-learn classifier saved with pickle/joblib (.pkl, .joblib); "
                             "returning logits or probabilities")
    parser.add_argument("--data", required=True, type=Path,
                        help=".npz with x_train, y_train, x_val, y_val (y: integer class indices or "
                             "label strings) and optionally val_indices")
    parser.add_argument("--repository", required=True, type=Path, help="model repository root")
    parser.add_argument("--name", required=True, help="model name (folder in the repository)")
    parser.add_argument("--format", dest="fmt", choices=("onnx", "savedmodel"), default="onnx",
                        help="checkpoint format to write (default: onnx; savedmodel for Keras and "
                             "SavedModel sources only)")
    parser.add_argument("--version", type=int, default=None,
                        help="version number (default: one more than the highest present)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated class labels in output order (default: the model's "
                             "classes_, else y's strings sorted, else 0..C-1)")
    parser.add_argument("--model-input", choices=("normalised", "raw"), default=None,
                        help="what the model takes: rows normalised with the training split's mean/std "
                             "(default for Keras and TensorFlow), or raw rows (default for scikit-learn; "
                             "the manifest's normalisation is then the identity)")
    parser.add_argument("--input-name", default=None,
                        help="name of the exported graph's input (default: the model's own)")
    parser.add_argument("--output", default=None,
                        help="the model output holding scores or probabilities, when it has several")
    parser.add_argument("--architecture", default="", help="free-text description, for provenance")
    parser.add_argument("--seed", type=int, default=None, help="training seed, for provenance")
    parser.add_argument("--allow-breaking", action="store_true",
                        help="write the version even when it would break an ensemble of the repository "
                             "(another label set or input than the ensemble's other members); a server "
                             "refuses such a version and keeps serving the one before it. Without it, "
                             "export refuses (exit status 1)")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the version folder (and warnings); no progress bar")
    parser.set_defaults(handler=run)
    return parser


def _load_data(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise UsageError(f"--data {path}: no such file")
    if path.is_dir():
        raise UsageError(f"--data {path}: a folder, not an .npz file")
    if not zipfile.is_zipfile(path):  # np.savez writes a zip of .npy files
        raise UsageError(f"--data {path}: not an .npz archive (write it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in REQUIRED if k not in data.files]
            if missing:
                raise ExportError(f"--data {path}: lacks the array(s) {', '.join(missing)} "
                                  f"(has {', '.join(data.files) or 'none'})")
            return {key: data[key] for key in data.files}
    except ValueError as exc:  # object arrays need pickle; we do not unpickle data
        raise ExportError(f"--data {path}: an array holds Python objects ({exc}); save labels as a "
                          "numpy string array (np.array(y, dtype=str))") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise UsageError(f"--data {path}: not an .npz archive ({type(exc).__name__})") from exc


def export(args: argparse.Namespace) -> int:
    # Imported here so that `quorum --help` does not pay for loading TensorFlow.
    from service.export.exporter import export_model

    arrays = _load_data(args.data)
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
    result = export_model(
        str(args.model), x_train=arrays["x_train"], y_train=arrays["y_train"],
        x_val=arrays["x_val"], y_val=arrays["y_val"], val_indices=arrays.get("val_indices"),
        repository=args.repository, name=args.name, labels=labels, fmt=args.fmt,
        version=args.version, architecture=args.architecture, seed=args.seed,
        source=str(args.model), model_input=args.model_input, input_name=args.input_name,
        output=args.output, progress=not args.quiet, allow_breaking=args.allow_breaking)
    for warning in result.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if args.quiet:
        print(result.path)
        return 0
    m = result.manifest
    print(f"exported {m.name} version {m.version} ({m.framework}) to {result.path}")
    for note in result.notes:
        print(f"  {note}")
    v = m.validation
    print(f"  temperature {m.calibration.temperature:.4g}; validation accuracy {v.calibrated.accuracy:.4f}, "
          f"ECE {v.uncalibrated.ece:.4f} -> {v.calibrated.ece:.4f}, NLL {v.uncalibrated.nll:.4f} -> "
          f"{v.calibrated.nll:.4f} (n={v.n})")
    if result.warnings:
        print(f"  {len(result.warnings)} warning(s), also in variant.json")
    return 0


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported: our errors only
    try:
        return export(args)
    except ExportError as exc:
        print(f"{PROG}: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug of ours or a library's: still one line, named
        print(f"{PROG}: error: unexpected {type(exc).__name__}: {_one_line(str(exc))}", file=sys.stderr)
        return 1


def _one_line(message: str) -> str:
    return " ".join(message.split())
