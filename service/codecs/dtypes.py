"""The one dtype table: v2 datatype names <-> TensorFlow DataType enums <-> numpy dtypes.

TensorFlow's DataType values are written out as numbers (they are part of TF's wire
format and never change) so that importing this module does not import TensorFlow;
tests/codecs/test_tensorproto_codec.py checks them against `types_pb2`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.errors import InvalidInput


@dataclass(frozen=True)
class DType:
    """One element type as each protocol names and carries it."""

    v2: str
    """Open Inference Protocol datatype name ("FP32")."""
    numpy: np.dtype
    """numpy dtype of decoded arrays (object, holding bytes, for BYTES)."""
    tf: int
    """TensorFlow `DataType` enum value (DT_FLOAT = 1)."""
    tf_name: str
    """Name of that enum value ("DT_FLOAT")."""
    v2_contents: str | None
    """`InferTensorContents` field for typed elements; None: raw bytes only (FP16)."""
    tf_values: str
    """`TensorProto` typed value field (DT_HALF keeps float16 bit patterns in half_val)."""

    @property
    def is_bytes(self) -> bool:
        """True for variable-length byte strings (v2 BYTES, TF DT_STRING)."""
        return self.numpy == np.object_

    @property
    def itemsize(self) -> int:
        """Bytes per element in raw encodings (0 for BYTES: variable)."""
        return 0 if self.is_bytes else self.numpy.itemsize


TABLE: tuple[DType, ...] = (
    DType("BOOL", np.dtype(np.bool_), 10, "DT_BOOL", "bool_contents", "bool_val"),
    DType("UINT8", np.dtype(np.uint8), 4, "DT_UINT8", "uint_contents", "int_val"),
    DType("UINT16", np.dtype(np.uint16), 17, "DT_UINT16", "uint_contents", "int_val"),
    DType("UINT32", np.dtype(np.uint32), 22, "DT_UINT32", "uint_contents", "uint32_val"),
    DType("UINT64", np.dtype(np.uint64), 23, "DT_UINT64", "uint64_contents", "uint64_val"),
    DType("INT8", np.dtype(np.int8), 6, "DT_INT8", "int_contents", "int_val"),
    DType("INT16", np.dtype(np.int16), 5, "DT_INT16", "int_contents", "int_val"),
    DType("INT32", np.dtype(np.int32), 3, "DT_INT32", "int_contents", "int_val"),
    DType("INT64", np.dtype(np.int64), 9, "DT_INT64", "int64_contents", "int64_val"),
    DType("FP16", np.dtype(np.float16), 19, "DT_HALF", None, "half_val"),
    DType("FP32", np.dtype(np.float32), 1, "DT_FLOAT", "fp32_contents", "float_val"),
    DType("FP64", np.dtype(np.float64), 2, "DT_DOUBLE", "fp64_contents", "double_val"),
    DType("BYTES", np.dtype(np.object_), 7, "DT_STRING", "bytes_contents", "string_val"),
)

_BY_V2 = {d.v2: d for d in TABLE}
_BY_TF = {d.tf: d for d in TABLE}
_BY_NUMPY = {d.numpy: d for d in TABLE}


def from_v2(name: str) -> DType:
    """The entry for a v2 datatype name; InvalidInput when there is none."""
    try:
        return _BY_V2[name]
    except KeyError:
        raise InvalidInput(
            f"unsupported datatype {name!r}; expected one of {', '.join(_BY_V2)}"
        ) from None


def from_tf(enum: int) -> DType:
    """The entry for a TensorFlow DataType enum value; InvalidInput when there is none."""
    try:
        return _BY_TF[enum]
    except KeyError:
        raise InvalidInput(f"unsupported TensorFlow dtype enum {enum}") from None


def from_numpy(dtype: npt.DTypeLike) -> DType:
    """The entry for a numpy dtype (or what np.dtype() takes: a scalar type, a name).
    Fixed-width bytes/str arrays ('S', 'U') map to BYTES."""
    # The common case, a dtype in native byte order: one dict hit (a type or a name
    # would not hash as its dtype does: np.dtype() below).
    entry = _BY_NUMPY.get(dtype) if isinstance(dtype, np.dtype) else None
    if entry is not None:
        return entry
    dtype = np.dtype(dtype)
    if dtype.kind in "SU":
        return _BY_V2["BYTES"]
    try:
        return _BY_NUMPY[dtype.newbyteorder("=")]
    except KeyError:
        raise InvalidInput(f"numpy dtype {dtype} has no protocol datatype") from None


def bytes_elements(array: np.ndarray) -> list[bytes]:
    """Elements of a BYTES-like array as bytes, in row-major order; str becomes UTF-8."""
    return [_to_bytes(x) for x in np.asarray(array).ravel().tolist()]


def _to_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")
