"""`quorum export`: turn a trained model and its data splits into a repository version."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export", help="export a trained model as a new version in a model repository",
        description="Fit the calibration temperature on the validation split, compute the "
                    "normalisation statistics and drift reference on the training split, and "
                    "write <repository>/<name>/<version>/ with the checkpoint and variant.json.")
    parser.add_argument("--model", required=True, type=Path,
                        help="a .keras file or a SavedModel directory; takes normalised input, returns logits")
    parser.add_argument("--data", required=True, type=Path,
                        help=".npz with x_train, y_train, x_val, y_val and optionally val_indices")
    parser.add_argument("--repository", required=True, type=Path, help="model repository root")
    parser.add_argument("--name", required=True, help="model name (folder in the repository)")
    parser.add_argument("--format", dest="fmt", choices=("onnx", "savedmodel"), default="onnx",
                        help="checkpoint format to write (default: onnx)")
    parser.add_argument("--version", type=int, default=None,
                        help="version number (default: one more than the highest present)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated class labels in output order (default: 0..C-1)")
    parser.add_argument("--architecture", default="", help="free-text description, for provenance")
    parser.add_argument("--seed", type=int, default=None, help="training seed, for provenance")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    # Imported here so that `quorum --help` does not pay for loading TensorFlow.
    from service.export.exporter import export_variant

    with np.load(args.data) as data:
        missing = {"x_train", "y_train", "x_val", "y_val"} - set(data.files)
        if missing:
            print(f"error: {args.data} lacks {', '.join(sorted(missing))}", file=sys.stderr)
            return 2
        arrays = {key: data[key] for key in data.files}
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
    try:
        path = export_variant(
            str(args.model), x_train=arrays["x_train"], y_train=arrays["y_train"],
            x_val=arrays["x_val"], y_val=arrays["y_val"], val_indices=arrays.get("val_indices"),
            repository=args.repository, name=args.name, labels=labels, fmt=args.fmt,
            version=args.version, architecture=args.architecture, seed=args.seed,
            source=str(args.model))
    except (ValueError, FileExistsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
