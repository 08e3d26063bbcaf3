"""A request's priority, as every front reads it: the value its protocol carries, checked
against the model's or ensemble's levels (model.yaml / ensemble.yaml), resolved to a level."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from service.api.context import ApiContext
from service.batching.priority import PRIORITY, Priority
from service.errors import InvalidInput

HEADER = "Quorum-Priority"
"""TF Serving REST's way to ask (TF Serving gRPC has no field: the default level applies)."""


def priority_of(api: ApiContext, model: str, value: object) -> Priority | None:
    """The level a request asks (`value`: the wire's; None or 0: the model's default), or
    None when the model has one class and the request asks nothing else. A value out of
    range, negative or not an integer is InvalidInput naming it and the range: refused
    before any inference."""
    ensemble = api.manager.ensemble(model)
    variant = api.manager.variants.get(model) if ensemble is None else None
    config = ensemble.config if ensemble is not None else variant.config if variant is not None else None
    levels = 1 if config is None else config.priority_levels
    if isinstance(value, str):  # an HTTP header, or a v2 string parameter
        text = value.strip()
        value = int(text) if text.isdigit() else value
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= levels):
        raise InvalidInput(
            f"model '{model}': priority {value!r} is out of range: an unsigned integer from 1 (the highest) "
            f"to {levels} (its priority_levels), or 0 for its default level")
    if levels == 1 or config is None:
        return None
    level = value or config.default_priority_level or levels
    return Priority(level, levels, config.priority_reserve)


def _v2(request: Any) -> tuple[str, object]:
    """KServe v2 ModelInfer: the `priority` request parameter (whichever field it set)."""
    parameters = request.parameters
    if not parameters or "priority" not in parameters:
        return request.model_name, None
    value = parameters["priority"]
    return request.model_name, getattr(value, value.WhichOneof("parameter_choice") or "string_param")


READERS: dict[str, Callable[[Any], tuple[str, object]]] = {
    "/inference.GRPCInferenceService/ModelInfer": _v2,
    "/quorum.v1.EnsembleService/Predict": lambda request: (request.model, request.priority),
    "/tensorflow.serving.PredictionService/Predict": lambda request: (request.model_spec.name, None),
    "/tensorflow.serving.PredictionService/Classify": lambda request: (request.model_spec.name, None),
}
"""Per gRPC method, where its request names the model and carries a priority (None: it
carries none, the model's default level applies)."""

EntryPriority = Callable[[Any], "Priority | None"]


def at_entry(api: ApiContext, method: str) -> EntryPriority | None:
    """What reads a call's priority at the RPC's entry, before admission (wrapped_call), for
    `method`'s requests; None for a method that names no model. As priority_of, except that a
    model the server does not know has no level here (its front answers NOT_FOUND)."""
    reader = READERS.get(method)
    if reader is None:
        return None
    manager = api.manager

    def entry(request: Any) -> Priority | None:
        model, value = reader(request)
        if manager.ensemble(model) is None and model not in manager.variants:
            return None
        return priority_of(api, model, value)

    return entry


@contextlib.contextmanager
def asked(priority: Priority | None) -> Iterator[None]:
    """The request's priority for the queue it is about to wait in (see PRIORITY)."""
    if priority is None:
        yield
        return
    token = PRIORITY.set(priority)
    try:
        yield
    finally:
        PRIORITY.reset(token)
