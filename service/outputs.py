"""The tensors every model answers with, defined once.

Each protocol's metadata (KServe v2 ModelMetadata, Triton's ModelConfig, TF Serving's
signature) is derived from these, and every front names an answer's tensors with
`tensors`. An ensemble answers with the vote; a single model with the vote and its logits.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service.errors import InvalidInput

if TYPE_CHECKING:
    from service.results import InferenceResult


@dataclass(frozen=True)
class Output:
    name: str
    dtype: np.dtype
    """What the answer holds (object: label strings, BYTES / DT_STRING on the wire)."""
    per_class: bool
    """Shape (rows, classes); otherwise (rows,)."""
    description: str

    def shape(self, classes: int) -> tuple[int, ...]:
        """The shape with -1 for the rows, as metadata gives it."""
        return (-1, classes) if self.per_class else (-1,)


_F32, _I64, _STR = np.dtype(np.float32), np.dtype(np.int64), np.dtype(object)
ENSEMBLE_OUTPUTS = (
    Output("probabilities", _F32, True, "calibrated probability of each class"),
    Output("label", _STR, False, "the winning class's label"),
    Output("class_index", _I64, False, "the winning class's index"),
    Output("confidence", _F32, False, "the winning class's calibrated probability"),
    Output("agreement", _F32, False, "share of answering members whose own vote is the winner"),
)
SINGLE_OUTPUTS = ENSEMBLE_OUTPUTS[:-1] + (Output("logits", _F32, True, "the model's raw scores"),)
_BOOL = np.dtype(np.bool_)
UNCERTAINTY_OUTPUTS = (  # answered when a request asks a coverage or a risk (or the model sets a default coverage)
    Output("prediction_set", _BOOL, True, "the classes in the row's conformal prediction set, in label order"),
    Output("set_size", _I64, False, "how many classes the prediction set holds"),
    Output("abstained", _BOOL, False, "the answer would exceed the asked max_risk: the label is given, marked"),
)
UNCERTAINTY_NAMES = frozenset(o.name for o in UNCERTAINTY_OUTPUTS)
BY_NAME = {o.name: o for o in SINGLE_OUTPUTS + ENSEMBLE_OUTPUTS + UNCERTAINTY_OUTPUTS}


def outputs_of(kind: str, sets: bool = False) -> tuple[Output, ...]:
    """The outputs a model of `kind` ("ensemble", or "model" for a single model) answers
    every request with, as its metadata lists them: with `sets` (the model sets a default
    coverage), prediction_set and set_size too. A client that asks every output metadata
    lists gets an answer; the uncertainty outputs a request asks for by name are answered
    whenever its coverage or max_risk is given."""
    base = ENSEMBLE_OUTPUTS if kind == "ensemble" else SINGLE_OUTPUTS
    return base + UNCERTAINTY_OUTPUTS[:2] if sets else base


def output_names(kind: str) -> tuple[str, ...]:
    return _NAMES[kind == "ensemble"]


_NAMES = {True: tuple(o.name for o in ENSEMBLE_OUTPUTS + UNCERTAINTY_OUTPUTS),
          False: tuple(o.name for o in SINGLE_OUTPUTS + UNCERTAINTY_OUTPUTS)}


def check_requested(model: str, kind: str, requested: Sequence[str]) -> None:
    """InvalidInput naming the first requested output the model does not have: checked
    before the request is queued, so a request that cannot be answered costs no inference."""
    names = output_names(kind)
    for name in requested:
        if name not in names:
            raise InvalidInput(f"model '{model}' has no output {name[:64]!r}; outputs are {list(names)}")


@functools.lru_cache(maxsize=256)
def _label_array(labels: tuple[str, ...]) -> np.ndarray:
    """The labels as an object array, made once per label set (indexed per request)."""
    return np.asarray(labels, dtype=object)


def tensors(result: "InferenceResult", requested: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The answer's tensors by name: all of the model's, or the `requested` ones (checked
    by check_requested beforehand). Views of the vote where its dtype already fits."""
    vote = result.vote
    out: dict[str, np.ndarray] = {}
    kind = "model" if result.logits is not None else "ensemble"
    for name in requested or [n for n in output_names(kind) if n not in UNCERTAINTY_NAMES]:
        if name == "probabilities":
            out[name] = vote.probabilities.astype(np.float32, copy=False)
        elif name == "label":
            out[name] = _label_array(result.labels)[vote.label_index]
        elif name == "class_index":
            out[name] = vote.label_index.astype(np.int64, copy=False)
        elif name == "confidence":
            out[name] = vote.confidence.astype(np.float32, copy=False)
        elif name == "agreement":
            out[name] = vote.agreement.astype(np.float32, copy=False)
        elif name == "logits" and result.logits is not None:
            out[name] = np.asarray(result.logits, dtype=np.float32)
        else:  # a bug of ours: the front checked the names first
            raise ValueError(f"model '{result.model}' has no output {name!r}")
    return out
