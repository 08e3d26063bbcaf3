"""Bounds on what one request may name, checked at the edge before any work is done.

The message itself is bounded by gRPC's max message size; these bound what the server
would keep or echo from it: model names, request ids (stored with the feedback), version
strings and parameter maps. Errors quote at most a short prefix of what was sent.
"""

from __future__ import annotations

import functools
from typing import Any

from service.errors import InvalidInput

MAX_NAME = 256
"""Longest model name (the repository's folder names are far shorter)."""
MAX_ID = 256
"""Longest request id (a UUID is 36 characters)."""
MAX_PARAMETERS = 64
"""Most entries of a request's (or an input's) parameter map."""
QUOTE = 64
"""Longest prefix of a client's string quoted in an error message."""


def short(text: str, limit: int = QUOTE) -> str:
    """`text` as quoted in an error message: at most `limit` characters, then an ellipsis."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _bounded(what: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidInput(f"{what} is {len(value)} characters, more than {limit}: {short(value)!r}")


_NAMES = ("model_name", "model", "name")
_IDS = ("id", "request_id", "model_version", "version")


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, ...], tuple[str, ...], bool, bool, bool]:
    """Which of the bounded fields a request type has, read once from its protobuf
    descriptor: looking up absent attributes on every request raised and caught an
    AttributeError each (about 3 % of the event loop for one small model)."""
    descriptor = getattr(cls, "DESCRIPTOR", None)
    fields = getattr(descriptor, "fields_by_name", None)
    if descriptor is None or fields is None:  # not a protobuf message: look every attribute up
        return _NAMES, _IDS, True, True, False
    return (tuple(f for f in _NAMES if f in fields), tuple(f for f in _IDS if f in fields),
            "model_spec" in fields, "parameters" in fields,
            descriptor.full_name == "inference.ModelInferRequest")


def check_request(request: Any) -> None:
    """InvalidInput when a request's names, id or parameters exceed the bounds above.
    A few attribute reads per request: every protocol's request messages are covered."""
    # A class is Hashable; mypy takes type[Any] for not (python/mypy#11470).
    names, ids, has_spec, has_parameters, is_v2_infer = _fields(type(request))  # type: ignore[arg-type]
    for field in names:
        value = getattr(request, field, None)
        if isinstance(value, str) and value:
            _bounded(field, value, MAX_NAME)
    spec = getattr(request, "model_spec", None) if has_spec else None
    if spec is not None:
        _bounded("model_spec.name", spec.name, MAX_NAME)
        _bounded("model_spec.version_label", spec.version_label, MAX_NAME)
    for field in ids:
        value = getattr(request, field, None)
        if isinstance(value, str) and value:
            _bounded(field, value, MAX_ID)
    parameters = getattr(request, "parameters", None) if has_parameters else None
    if parameters is not None and len(parameters) > MAX_PARAMETERS:
        raise InvalidInput(f"parameters has {len(parameters)} entries, more than {MAX_PARAMETERS}")
    if not is_v2_infer:
        return
    for tensor in request.inputs:
        if len(tensor.parameters) > MAX_PARAMETERS:
            raise InvalidInput(f"input {short(tensor.name)!r} has {len(tensor.parameters)} parameters, "
                               f"more than {MAX_PARAMETERS}")
        _bounded("input name", tensor.name, MAX_NAME)

