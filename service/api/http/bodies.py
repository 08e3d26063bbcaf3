"""JSON request bodies decoded into arrays: pure functions, run inline for a small body and in
a child process for a large one (service/api/http/offload.py), so they import nothing heavy."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.api.http.json_depth import MAX_DEPTH, nested_deeper_than
from service.codecs import rest
from service.errors import InvalidInput

HEADER_LENGTH = "Inference-Header-Content-Length"
"""Triton's binary tensor extension: the JSON header's length, the binary data after it."""


def parse_json(data: bytes | memoryview, what: str = "request body") -> Any:
    """The parsed document, or InvalidInput (400): not JSON, or nested deeper than MAX_DEPTH
    (checked before parsing: json recurses per level)."""
    data = bytes(data) if isinstance(data, memoryview) else data
    too_deep = f"{what} nests arrays and objects deeper than the limit of {MAX_DEPTH} levels"
    if nested_deeper_than(data, MAX_DEPTH):
        raise InvalidInput(too_deep)
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:  # not reached: the scan above refuses such a document first
        raise InvalidInput(too_deep) from None


@dataclass
class V2Infer:
    """A KServe v2 inference request, decoded."""

    request_id: str
    parameters: dict[str, Any]
    inputs: dict[str, np.ndarray]
    outputs: dict[str, bool]
    """Requested output -> binary or not (empty: every output, `binary_out` each)."""
    binary_out: bool


def v2_infer(header: bytes | memoryview, binary: bytes | memoryview | None) -> V2Infer:
    doc = parse_json(header, "inference request header" if binary is not None else "request body")
    if not isinstance(doc, dict):
        raise InvalidInput("the inference request must be a JSON object")
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    inputs = _v2_inputs(doc.get("inputs"), None if binary is None else memoryview(binary))
    outputs, binary_out = _v2_outputs(doc.get("outputs"), bool(parameters.get("binary_data_output", False)))
    return V2Infer(request_id, parameters, inputs, outputs, binary_out)


def _v2_inputs(entries: Any, binary: memoryview | None) -> dict[str, np.ndarray]:
    if not isinstance(entries, list) or not entries:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    arrays = {}
    offset, available = 0, 0 if binary is None else len(binary)
    for tensor in entries:
        size = rest.binary_size(tensor)
        chunk = None
        if size is not None:
            if binary is None:
                raise InvalidInput(f"input {tensor.get('name')!r} declares binary_data_size but the request "
                                   f"has no {HEADER_LENGTH} header")
            if offset + size > available:
                raise InvalidInput(f"input {tensor.get('name')!r}: binary_data_size {size} runs past the end of "
                                   f"the body ({available - offset} bytes left)")
            chunk = binary[offset:offset + size]
            offset += size
        name, array = rest.decode_v2_input(tensor, chunk)
        if name in arrays:
            raise InvalidInput(f"input {name!r} appears more than once")
        arrays[name] = array
    if offset != available:
        raise InvalidInput(f"the body has {available - offset} bytes after the binary inputs' data "
                           f"(their binary_data_size add up to {offset})")
    return arrays


def _v2_outputs(entries: Any, binary_default: bool) -> tuple[dict[str, bool], bool]:
    if entries is None:
        return {}, binary_default
    if not isinstance(entries, list):
        raise InvalidInput("'outputs' must be a list")
    wanted = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidInput("each entry of 'outputs' must be an object with a 'name'")
        parameters = entry.get("parameters") or {}
        wanted[entry["name"]] = bool(parameters.get("binary_data", binary_default)) if isinstance(
            parameters, dict) else binary_default
    return wanted, binary_default


def tf_object(data: bytes | memoryview) -> dict[str, Any]:
    """A TF Serving REST body: a JSON object."""
    body = parse_json(data)
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    return body


@dataclass
class TfPredict:
    """A TF Serving REST predict request, decoded for a model of one input."""

    signature_name: str
    rows: np.ndarray
    row_format: bool
    """Rows came as `instances` (answered as `predictions`), not columnar `inputs`."""


def tf_predict(data: bytes | memoryview, model: str, input_name: str, dtype: str) -> TfPredict:
    body = tf_object(data)
    rows, row_format = tf_rows(body, model, input_name, np.dtype(dtype))
    return TfPredict(str(body.get("signature_name", "") or ""), rows, row_format)


def tf_rows(body: dict[str, Any], model: str, name: str, dtype: np.dtype) -> tuple[np.ndarray, bool]:
    """The model's input rows from `instances` (row format) or `inputs` (columnar), and
    whether the answer is in row format."""
    if ("instances" in body) == ("inputs" in body):
        raise InvalidInput("the request must have exactly one of 'instances' (row format) or 'inputs' (columnar)")
    what = f"model '{model}' input '{name}'"
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise InvalidInput("'instances' must be a non-empty list, one entry per row")
        if all(isinstance(i, dict) for i in instances):
            for i, instance in enumerate(instances):
                if set(instance) != {name}:
                    raise InvalidInput(f"model '{model}': instance {i} has inputs {sorted(instance)}, "
                                       f"its input is '{name}'")
            instances = [instance[name] for instance in instances]
        elif any(isinstance(i, dict) for i in instances):
            raise InvalidInput("'instances' mixes objects and plain values")
        return rest.tf_rows(what, instances, dtype), True
    inputs = body["inputs"]
    if isinstance(inputs, dict) and "b64" not in inputs:
        if set(inputs) != {name}:
            raise InvalidInput(f"model '{model}' needs input '{name}', got {sorted(inputs)}")
        inputs = inputs[name]
    return rest.tf_rows(what, inputs, dtype), False


def json_size(arrays: Iterable[np.ndarray]) -> int:
    """About how many bytes of JSON these arrays make (a few per element): sizes an answer for
    the decoder's inline-or-child choice before encoding it."""
    return 8 * sum(a.size for a in arrays)


def v2_answer(response: dict[str, Any], outputs: list[tuple[str, np.ndarray, bool]]) -> tuple[bytes, list[bytes]]:
    """A v2 answer: its JSON (with `outputs` added) and the binary outputs' bytes to follow it."""
    tensors, chunks = [], []
    for name, array, binary in outputs:
        tensor, raw = rest.encode_v2_output(name, array, binary)
        tensors.append(tensor)
        if raw is not None:
            chunks.append(raw)
    return json.dumps({**response, "outputs": tensors}, separators=(",", ":")).encode(), chunks


def tf_answer(arrays: dict[str, np.ndarray], row_format: bool) -> bytes:
    """A TF Serving REST predict answer: `predictions` (one object per row) or `outputs`."""
    values = {output: rest.json_values(array) for output, array in arrays.items()}
    if row_format:
        body: dict[str, Any] = {"predictions": [dict(zip(values, row)) for row in zip(*values.values())]}
    else:
        body = {"outputs": values}
    return json.dumps(body, separators=(",", ":")).encode()
