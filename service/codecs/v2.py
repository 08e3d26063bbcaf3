"""Open Inference Protocol (KServe v2) tensors <-> numpy arrays.

Raw encoding (raw_input_contents / raw_output_contents, and quorum.v1 `Tensor.content`):
elements little-endian, row-major, no padding; BYTES elements each preceded by a
4-byte little-endian length, as tritonclient writes them. Raw numeric data is decoded
with np.frombuffer (a read-only view, no copy); typed contents with one np.asarray over
the repeated field.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from service._proto.inference import grpc_service_pb2 as pb
from service.codecs.dtypes import DType, bytes_elements, from_numpy, from_v2
from service.errors import InvalidInput

InferInputTensor = pb.ModelInferRequest.InferInputTensor
InferOutputTensor = pb.ModelInferResponse.InferOutputTensor

_LENGTH = struct.Struct("<I")
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
# Typed fields that hold narrower integers widened to 32 bits, and their wire dtype.
_WIDE = {"int_contents": np.dtype(np.int32), "uint_contents": np.dtype(np.uint32)}


MAX_DIMS = 32
"""Most dimensions a tensor may declare (numpy's own limit is 64)."""


def check_shape(what: str, shape: Collection[int]) -> tuple[int, ...]:
    """A request tensor's shape as a tuple; InvalidInput on a negative dimension or too many.
    Only the declaration is checked here; each decoder checks it against the payload before
    allocating anything sized by it."""
    if len(shape) > MAX_DIMS:
        raise InvalidInput(f"{what}: shape has {len(shape)} dimensions, more than {MAX_DIMS}")
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise InvalidInput(f"{what}: shape {_shown(dims)} has a negative dimension")
    return dims


def _shown(dims: Sequence[int]) -> str:
    return str(list(dims))


def decode_raw(what: str, dtype: DType, shape: Sequence[int], content: bytes | memoryview) -> np.ndarray:
    """Decode raw bytes of `dtype` and `shape`; `what` names the tensor in errors."""
    count = math.prod(shape)
    if dtype.is_bytes:
        if count * _LENGTH.size > len(content):  # every element has its 4-byte length
            raise InvalidInput(
                f"{what}: BYTES raw content ({len(content)} bytes) cannot hold the {count} elements "
                f"shape {list(shape)} declares (each needs a 4-byte length)")
        return _split_bytes(what, content, count).reshape(shape)
    expected = count * dtype.itemsize
    if len(content) != expected:
        raise InvalidInput(
            f"{what}: raw content is {len(content)} bytes but shape {list(shape)} of "
            f"{dtype.v2} needs {expected} ({count} x {dtype.itemsize})"
        )
    if dtype.v2 == "BOOL":
        as_bytes = np.frombuffer(content, dtype=np.uint8)
        if as_bytes.size and as_bytes.max() > 1:
            raise InvalidInput(f"{what}: BOOL raw content holds bytes other than 0 and 1")
    array = np.frombuffer(content, dtype=dtype.numpy.newbyteorder("<"))
    return array.astype(dtype.numpy, copy=False).reshape(shape)


def encode_raw(array: np.ndarray) -> bytes:
    """The raw encoding of an array (object/str/bytes arrays as length-prefixed BYTES)."""
    dtype = from_numpy(array.dtype)
    if dtype.is_bytes:
        return b"".join(_LENGTH.pack(len(b)) + b for b in bytes_elements(array))
    return np.ascontiguousarray(array, dtype=dtype.numpy.newbyteorder("<")).tobytes()


def decode_input(tensor: InferInputTensor, raw: bytes | None = None) -> np.ndarray:
    """Decode one input tensor, from `raw` when given, else from its typed contents."""
    what = f"input {tensor.name!r}"
    for key in _SHARED_MEMORY:
        if key in tensor.parameters:
            raise InvalidInput(f"{what}: shared-memory inputs are not supported")
    dtype = _dtype(what, tensor.datatype)
    shape = check_shape(what, tensor.shape)
    if raw is not None:
        return decode_raw(what, dtype, shape, raw)
    return _decode_contents(what, dtype, shape, tensor.contents)


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Every input of a request by name, checking the raw/typed rules of the protocol."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send every input raw, or none"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise InvalidInput(f"input {tensor.name!r} appears more than once")
        if raw and tensor.HasField("contents") and tensor.contents.ListFields():
            raise InvalidInput(
                f"input {tensor.name!r} has typed contents while the request uses "
                "raw_input_contents; send every input raw, or none"
            )
        arrays[tensor.name] = decode_input(tensor, raw[index] if raw else None)
    return arrays


def declared_inputs(request: pb.ModelInferRequest) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Each input's declared (numpy dtype, shape), read without decoding any data."""
    declared: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    for tensor in request.inputs:
        what = f"input {tensor.name[:64]!r}"
        if tensor.name in declared:
            raise InvalidInput(f"{what} appears more than once")
        declared[tensor.name] = (_dtype(what, tensor.datatype).numpy, check_shape(what, tensor.shape))
    return declared


def wants_raw_outputs(request: pb.ModelInferRequest) -> bool:
    """Whether the response should carry raw_output_contents.

    True when the client sent raw inputs (tritonclient always does, and reads only raw
    outputs), or asked for binary data request-wide ("binary_data_output") or for any
    output ("binary_data").
    """
    if request.raw_input_contents:
        return True
    if _flag(request.parameters, "binary_data_output"):
        return True
    return any(_flag(output.parameters, "binary_data") for output in request.outputs)


def encode_output(name: str, array: np.ndarray, *, raw: bool) -> tuple[InferOutputTensor, bytes | None]:
    """One output tensor, and its raw bytes when `raw` (else its typed contents are set)."""
    array = np.asarray(array)
    dtype = from_numpy(array.dtype)
    tensor = InferOutputTensor(name=name, datatype=dtype.v2, shape=array.shape)
    if raw:
        return tensor, encode_raw(array)
    if dtype.v2_contents is None:
        raise ValueError(f"output {name!r}: {dtype.v2} can only be sent raw")
    field = getattr(tensor.contents, dtype.v2_contents)
    if dtype.is_bytes:
        field.extend(bytes_elements(array))
    else:
        field.extend(array.ravel().tolist())
    return tensor, None


def encode_outputs(
    response: pb.ModelInferResponse, outputs: Mapping[str, np.ndarray], *, raw: bool
) -> None:
    """Append `outputs` to `response`, all raw or all typed.

    Typed is impossible for FP16 (no typed field), so a response holding an FP16 output
    is sent raw whatever `raw` says: the protocol does not allow mixing.
    """
    raw = raw or any(from_numpy(np.asarray(a).dtype).v2_contents is None for a in outputs.values())
    for name, array in outputs.items():
        tensor, content = encode_output(name, array, raw=raw)
        response.outputs.append(tensor)
        if content is not None:
            response.raw_output_contents.append(content)


def _dtype(what: str, name: str) -> DType:
    try:
        return from_v2(name)
    except InvalidInput as error:
        raise InvalidInput(f"{what}: {error}") from None


def _decode_contents(
    what: str, dtype: DType, shape: tuple[int, ...], contents: pb.InferTensorContents
) -> np.ndarray:
    count = math.prod(shape)
    used = [field.name for field, _ in contents.ListFields()]
    if dtype.v2_contents is None:
        raise InvalidInput(f"{what}: {dtype.v2} data must be sent in raw_input_contents")
    wrong = [field for field in used if field != dtype.v2_contents]
    if wrong:
        raise InvalidInput(
            f"{what}: datatype {dtype.v2} takes its data in contents.{dtype.v2_contents}, "
            f"not contents.{wrong[0]}"
        )
    values = getattr(contents, dtype.v2_contents)
    if len(values) != count:
        raise InvalidInput(
            f"{what}: contents.{dtype.v2_contents} has {len(values)} elements but shape "
            f"{list(shape)} needs {count}"
        )
    if dtype.is_bytes:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    wide = np.asarray(values, dtype=_WIDE.get(dtype.v2_contents, dtype.numpy))
    array = wide.astype(dtype.numpy, copy=False)
    if array.dtype != wide.dtype and not np.array_equal(array, wide):
        raise InvalidInput(f"{what}: contents.{dtype.v2_contents} holds values out of range for {dtype.v2}")
    return array.reshape(shape)


def _split_bytes(what: str, content: bytes | memoryview, count: int) -> np.ndarray:
    """Split length-prefixed BYTES content into an object array of `count` bytes."""
    elements = np.empty(count, dtype=object)
    view = memoryview(content)
    offset, size = 0, len(content)
    for index in range(count):
        if offset + 4 > size:
            raise InvalidInput(
                f"{what}: BYTES raw content ends after {index} of {count} elements "
                f"({size} bytes)"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > size:
            raise InvalidInput(
                f"{what}: BYTES element {index} declares {length} bytes but only "
                f"{size - offset} remain"
            )
        elements[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != size:
        raise InvalidInput(
            f"{what}: BYTES raw content has {size - offset} bytes left over after "
            f"{count} elements"
        )
    return elements


def _flag(parameters: Mapping[str, pb.InferParameter], key: str) -> bool:
    return key in parameters and parameters[key].bool_param
