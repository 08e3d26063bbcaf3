"""The stages of one request (queueing, each member's compute, the vote), for its trace.

Set per RPC by the API layer only when the RPC's span is sampled (`collecting`); the batcher
and the data plane `record` into it. Unsampled requests pay one context-variable read per
member call and nothing else. Times are time.monotonic() seconds; the tracer converts them.
Nothing here imports OpenTelemetry, so the layers below the API stay free of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Stage:
    """One timed step of a request (time.monotonic() instants)."""

    name: str
    start: float
    end: float
    attributes: Mapping[str, Any] = field(default_factory=dict)
    children: tuple["Stage", ...] = ()


COLLECTOR: ContextVar[list[Stage] | None] = ContextVar("quorum_stages", default=None)
"""The current request's stages, or None when its trace is not sampled."""
ATTRIBUTES: ContextVar[dict[str, Any] | None] = ContextVar("quorum_span_attributes", default=None)
"""Attributes for the current request's span (model, version...), or None when not sampled."""


def record(stage: Stage) -> None:
    """Add `stage` to the current request's trace, if it is being traced."""
    stages = COLLECTOR.get()
    if stages is not None:
        stages.append(stage)


def annotate(attributes: Mapping[str, Any]) -> None:
    """Add `attributes` to the current request's span, if it is being traced."""
    found = ATTRIBUTES.get()
    if found is not None:
        found.update(attributes)
