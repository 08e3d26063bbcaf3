"""Helpers every servicer shares: deadlines from the call, picking the model's input."""

from __future__ import annotations

import time
from collections.abc import Mapping

import grpc
import numpy as np

from service.results import ModelInfo
from service.errors import InvalidInput


NO_DEADLINE_S = 1e9
"""More time remaining than this (31 years) means the call has no deadline: grpcio says None,
pygrpc-native 0.5 says 9.2e18 (INT64_MAX nanoseconds)."""


def remaining_s(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds until the call's deadline; None when it has none (on either engine)."""
    remaining = context.time_remaining()
    return None if remaining is None or not remaining < NO_DEADLINE_S else remaining


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's gRPC deadline as an absolute time.monotonic() instant (None: none set)."""
    remaining = remaining_s(context)
    return None if remaining is None else time.monotonic() + remaining


def check_declared(info: ModelInfo, declared: Mapping[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
    """The inputs a request declares (name -> (dtype, shape)), checked against the model's
    input before anything is decoded: nothing is allocated for an input the model does not
    take, or for a shape it would refuse, whatever the declared size."""
    spec = info.input
    if spec.name not in declared:
        raise InvalidInput(f"model '{info.name}' needs input '{spec.name}', got {sorted(declared)[:8] or 'none'}")
    extra = sorted(set(declared) - {spec.name})
    if extra:
        raise InvalidInput(f"model '{info.name}' has no input {extra[0][:64]!r} (its input is '{spec.name}')")
    dtype, shape = declared[spec.name]
    if dtype != np.dtype(spec.dtype):
        raise InvalidInput(f"model '{info.name}' input '{spec.name}' must be {spec.dtype}, got {dtype}")
    row_shape, features = info.row_shape, info.features
    if len(shape) == 0 or (tuple(shape[1:]) != row_shape and tuple(shape[1:]) != (features,)):
        raise InvalidInput(
            f"model '{info.name}' input '{spec.name}' must have shape {list(spec.shape)} "
            f"(or [-1, {features}]), got {list(shape)}")
    if shape[0] == 0:
        raise InvalidInput(f"model '{info.name}' input '{spec.name}' is an empty batch")
    if shape[0] > info.max_request_rows:
        raise InvalidInput(
            f"model '{info.name}' input '{spec.name}' has {shape[0]} rows, more than "
            f"max_request_rows {info.max_request_rows} (QUORUM_MAX_REQUEST_ROWS); split the request")


def model_rows(info: ModelInfo, inputs: Mapping[str, np.ndarray], declared_checked: bool = False) -> np.ndarray:
    """The one input tensor the model takes, checked against its name, dtype and shape
    (unless `declared_checked`: the front checked what the request declared before decoding
    it, and the decoded arrays are what it declared).

    The dtype must match exactly (no silent casts); the shape must be the model's with any
    batch size, or rows flattened to (batch, features). NaN and Inf are rejected: a NaN
    pixel would otherwise become some class with a confident-looking probability.
    """
    if not declared_checked:
        check_declared(info, {name: (array.dtype, tuple(array.shape)) for name, array in inputs.items()})
    rows = inputs[info.input.name]
    if rows.dtype.kind == "f" and not np.isfinite(rows).all():
        raise InvalidInput(f"model '{info.name}' input '{info.input.name}' holds NaN or Inf values")
    return rows


UNCERTAINTY_PARAMETERS = ("coverage", "max_risk")


def fraction_parameters(values: Mapping[str, object]) -> tuple[float | None, float | None]:
    """(coverage, max_risk) from a request's parameters (plain values: JSON, or a v2 gRPC
    InferParameter's chosen field), None when absent; their range is checked by the data plane."""
    out: dict[str, float | None] = {}
    for key in UNCERTAINTY_PARAMETERS:
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InvalidInput(f"parameter '{key}' must be a number strictly between 0 and 1, got {value!r}")
        out[key] = None if value is None else float(value)
    return out["coverage"], out["max_risk"]
