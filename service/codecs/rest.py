"""JSON tensors of the REST APIs <-> numpy arrays.

KServe v2 REST: a tensor is `{"name", "datatype", "shape", "data"}` with `data` flat or
nested in row-major order, or, with the binary tensor data extension, its bytes after the
JSON header (`"parameters": {"binary_data_size": N}`), raw as in the gRPC protocol.
TF Serving REST: values are nested lists without a dtype; they take the model's dtype.

Every check compares what the client declared with what it sent before anything sized
by the declaration is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.codecs.dtypes import DType, bytes_elements, from_numpy, from_v2
from service.codecs.v2 import check_shape, decode_raw, encode_raw
from service.errors import InvalidInput

# JSON values (as json.loads makes them) each dtype kind accepts.
_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}


def values_array(what: str, data: Any, dtype: np.dtype) -> np.ndarray:
    """JSON numbers (nested lists or one value) as an array of `dtype`, no silent casts:
    a float is no integer, a bool no number, a value out of range an error."""
    try:
        parsed = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise InvalidInput(f"{what}: data is not a rectangular array ({exc})") from None
    if dtype.kind == "O":
        if parsed.size and parsed.dtype.kind != "U":
            raise InvalidInput(f"{what}: BYTES data must be strings")
        array = np.empty(parsed.shape, dtype=object)
        array.ravel()[:] = [s.encode("utf-8") for s in parsed.ravel().tolist()]
        return array
    if parsed.size == 0:
        return parsed.astype(dtype)
    if parsed.dtype.kind not in _KINDS[dtype.kind]:
        got = {"U": "strings", "b": "booleans", "O": "mixed values", "f": "non-integers"}.get(
            parsed.dtype.kind, str(parsed.dtype))
        raise InvalidInput(f"{what}: {np.dtype(dtype).name} data holds {got}")
    array = parsed.astype(dtype)
    if parsed.dtype.kind in "iu" and dtype.kind in "iu" and not np.array_equal(array, parsed):
        raise InvalidInput(f"{what}: data holds values out of range for {np.dtype(dtype).name}")
    return array


def decode_v2_input(tensor: Any, binary: memoryview | None) -> tuple[str, np.ndarray]:
    """One entry of a v2 request's "inputs" (its binary data, if any, already sliced off)."""
    if not isinstance(tensor, dict):
        raise InvalidInput("each entry of 'inputs' must be an object with name, datatype, shape, data")
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput("an input has no 'name'")
    what = f"input {name!r}"
    dtype = _dtype(what, tensor.get("datatype"))
    shape = _shape(what, tensor.get("shape"))
    if binary is not None:
        if "data" in tensor:
            raise InvalidInput(f"{what}: has both 'data' and binary_data_size")
        return name, decode_raw(what, dtype, shape, binary)
    if "data" not in tensor:
        raise InvalidInput(f"{what}: no 'data' (or 'parameters': {{'binary_data_size': N}})")
    array = values_array(what, tensor["data"], dtype.numpy)
    count = math.prod(shape)
    if array.size != count:
        raise InvalidInput(f"{what}: data has {array.size} elements but shape {list(shape)} needs {count}")
    return name, array.reshape(shape)


def binary_size(tensor: Any) -> int | None:
    """The `binary_data_size` a v2 input declares, or None when it carries JSON data."""
    parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
    if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
        return None
    size = parameters["binary_data_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"input {tensor.get('name')!r}: binary_data_size must be a non-negative integer")
    return size


def encode_v2_output(name: str, array: np.ndarray, binary: bool) -> tuple[dict, bytes | None]:
    """A v2 response tensor: JSON data, or its raw bytes to append after the header."""
    dtype = from_numpy(array.dtype)
    tensor: dict[str, Any] = {"name": name, "datatype": dtype.v2, "shape": list(array.shape)}
    if binary:
        raw = encode_raw(array)
        tensor["parameters"] = {"binary_data_size": len(raw)}
        return tensor, raw
    tensor["data"] = json_values(array)
    return tensor, None


def json_values(array: np.ndarray) -> list:
    """An array as (nested) JSON values; BYTES as UTF-8 text."""
    if from_numpy(array.dtype).is_bytes:
        flat = [b.decode("utf-8", "replace") for b in bytes_elements(array)]
        return np.asarray(flat, dtype=object).reshape(array.shape).tolist() if array.ndim > 1 else flat
    return array.tolist()


def _dtype(what: str, name: Any) -> DType:
    if not isinstance(name, str):
        raise InvalidInput(f"{what}: 'datatype' must be a string such as \"FP32\"")
    try:
        return from_v2(name)
    except InvalidInput as error:
        raise InvalidInput(f"{what}: {error}") from None


def _shape(what: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"{what}: 'shape' must be a list of integers")
    return check_shape(what, shape)


def tf_rows(what: str, values: Sequence[Any], dtype: np.dtype) -> np.ndarray:
    """TF Serving REST values for one input (a list of rows) as an array of the model's dtype."""
    if isinstance(values, dict):
        raise InvalidInput(f"{what}: expected a list of values, got an object"
                           + (" (binary {\"b64\": ...} values are for string inputs)" if "b64" in values else ""))
    return values_array(what, values, dtype)
