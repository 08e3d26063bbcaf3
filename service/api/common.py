"""Helpers every servicer shares: deadlines from the call, picking the model's input."""

from __future__ import annotations

import time
from collections.abc import Mapping

import grpc
import numpy as np

from service.dataplane import ModelInfo
from service.errors import InvalidInput


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's gRPC deadline as an absolute time.monotonic() instant."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def model_rows(info: ModelInfo, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The one input tensor the model takes, checked against its name, dtype and shape.

    The dtype must match exactly (no silent casts); the shape must be the model's with any
    batch size, or rows flattened to (batch, features). NaN and Inf are rejected: a NaN
    pixel would otherwise become some class with a confident-looking probability.
    """
    spec = info.input
    if spec.name not in inputs:
        raise InvalidInput(f"model '{info.name}' needs input '{spec.name}', got {sorted(inputs) or 'none'}")
    extra = sorted(set(inputs) - {spec.name})
    if extra:
        raise InvalidInput(f"model '{info.name}' has no input {extra[0]!r} (its input is '{spec.name}')")
    rows = inputs[spec.name]
    if rows.dtype != np.dtype(spec.dtype):
        raise InvalidInput(f"model '{info.name}' input '{spec.name}' must be {spec.dtype}, got {rows.dtype}")
    row_shape = tuple(spec.shape[1:])
    features = int(np.prod(row_shape))
    if rows.ndim == 0 or (tuple(rows.shape[1:]) != row_shape and tuple(rows.shape[1:]) != (features,)):
        raise InvalidInput(
            f"model '{info.name}' input '{spec.name}' must have shape {list(spec.shape)} "
            f"(or [-1, {features}]), got {list(rows.shape)}")
    if rows.shape[0] == 0:
        raise InvalidInput(f"model '{info.name}' input '{spec.name}' is an empty batch")
    if rows.shape[0] > info.max_batch_size:
        raise InvalidInput(
            f"model '{info.name}' input '{spec.name}' has {rows.shape[0]} rows, more than the "
            f"max batch size {info.max_batch_size}; split the request")
    if rows.dtype.kind == "f" and not np.isfinite(rows).all():
        raise InvalidInput(f"model '{info.name}' input '{spec.name}' holds NaN or Inf values")
    return rows
