"""The one way a front (gRPC or HTTP) asks the data plane for an answer: decoded tensors in,
the result and its named output tensors out, with statistics, metrics and feedback recorded."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.api.common import model_rows
from service.api.context import ApiContext
from service.api.priority import asked as asked_priority, priority_of
from service.results import InferenceResult, ModelInfo
from service.errors import ModelNotFound, QuorumError
from service.objectives.store import Uncertain
from service.outputs import UNCERTAINTY_NAMES, check_requested, tensors as named_tensors


@dataclass(frozen=True)
class Answer:
    result: InferenceResult
    tensors: dict[str, np.ndarray]
    rows: int


async def infer(api: ApiContext, model: str, inputs: Mapping[str, np.ndarray], *,
                version: int | None = None, deadline: float | None = None,
                outputs: Sequence[str] = (), request_id: str = "",
                rows: np.ndarray | None = None, info: ModelInfo | None = None,
                declared_checked: bool = False, coverage: float | None = None,
                max_risk: float | None = None, priority: object = None) -> Answer:
    """Validate `inputs` against the model (or take prepared `rows`), infer, and name the
    outputs (all of them unless `outputs` asks for some). `deadline` is time.monotonic();
    `info`: the model's, when the caller already has it; `declared_checked`: the caller
    checked the inputs' declared names, dtypes and shapes (check_declared) before decoding.
    `coverage` and `max_risk` ask for prediction sets and abstention (service/uncertainties.py).
    `priority`: the level the request asks, as its protocol carries it (service/api/priority.py)."""
    start = time.perf_counter()
    info = info or api.data.info(model)
    check_requested(model, info.kind, outputs)  # before any inference
    level = priority_of(api, model, priority)
    asked = api.data.uncertainties.asked(model, version, coverage, max_risk, list(outputs))
    if rows is None:
        rows = model_rows(info, inputs, declared_checked)
    try:
        with asked_priority(level):
            result = await api.data.infer(model, rows, version=version, deadline=deadline,
                                          asked=asked if asked.anything else None)
    except QuorumError:
        api.on_failure(model, time.perf_counter() - start)
        raise
    tensors = named_tensors(result, [o for o in outputs if o not in UNCERTAINTY_NAMES])
    if asked.anything:
        uncertain = api.data.uncertainties.answer(result, asked)
        if outputs:  # in the order asked
            tensors = {o: tensors[o] if o in tensors else uncertain[o] for o in outputs}
        else:
            tensors.update(uncertain)
        if request_id:  # kept for feedback, which needs the request's id
            result = dataclasses.replace(result, uncertain=Uncertain(
                asked.coverage, uncertain.get("prediction_set"), asked.max_risk, uncertain.get("abstained")))
    if request_id:
        api.feedback.record(request_id, result)
    api.on_inference(result, rows.shape[0], time.perf_counter() - start)
    return Answer(result, tensors, rows.shape[0])


def labelled_version(api: ApiContext, model: str, label: str) -> int:
    """The version a label (model.yaml's version_labels) points at; NOT_FOUND naming it."""
    variant = api.manager.variants.get(model)
    labels = variant.config.version_labels if variant else {}
    if label not in labels:
        raise ModelNotFound(f"model '{model}' has no version label '{label}'")
    return labels[label]
