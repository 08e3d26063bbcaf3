"""variant.json: the manifest the export tool writes next to every checkpoint.

It describes the checkpoint's graph inputs and outputs, and carries everything the server
needs beyond the weights: frozen normalisation statistics, the calibration temperature,
validation results (for offline ensemble selection) and the training-data drift reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import ManifestError

SCHEMA_VERSION = 1
MANIFEST_FILE = "variant.json"

DType = Literal[
    "float16", "float32", "float64", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool", "string",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorSpec(_Frozen):
    """A graph input or output; -1 marks a dynamic dimension (the batch)."""

    name: str = Field(min_length=1)
    dtype: DType
    shape: tuple[int, ...]


class Normalization(_Frozen):
    """Per-feature statistics of the training split, applied row-wise before the model:
    x' = (x - mean) / std. Frozen at export, so a row's output never depends on its batch."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @model_validator(mode="after")
    def _check(self) -> "Normalization":
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive (export floors it)")
        return self


class Calibration(_Frozen):
    method: Literal["temperature"] = "temperature"
    temperature: float = Field(gt=0)


class SplitMetrics(_Frozen):
    accuracy: float = Field(ge=0, le=1)
    nll: float = Field(ge=0)
    ece: float = Field(ge=0, le=1)


class Validation(_Frozen):
    """Results on the validation split. `probabilities` are calibrated, one row per example,
    in the order of `labels`; `indices` identify the examples (e.g. into the source data set)
    so that members of one ensemble can be replayed together."""

    n: int = Field(gt=0)
    uncalibrated: SplitMetrics
    calibrated: SplitMetrics
    indices: tuple[int, ...]
    labels: tuple[int, ...]
    probabilities: tuple[tuple[float, ...], ...]

    @model_validator(mode="after")
    def _check(self) -> "Validation":
        if not (len(self.indices) == len(self.labels) == len(self.probabilities) == self.n):
            raise ValueError("indices, labels and probabilities must each have n entries")
        return self


class Histogram(_Frozen):
    """Counts over fixed bin edges (len(counts) == len(bin_edges) - 1). Live values outside
    the edges are clipped into the first or last bin, so the edges are open-ended."""

    bin_edges: tuple[float, ...]
    counts: tuple[int, ...]

    @model_validator(mode="after")
    def _check(self) -> "Histogram":
        if len(self.bin_edges) < 2 or len(self.counts) != len(self.bin_edges) - 1:
            raise ValueError("need len(counts) == len(bin_edges) - 1 >= 1")
        if any(b <= a for a, b in zip(self.bin_edges, self.bin_edges[1:])):
            raise ValueError("bin_edges must be increasing")
        return self


class FeatureReference(_Frozen):
    """One monitored input signal: a raw feature (`statistic: value`, `index` into the
    flattened row) or a per-row summary (`row_mean`, `row_std`) for wide inputs."""

    name: str
    statistic: Literal["value", "row_mean", "row_std"] = "value"
    index: int | None = None
    histogram: Histogram

    @model_validator(mode="after")
    def _check(self) -> "FeatureReference":
        if (self.statistic == "value") != (self.index is not None):
            raise ValueError("index is required for statistic 'value' and only for it")
        return self


class DriftReference(_Frozen):
    """Training-split reference distributions for drift monitoring."""

    n: int = Field(gt=0)
    features: tuple[FeatureReference, ...]
    predicted_class_frequencies: tuple[float, ...]
    confidence: Histogram
    confidence_sample: tuple[float, ...] = Field(
        description="a fixed random subsample of training confidences, for the KS test")


class Provenance(_Frozen):
    """Where the checkpoint came from; informational."""

    source: str
    architecture: str = ""
    seed: int | None = None
    exported_at: str = ""
    train_n: int = 0
    quorum_version: str = ""
    family: str = Field("", description="what was exported: keras, savedmodel, onnx or sklearn")
    output: str = Field("", description=(
        "what the exported logits are: the model's own logits, the logits before its softmax or "
        "sigmoid head, or the log of its probabilities"))
    model_input: Literal["normalised", "raw", ""] = Field("", description=(
        "what the model takes: normalised rows, or raw rows (normalization is then the identity)"))


class VariantManifest(_Frozen):
    schema_version: int
    name: str = Field(min_length=1)
    version: int = Field(ge=1)
    framework: Literal["onnx", "savedmodel"]
    artifact: str = Field(description="file or folder in the version folder holding the checkpoint")
    signature: str = Field("serving_default", description="SavedModel signature to serve")
    inputs: tuple[TensorSpec, ...] = Field(min_length=1, max_length=1)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1, max_length=1)
    output_kind: Literal["logits"] = "logits"
    labels: tuple[str, ...] = Field(min_length=2)
    max_batch_size: int = Field(64, ge=1)
    normalization: Normalization
    calibration: Calibration
    validation: Validation
    drift_reference: DriftReference
    provenance: Provenance
    warnings: tuple[str, ...] = Field((), description="what the export warned about")

    @model_validator(mode="after")
    def _check(self) -> "VariantManifest":
        n_features = feature_count(self.inputs[0])
        if len(self.normalization.mean) != n_features:
            raise ValueError(
                f"normalization has {len(self.normalization.mean)} features, "
                f"input '{self.inputs[0].name}' has {n_features}")
        n_classes = self.outputs[0].shape[-1]
        if n_classes != len(self.labels):
            raise ValueError(f"output has {n_classes} classes but {len(self.labels)} labels")
        return self

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def output(self) -> TensorSpec:
        return self.outputs[0]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_FILE
        path.write_text(self.model_dump_json(indent=1))
        return path


def feature_count(spec: TensorSpec) -> int:
    """Features per row: the product of the non-batch dimensions."""
    count = 1
    for dim in spec.shape[1:]:
        if dim < 1:
            raise ValueError(f"input '{spec.name}' must have static non-batch dims, got {spec.shape}")
        count *= dim
    return count


def load_manifest(folder: Path) -> VariantManifest:
    """Read and validate `folder/variant.json`; errors name the folder and the field."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(str(folder), MANIFEST_FILE, f"is missing: there is no file {path} (every version "
                            "folder needs the manifest that quorum export writes)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(str(folder), MANIFEST_FILE, f"is not readable JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ManifestError(str(folder), MANIFEST_FILE, "must hold a JSON object")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(
            str(folder), "schema_version",
            f"unsupported schema version {version!r} (this server reads {SCHEMA_VERSION})")
    try:
        manifest = VariantManifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise ManifestError(str(folder), field, first["msg"]) from exc
    if not (folder / manifest.artifact).exists():
        raise ManifestError(str(folder), "artifact", f"'{manifest.artifact}' is missing")
    return manifest


def load_version_manifest(folder: Path) -> tuple[VariantManifest, str]:
    """A version folder's manifest as it is served: the folder names the model (its parent's
    name) and the version (its own name), as in TF Serving. A manifest that names another
    model or version (a version folder copied to a new number, or to another model) is served
    as the folder's; what it names is returned as provenance, "" when it names the folder."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    name, version = folder.parent.name, int(folder.name)
    if (manifest.name, manifest.version) == (name, version):
        return manifest, ""
    origin = f"{manifest.name} version {manifest.version}"
    return manifest.model_copy(update={"name": name, "version": version}), origin
