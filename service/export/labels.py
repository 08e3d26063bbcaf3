"""Class labels: from --labels, the model's own classes (scikit-learn), or y itself; y given
as integers (indices into the model's outputs) or as label strings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.export.errors import ExportError, UsageError


@dataclass(frozen=True)
class Labels:
    names: tuple[str, ...]
    y_train: np.ndarray
    y_val: np.ndarray
    note: str
    """Where the names came from, for the output."""


def _kind(y: np.ndarray, array: str) -> str:
    if y.ndim != 1:
        raise ExportError(f"--data: {array} must be one label per row, has shape {list(y.shape)}")
    if y.dtype.kind in "US" or (y.dtype.kind == "O" and all(isinstance(v, str) for v in y.tolist())):
        return "str"
    if y.dtype.kind in "iub":
        return "int"
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return "int"
    sample = next((v for v in y.tolist() if not (isinstance(v, float) and float(v).is_integer())), y[0])
    raise ExportError(f"--data: {array} holds {sample!r} ({y.dtype}); labels must be integers or strings")


def _by_value(y: np.ndarray, index: dict[Any, int], array: str, known: Sequence[str]) -> np.ndarray:
    out = np.empty(len(y), dtype=np.int64)
    for i, value in enumerate(y.tolist()):
        key = value if value in index else str(value)
        if key not in index:
            shown = ", ".join(list(known)[:10])
            raise ExportError(f"--data: {array} holds the label {value!r}, which is not among the "
                              f"model's classes [{shown}]")
        out[i] = index[key]
    return out


def _as_indices(y: np.ndarray, n_classes: int, array: str) -> np.ndarray:
    y = y.astype(np.int64)
    bad = y[(y < 0) | (y >= n_classes)]
    if len(bad):
        raise ExportError(f"--data: {array} holds the class index {int(bad[0])}, but the model has "
                          f"{n_classes} outputs (0..{n_classes - 1}); give string labels or --labels")
    return y


def resolve(y_train: np.ndarray, y_val: np.ndarray, n_classes: int, labels: Sequence[str] | None,
            classes: Sequence[Any] | None) -> Labels:
    y_train, y_val = np.asarray(y_train), np.asarray(y_val)
    kinds = {_kind(y_train, "y_train"), _kind(y_val, "y_val")}
    if len(kinds) > 1:
        raise ExportError("--data: y_train and y_val must both be integers or both strings")
    if labels is not None:
        labels = tuple(labels)
        if len(set(labels)) != len(labels) or any(not label for label in labels):
            raise UsageError(f"--labels {','.join(labels)}: labels must be distinct and non-empty")
        if len(labels) != n_classes:
            raise UsageError(f"--labels names {len(labels)} classes, but the model has {n_classes} outputs")
    if classes is not None:
        if len(classes) != n_classes:
            raise ExportError(f"the model has {len(classes)} classes_ but {n_classes} outputs")
        names = tuple(str(c) for c in classes)
        index: dict[Any, int] = {c: i for i, c in enumerate(classes)}
        index.update({str(c): i for i, c in enumerate(classes)})
        return Labels(labels or names, _by_value(y_train, index, "y_train", names),
                      _by_value(y_val, index, "y_val", names),
                      "--labels, in the order of the model's classes_" if labels else "the model's classes_")
    if kinds == {"str"}:
        if labels is None:
            found = sorted(set(y_train.tolist()) | set(y_val.tolist()))
            if len(found) != n_classes:
                raise ExportError(f"--data: y_train and y_val hold {len(found)} distinct labels, but the "
                                  f"model has {n_classes} outputs; give --labels in output order")
            labels, note = tuple(str(v) for v in found), "y's distinct values, sorted (pass --labels to set the order)"
        else:
            note = "--labels"
        index = {label: i for i, label in enumerate(labels)}
        return Labels(labels, _by_value(y_train, index, "y_train", labels),
                      _by_value(y_val, index, "y_val", labels), note)
    names = labels or tuple(str(i) for i in range(n_classes))
    return Labels(names, _as_indices(y_train, n_classes, "y_train"), _as_indices(y_val, n_classes, "y_val"),
                  "--labels" if labels else "output indices 0..C-1 (pass --labels to name them)")
