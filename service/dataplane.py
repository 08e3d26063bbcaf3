"""The data plane: every protocol's servicer calls into this, with numpy in and out.

A single model is served as an ensemble of one, so every answer has the same shape: the
vote (label, calibrated probabilities, confidence, agreement) and each member's part.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.ensemble.fanout import gather_with_deadline
from service.ensemble.voting import Vote, calibrate, vote
from service.errors import DeadlineExceeded, InvalidInput, ModelNotFound, ModelNotReady
from service.repository.config import Policy
from service.repository.manager import ModelManager, ServedVersion
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
    member_confidence: np.ndarray
    """(M, n) each answering member's own calibrated max-probability, in vote.members order."""
    logits: np.ndarray | None = None
    """The model's raw logits, for a single model only (an ensemble has no single set)."""
    inputs: np.ndarray | None = None
    """The request's input rows (a reference, for drift monitoring)."""
    vote_s: float = 0.0
    """Seconds spent calibrating and voting."""


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


class DataPlane:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    # -- inference -------------------------------------------------------------------------
    async def infer(self, model: str, rows: np.ndarray, *, version: int | None = None,
                    deadline: float | None = None, policy: Policy | None = None) -> InferenceResult:
        """Vote of `model` (an ensemble or a single model) on `rows`.

        `deadline` is an absolute time.monotonic() instant; an ensemble votes with the
        members that answered before it (less the ensemble's safety margin)."""
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded(f"model '{model}': the deadline passed before the request started")
        ensemble = self.manager.ensemble(model)
        if ensemble is None:
            return await self._infer_single(model, rows, version, deadline, policy)
        if version not in (None, 0, 1):
            raise ModelNotFound(f"ensemble '{model}' has only version 1")
        if ensemble.config is None:
            raise ModelNotReady(f"ensemble '{model}' is misconfigured: {ensemble.error}")
        if ensemble.unloaded_by_request:
            raise ModelNotReady(f"ensemble '{model}' is unloaded")
        config = ensemble.config
        served = {m: self.manager.resolve(m) for m in config.members}
        first = next(iter(served.values()))
        with contextlib.ExitStack() as leases:
            # Leases are taken now, before the member tasks start, so that a version swap
            # cannot unload a resolved member in between.
            for s in served.values():
                leases.enter_context(s.lease())
            outcomes = await gather_with_deadline(
                {m: s.infer(rows, deadline) for m, s in served.items()},
                deadline=deadline, safety_margin_s=config.deadline_margin_ms / 1000.0,
                quorum=config.quorum)
        return self._combine(model, 1, policy or config.policy, served, outcomes, first, rows)

    async def _infer_single(self, model: str, rows: np.ndarray, version: int | None,
                            deadline: float | None, policy: Policy | None) -> InferenceResult:
        served = self.manager.resolve(model, version)
        start = time.perf_counter()
        logits = await served.infer(rows, deadline)
        latency = time.perf_counter() - start
        start = time.perf_counter()
        probs = calibrate(logits, served.manifest.calibration.temperature)
        result = vote("soft", [probs], [model])
        vote_s = time.perf_counter() - start
        member = MemberResult(model, served.version, served.device, latency, True)
        return InferenceResult(model, served.version, policy or "soft", served.manifest.labels,
                               result, (member,), (), probs.max(axis=1)[None], logits, inputs=rows, vote_s=vote_s)

    def _combine(self, model: str, version: int, policy: Policy,
                 served: dict[str, ServedVersion], outcomes, first: ServedVersion,
                 rows: np.ndarray | None = None) -> InferenceResult:
        start = time.perf_counter()
        answered = [m for m, o in outcomes.items() if o.in_time and o.error is None]
        probs = [calibrate(outcomes[m].result, served[m].manifest.calibration.temperature) for m in answered]
        accuracy = [served[m].manifest.validation.calibrated.accuracy for m in answered]
        result = vote(policy, probs, answered, validation_accuracy=accuracy)
        members = tuple(
            MemberResult(m, served[m].version, served[m].device, o.latency_s,
                         m in answered, "" if o.error is None else str(o.error))
            for m, o in outcomes.items())
        left_out = tuple(m for m in outcomes if m not in answered)
        confidence = np.stack([p.max(axis=1) for p in probs])
        return InferenceResult(model, version, policy, first.manifest.labels, result, members, left_out,
                               confidence, inputs=rows, vote_s=time.perf_counter() - start)

    # -- metadata --------------------------------------------------------------------------
    def info(self, model: str) -> ModelInfo:
        ensemble = self.manager.ensemble(model)
        if ensemble is not None:
            if ensemble.config is None:
                raise ModelNotReady(f"ensemble '{model}' is misconfigured: {ensemble.error}")
            first = self.manager.resolve(ensemble.config.members[0]).manifest
            return ModelInfo(model, "ensemble", (1,), first.input, first.labels,
                             ensemble.config.members, ensemble.config.policy, first.max_batch_size)
        served = self.manager.resolve(model)
        versions = tuple(sorted(v.version for v in self.manager.served_versions() if v.name == model))
        m = served.manifest
        return ModelInfo(model, "model", versions, m.input, m.labels, (model,), "soft", served.batching.max_batch_size)



OUTPUTS_ENSEMBLE = ("probabilities", "label", "class_index", "confidence", "agreement")
OUTPUTS_SINGLE = OUTPUTS_ENSEMBLE[:-1] + ("logits",)


def output_names(kind: str) -> tuple[str, ...]:
    """The tensors a model answers with: the vote, and logits for a single model."""
    return OUTPUTS_ENSEMBLE if kind == "ensemble" else OUTPUTS_SINGLE


def result_tensors(result: InferenceResult, requested: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The result as named tensors; all of them unless some are requested by name."""
    names = OUTPUTS_SINGLE if result.logits is not None else OUTPUTS_ENSEMBLE
    unknown = [n for n in requested if n not in names]
    if unknown:
        raise InvalidInput(f"model '{result.model}' has no output {unknown[0]!r}; outputs are {list(names)}")
    vote = result.vote
    make = {
        "probabilities": lambda: vote.probabilities.astype(np.float32),
        "label": lambda: np.asarray(result.labels, dtype=object)[vote.label_index],
        "class_index": lambda: vote.label_index.astype(np.int64),
        "confidence": lambda: vote.confidence.astype(np.float32),
        "agreement": lambda: vote.agreement.astype(np.float32),
        "logits": lambda: np.asarray(result.logits, dtype=np.float32),
    }
    return {n: make[n]() for n in (requested or names)}
