"""TensorFlow `TensorProto` (TF Serving's tensors) <-> numpy arrays, following TF's rules.

Decoding reads `tensor_content` (raw little-endian bytes) with np.frombuffer when it is
set, else the typed value field of the dtype: float_val, double_val, int_val (INT8/16/32,
UINT8/16), int64_val, uint32_val, uint64_val, bool_val, half_val (FP16 bit patterns),
string_val. As in TF, fewer typed values than elements are padded with the last value
(so a single value fills the whole shape) and no values at all mean zeros.

Encoding fills the typed value fields by default, as TF Serving's own responses do
(clients read `outputs[...].float_val`); `use_tensor_content=True` writes raw bytes.

Nothing here imports TensorFlow's protos: `decode` and `encode_into` work on any
TensorProto (service.tf_protos imports them without TensorFlow where they are needed).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from service.codecs.dtypes import DType, bytes_elements, from_numpy, from_tf
from service.errors import InvalidInput

if TYPE_CHECKING:
    from tensorflow.core.framework.tensor_pb2 import TensorProto

# Typed value fields holding narrower types: the dtype they arrive as on the wire.
_WIDE = {"int_val": np.dtype(np.int32), "half_val": np.dtype(np.int32)}
MAX_DIMS = 32
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Largest array a tensor may expand to (the server passes its max message size): TF's
padding rule lets one value fill any declared shape, so the shape alone is bounded."""


def decode(proto: TensorProto, name: str = "", max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """The array a TensorProto holds; `name` (e.g. the input's key) is used in errors.
    InvalidInput, before any allocation, when the declared shape would expand past
    `max_bytes` or does not match tensor_content's size."""
    what = f"tensor {name[:64]!r}" if name else "tensor"
    try:
        dtype = from_tf(proto.dtype)
    except InvalidInput as error:
        raise InvalidInput(f"{what}: {error}") from None
    shape = _shape(what, proto)
    count = math.prod(shape)
    size = count * (dtype.itemsize or 8)  # an object array holds one pointer per element
    if size > max_bytes and not proto.tensor_content:
        raise InvalidInput(
            f"{what}: shape {list(shape)} declares {count} elements ({size} bytes), more than the "
            f"{max_bytes}-byte limit")
    if proto.tensor_content:
        return _from_content(what, dtype, shape, proto.tensor_content)
    used = [field.name for field, _ in proto.ListFields() if field.name.endswith("_val")]
    wrong = [field for field in used if field != dtype.tf_values]
    if wrong:
        raise InvalidInput(
            f"{what}: dtype {dtype.tf_name} takes its values in {dtype.tf_values}, not {wrong[0]}"
        )
    values = getattr(proto, dtype.tf_values)
    if len(values) > count:
        raise InvalidInput(
            f"{what}: {dtype.tf_values} has {len(values)} values but shape {list(shape)} "
            f"holds {count}"
        )
    flat = _typed_values(what, dtype, values)
    if flat.size == 0:
        flat = np.full(count, b"" if dtype.is_bytes else 0, dtype=dtype.numpy)
    elif flat.size < count:
        flat = np.concatenate([flat, np.full(count - flat.size, flat[-1], dtype=dtype.numpy)])
    return flat.reshape(shape)


def declared(proto: TensorProto, name: str = "") -> tuple[np.dtype, tuple[int, ...]]:
    """The (numpy dtype, shape) a TensorProto declares, read without decoding its values."""
    what = f"tensor {name[:64]!r}" if name else "tensor"
    try:
        dtype = from_tf(proto.dtype)
    except InvalidInput as error:
        raise InvalidInput(f"{what}: {error}") from None
    return dtype.numpy, _shape(what, proto)


def encode_into(array: np.ndarray, proto: TensorProto, *, use_tensor_content: bool = False) -> None:
    """Fill `proto` (e.g. `response.outputs["scores"]`) with `array`, replacing its content."""
    array = np.asarray(array)
    dtype = from_numpy(array.dtype)
    proto.Clear()
    proto.dtype = dtype.tf
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if dtype.is_bytes:
        proto.string_val.extend(bytes_elements(array))
    elif use_tensor_content:
        proto.tensor_content = np.ascontiguousarray(array, dtype=dtype.numpy.newbyteorder("<")).tobytes()
    elif dtype.v2 == "FP16":
        proto.half_val.extend(array.astype(np.float16).ravel().view(np.uint16).tolist())
    else:
        getattr(proto, dtype.tf_values).extend(array.ravel().tolist())


def _shape(what: str, proto: TensorProto) -> tuple[int, ...]:
    if proto.tensor_shape.unknown_rank:
        raise InvalidInput(f"{what}: shape of unknown rank")
    if len(proto.tensor_shape.dim) > MAX_DIMS:
        raise InvalidInput(f"{what}: shape has {len(proto.tensor_shape.dim)} dimensions, more than {MAX_DIMS}")
    shape = tuple(dim.size for dim in proto.tensor_shape.dim)
    if any(size < 0 for size in shape):
        raise InvalidInput(f"{what}: shape {list(shape)} has a negative (unknown) dimension")
    return shape


def _from_content(what: str, dtype: DType, shape: tuple[int, ...], content: bytes) -> np.ndarray:
    if dtype.is_bytes:
        raise InvalidInput(f"{what}: DT_STRING values go in string_val, not tensor_content")
    expected = math.prod(shape) * dtype.itemsize
    if len(content) != expected:
        raise InvalidInput(
            f"{what}: tensor_content is {len(content)} bytes but shape {list(shape)} of "
            f"{dtype.tf_name} needs {expected}"
        )
    array = np.frombuffer(content, dtype=dtype.numpy.newbyteorder("<"))
    return array.astype(dtype.numpy, copy=False).reshape(shape)


def _typed_values(what: str, dtype: DType, values) -> np.ndarray:
    if dtype.is_bytes:
        flat = np.empty(len(values), dtype=object)
        flat[:] = list(values)
        return flat
    wide = np.asarray(values, dtype=_WIDE.get(dtype.tf_values, dtype.numpy))
    if dtype.v2 == "FP16":
        bits = wide.astype(np.uint16)
        if not np.array_equal(bits, wide):
            raise InvalidInput(f"{what}: half_val holds values that are not 16-bit patterns")
        return bits.view(np.float16)
    flat = wide.astype(dtype.numpy, copy=False)
    if flat.dtype != wide.dtype and not np.array_equal(flat, wide):
        raise InvalidInput(f"{what}: {dtype.tf_values} holds values out of range for {dtype.tf_name}")
    return flat
