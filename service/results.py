"""What the data plane answers: a request's result (the vote, each member's part, the uncertainty
outputs), a model's metadata for its callers, and one request's rows of a batch's result."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.ensemble.voting import Vote
from service.objectives.store import Uncertain
from service.repository.manifest import TensorSpec


@dataclass(frozen=True)
class MemberResult:
    name: str
    version: int
    device: str
    latency_s: float
    in_time: bool
    error: str = ""


@dataclass(frozen=True)
class InferenceResult:
    model: str
    version: int
    policy: str
    labels: tuple[str, ...]
    vote: Vote
    members: tuple[MemberResult, ...]
    left_out: tuple[str, ...]
    member_probabilities: np.ndarray
    """(M, n, C) each answering member's calibrated probabilities, in vote.members order."""
    logits: np.ndarray | None = None
    """The model's raw logits, for a single model only (an ensemble has no single set)."""
    inputs: np.ndarray | None = None
    """The request's input rows (a reference, for drift monitoring)."""
    vote_s: float = 0.0
    """Seconds spent calibrating and voting."""
    shadow: dict[str, tuple[int, asyncio.Task]] = dataclasses.field(default_factory=dict)
    """Members asked in the background (exploration): member -> (version, task giving its
    calibrated probabilities, or None if it failed)."""
    uncertain_outputs: dict[str, np.ndarray] | None = None
    """prediction_set, set_size and abstained as the batch's requests asked them (one
    coverage and risk per batch: they are in its key), computed once per batch."""
    uncertain: Uncertain | None = None
    """The sets and abstentions one request's answer carried (its feedback scores them)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a client needs to call a model: its input, labels and versions."""

    name: str
    kind: str
    versions: tuple[int, ...]
    input: TensorSpec
    labels: tuple[str, ...]
    members: tuple[str, ...]
    policy: str
    max_batch_size: int
    """Rows the model computes in one batch (larger requests are split into such pieces)."""
    max_request_rows: int = 65536
    """Most rows one request may carry (the max_request_rows setting)."""
    default_coverage: float | None = None
    """The coverage of the prediction sets every answer carries (its configuration's), if any."""
    row_shape: tuple[int, ...] = dataclasses.field(init=False)
    """One row's shape (the input's, less its batch dimension)."""
    features: int = dataclasses.field(init=False)
    """Values in one row (a request may also send rows flattened to this many)."""

    def __post_init__(self) -> None:  # once per serving state, not per request
        object.__setattr__(self, "row_shape", tuple(self.input.shape[1:]))
        object.__setattr__(self, "features", math.prod(self.row_shape))


class AnswerObserver(Protocol):
    def on_answers(self, result: InferenceResult, spans: Sequence[tuple[int, int]]) -> None:
        """One batch's result (all its rows) and the rows [start, stop) of each request
        answered from it: the per-request metrics and drift of the batch, recorded at once."""


def result_rows(result: InferenceResult, start: int, stop: int) -> InferenceResult:
    """Rows [start, stop) of a batch's result: one request's answer (views, no copies)."""
    v = result.vote
    vote_rows = Vote(v.policy, v.label_index[start:stop], v.probabilities[start:stop], v.confidence[start:stop],
                     v.agreement[start:stop], v.member_labels[:, start:stop], v.member_weights[:, start:stop],
                     v.members)
    # built directly: dataclasses.replace introspects the fields on every call (per request)
    return InferenceResult(
        result.model, result.version, result.policy, result.labels, vote_rows, result.members, result.left_out,
        result.member_probabilities[:, start:stop], None if result.logits is None else result.logits[start:stop],
        None if result.inputs is None else result.inputs[start:stop], result.vote_s, result.shadow,
        None if result.uncertain_outputs is None else {k: v[start:stop] for k, v in result.uncertain_outputs.items()})
