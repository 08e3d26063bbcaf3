"""Export a trained classifier as one repository version: checkpoint + variant.json.

Whatever the model was (a Keras model, a SavedModel, an ONNX file, a fitted scikit-learn
classifier; see service.export.source), the checkpoint maps one float32 input to logits, and
the manifest is the same: normalisation statistics, the fitted temperature, validation
results and the drift reference, so that the server applies them outside the graph and a
row's output never depends on its batch. The version is built in a hidden staging folder and
renamed into place only when complete: a failed export leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from tqdm import tqdm

from service import __version__
from service.export import calibration, checks, reference
from service.export.errors import ExportError, UsageError
from service.export.repository_check import ensembles_broken_by
from service.export.labels import resolve as resolve_labels
from service.export.load import load_source
from service.export.source import OUTPUT_NAME, Source, fit_rows
from service.repository.manifest import (
    SCHEMA_VERSION, Calibration, Normalization, Provenance, SplitMetrics, TensorSpec, Validation,
    VariantManifest)
from service.repository.scan import valid_model_name

STD_EPSILON = 1e-6
ARTIFACTS = {"onnx": "model.onnx", "savedmodel": "model.savedmodel"}
MODEL_INPUTS = ("normalised", "raw")
PROBE_ROWS = 1000
_STEPS = ("load", "normalise", "predict", "calibrate", "reference", "checkpoint", "publish")

__all__ = ["ExportResult", "export_model", "export_variant", "next_version", "normalization_stats",
           "normalize", "OUTPUT_NAME"]


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: VariantManifest
    notes: tuple[str, ...]
    """What the export decided on the user's behalf (output kind, labels, input name)."""
    warnings: tuple[str, ...]


def normalization_stats(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean/std of the flattened training rows. A (near-)constant feature gets
    std 1, not a tiny floor: a never-seen value there (a rare digits pixel) must not be
    blown up by 1/epsilon into an input the model has never seen (StandardScaler does so too)."""
    rows = np.asarray(x_train, dtype=np.float64).reshape(len(x_train), -1)
    std = rows.std(axis=0)
    return rows.mean(axis=0), np.where(std < STD_EPSILON, 1.0, std)


def normalize(x: np.ndarray, mean: np.ndarray, std: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    rows = (np.asarray(x, dtype=np.float64).reshape(len(x), -1) - mean) / std
    return rows.astype(np.float32).reshape(len(x), *shape[1:])


def next_version(model_dir: Path) -> int:
    """One more than the highest numeric version folder (versions only ever increase)."""
    versions = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def _exported_at() -> str:
    # SOURCE_DATE_EPOCH (reproducible-builds convention) pins the timestamp for bundles.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return moment.isoformat(timespec="seconds")


def _check_arrays(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> None:
    for x, y, part in ((x_train, y_train, "train"), (x_val, y_val, "val")):
        if len(x) == 0:
            raise ExportError(f"--data: x_{part} is empty")
        if len(x) != len(y):
            raise ExportError(f"--data: x_{part} has {len(x)} rows but y_{part} has {len(y)} labels")
        if x.dtype.kind not in "fiub":
            raise ExportError(f"--data: x_{part} must hold numbers, holds {x.dtype}")
        if not np.all(np.isfinite(x)):
            raise ExportError(f"--data: x_{part} holds NaN or infinite values")


LOGIT_TOLERANCE = 1e-3
"""Largest difference between the written checkpoint's logits and the model's, relative to
the logits' scale, that passes (conversions differ in float32 rounding, ~1e-6)."""


def _verify_onnx(path: Path, in_name: str, out_name: str, x: np.ndarray, expected: np.ndarray) -> None:
    """The written ONNX file loads in ONNX Runtime as the server will load it, takes one input
    and answers the validation rows as the model did: a checkpoint that would fail on the
    server is never published."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        if names != [in_name]:
            raise ExportError(f"the converted ONNX graph takes inputs {names}, not just '{in_name}'")
        got = session.run([out_name], {in_name: x})[0]
    except ExportError:
        raise
    except Exception as exc:  # onnxruntime's own exception types
        raise ExportError(f"the converted ONNX graph does not run in ONNX Runtime: "
                          f"{str(exc).splitlines()[0]}") from exc
    scale = max(1.0, float(np.max(np.abs(expected))))
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= LOGIT_TOLERANCE * scale:
        raise ExportError(f"the converted ONNX graph answers the validation rows differently from the "
                          f"model (largest logit difference {diff:.3g}); try --format savedmodel")


def _publish(repository: Path, name: str, version: int, write: Callable[[Path], None]) -> Path:
    """Build the version in a hidden folder of the repository, then rename it into place: the
    model folder itself when it is new, else the version folder. On failure nothing is left,
    not even a repository folder this call created."""
    created_root = not repository.exists()
    repository.mkdir(parents=True, exist_ok=True)
    model_dir, target = repository / name, repository / name / str(version)
    staging = Path(tempfile.mkdtemp(prefix=".quorum-export-", dir=repository))  # not a valid model name
    done = False
    try:
        folder = staging / name / str(version)
        folder.mkdir(parents=True)
        write(folder)
        if target.exists():
            raise UsageError(f"--version {version}: {target} exists; versions are immutable, pick a new one")
        try:
            if model_dir.exists():
                raise FileExistsError(model_dir)
            os.rename(staging / name, model_dir)
        except OSError:  # the model folder exists (or appeared meanwhile): add the version to it
            os.rename(folder, target)
        done = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created_root and not done:
            try:
                os.rmdir(repository)
            except OSError:
                pass
    return target


def export_model(model: Any, *, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                 y_val: np.ndarray, val_indices: Sequence[int] | np.ndarray | None, repository: str | Path,
                 name: str, labels: Sequence[str] | None = None,
                 fmt: Literal["onnx", "savedmodel"] = "onnx", version: int | None = None,
                 architecture: str = "", seed: int | None = None, source: str = "",
                 model_input: str | None = None, input_name: str | None = None,
                 output: str | None = None, progress: bool = True, allow_breaking: bool = False) -> ExportResult:
    """Write `<repository>/<name>/<version>/` (checkpoint + variant.json).

    `model`: a Keras model, a fitted scikit-learn classifier, or a path (.keras, SavedModel
    folder, .onnx, .pkl/.joblib). `model_input`: whether the model takes rows normalised with
    the training split's statistics (the default for Keras and TensorFlow models) or raw rows
    (the default for scikit-learn, whose pipelines carry their own scalers). A version that
    would break an ensemble of the repository (another label set or input than its other
    members) is refused, as a server refuses it, unless `allow_breaking` (then a warning).
    Raises ExportError (UsageError for the command line's own mistakes)."""
    if fmt not in ARTIFACTS:
        raise UsageError(f"--format {fmt}: must be one of {', '.join(ARTIFACTS)}")
    if not valid_model_name(name):
        raise UsageError(f"--name {name!r}: a model name is a folder name of letters, digits, '_', '.', '-'")
    if version is not None and version < 1:
        raise UsageError(f"--version {version}: versions start at 1")
    if model_input is not None and model_input not in MODEL_INPUTS:
        raise UsageError(f"--model-input {model_input}: must be one of {', '.join(MODEL_INPUTS)}")
    x_train, x_val = np.asarray(x_train), np.asarray(x_val)
    _check_arrays(x_train, np.asarray(y_train), x_val, np.asarray(y_val))
    if val_indices is not None and len(val_indices) != len(y_val):
        raise ExportError(f"--data: val_indices has {len(val_indices)} entries, y_val {len(y_val)}")
    repository = Path(repository)
    model_dir = repository / name
    version = next_version(model_dir) if version is None else version
    if (model_dir / str(version)).exists():
        raise UsageError(f"--version {version}: {model_dir / str(version)} exists; versions are immutable, "
                         "pick a new one")
    notes: list[str] = []
    found: list[str] = []
    with tqdm(total=len(_STEPS), desc=f"export {name}/{version}", unit="step",
              disable=None if progress else True) as bar:
        def step(done: str) -> None:
            bar.set_postfix_str(done, refresh=False)  # the step just finished
            bar.update(1)

        src: Source = load_source(model, fmt=fmt, input_name=input_name, output=output,
                                  sample=x_train.reshape(len(x_train), -1))
        if fmt not in src.formats:
            raise UsageError(f"--format {fmt}: {src.family} models can be written as "
                             f"{' or '.join(src.formats)} only")
        step("load")
        xt = fit_rows(x_train, src.input_shape, src.input_name, "x_train")
        xv = fit_rows(x_val, src.input_shape, src.input_name, "x_val")
        model_input = model_input or src.hints.default_model_input
        if model_input == "normalised":
            mean, std = normalization_stats(xt)
        else:
            mean, std = np.zeros(xt[0].size), np.ones(xt[0].size)
        step("normalise")
        val_logits = src.predict(normalize(xv, mean, std, src.input_shape))
        train_logits = src.predict(normalize(xt, mean, std, src.input_shape))
        if not (np.all(np.isfinite(val_logits)) and np.all(np.isfinite(train_logits))):
            raise ExportError("the model's logits hold NaN or infinite values on the --data rows")
        n_classes = val_logits.shape[1]
        resolved = resolve_labels(y_train, y_val, n_classes, labels, src.hints.classes)
        y_tr, y_va = resolved.y_train, resolved.y_val
        notes += [f"input '{src.input_name}' float32 {list(src.input_shape)}, {model_input} rows",
                  f"output: {src.output_kind}", f"labels: {', '.join(resolved.names)} (from {resolved.note})"]
        # Would the model do better on the other kind of rows? (It normalises itself, or not.)
        probe = slice(0, min(PROBE_ROWS, len(xt)))
        other = (xt[probe] if model_input == "normalised"
                 else normalize(xt[probe], *normalization_stats(xt), src.input_shape))
        acc_other = calibration.accuracy(src.predict(other), y_tr[probe])
        acc_this = calibration.accuracy(train_logits[probe], y_tr[probe])
        found += checks.normalisation(model_input, acc_this if model_input == "normalised" else acc_other,
                                      acc_other if model_input == "normalised" else acc_this,
                                      src.hints.normalisation_layers)
        step("predict")
        temperature = calibration.fit_temperature(val_logits, y_va)
        val_probs = calibration.softmax(val_logits, temperature)
        validation = Validation(
            n=len(y_va),
            uncalibrated=SplitMetrics(**calibration.metrics(val_logits, y_va)),
            calibrated=SplitMetrics(**calibration.metrics(val_logits, y_va, temperature)),
            indices=tuple(int(i) for i in (range(len(y_va)) if val_indices is None else val_indices)),
            labels=tuple(int(y) for y in y_va),
            probabilities=tuple(tuple(float(p) for p in row) for row in val_probs))
        found += [w for w in (checks.temperature_bound(temperature),
                              checks.accuracy_gap(calibration.accuracy(train_logits, y_tr),
                                                  validation.uncalibrated.accuracy)) if w]
        step("calibrate")
        drift = reference.build_reference(x_train, calibration.softmax(train_logits, temperature),
                                          input_name=src.input_name, seed=seed or 0)
        step("reference")

        def write(folder: Path) -> None:
            folder.chmod(0o755)
            in_name, out_name = src.write(fmt, folder / ARTIFACTS[fmt])
            if fmt == "onnx":
                _verify_onnx(folder / ARTIFACTS[fmt], in_name, out_name,
                             normalize(xv, mean, std, src.input_shape), val_logits)
            step("checkpoint")
            manifest = VariantManifest(
                schema_version=SCHEMA_VERSION, name=name, version=version, framework=fmt,
                artifact=ARTIFACTS[fmt],
                inputs=(TensorSpec(name=in_name, dtype="float32", shape=src.input_shape),),
                outputs=(TensorSpec(name=out_name, dtype="float32", shape=(-1, n_classes)),),
                labels=resolved.names,
                normalization=Normalization(mean=tuple(map(float, mean)), std=tuple(map(float, std))),
                calibration=Calibration(temperature=temperature),
                validation=validation, drift_reference=drift,
                provenance=Provenance(source=source or src.family, architecture=architecture, seed=seed,
                                      exported_at=_exported_at(), train_n=len(x_train),
                                      quorum_version=__version__, family=src.family,
                                      output=src.output_kind, model_input=model_input),
                warnings=tuple(found))
            manifest = _check_ensembles(repository, manifest, allow_breaking, found)
            manifest.save(folder)
            written.append(manifest)

        written: list[VariantManifest] = []
        path = _publish(repository, name, version, write)
        step("publish")
    return ExportResult(path, written[0], tuple(notes), tuple(found))


def _check_ensembles(repository: Path, manifest: VariantManifest, allow_breaking: bool,
                     found: list[str]) -> VariantManifest:
    """ExportError when the new version would break an ensemble of the repository (a server
    would refuse it); with `allow_breaking`, a warning (added to `found` and the manifest)."""
    broken = ensembles_broken_by(repository, manifest)
    if not broken:
        return manifest
    what = (f"{manifest.name} version {manifest.version} would break "
            + "; ".join(str(e) for e in broken)
            + f": a server refuses it and keeps serving the {manifest.name} version before it")
    if not allow_breaking:
        raise ExportError(f"{what}. Export it with the labels and input the other members have, or pass "
                          "--allow-breaking to write it anyway (see docs/repository.md)")
    found.append(what)
    return manifest.model_copy(update={"warnings": tuple(found)})


def export_variant(model: Any, **kwargs: Any) -> Path:
    """export_model, returning only the version folder (see export_model for the arguments)."""
    return export_model(model, **kwargs).path
