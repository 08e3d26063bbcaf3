"""service.codecs.v2 against what tritonclient.grpc really sends and reads."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as triton_pb

from service._proto.inference import grpc_service_pb2 as pb
from service.codecs import dtypes, v2
from service.errors import InvalidInput

NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
           "INT64", "FP16", "FP32", "FP64"]
ALL = [*NUMERIC, "BYTES"]


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """Values that exercise each dtype's range (extremes, signs, fractions)."""
    dtype = dtypes.from_v2(datatype).numpy
    count = int(np.prod(shape))
    if datatype == "BYTES":
        pool = [b"", b"a", b"\x00\xff", "é".encode(), b"x" * 300, b"zz"]
        values = np.empty(count, dtype=object)
        values[:] = [pool[i % len(pool)] for i in range(count)]
        return values.reshape(shape)
    if datatype == "BOOL":
        return (np.arange(count) % 3 == 0).reshape(shape)
    if dtype.kind == "f":
        return (np.linspace(-2.5, 7.25, count) * (1 if datatype != "FP16" else 0.5)).astype(dtype).reshape(shape)
    info = np.iinfo(dtype)
    values = np.resize(np.array([info.min, info.max, 0, 1, info.max // 3, info.min // 7 if info.min else 2],
                                dtype=dtype), count)
    return values.reshape(shape)


def triton_request(*arrays: tuple[str, np.ndarray, str]) -> pb.ModelInferRequest:
    """A request as tritonclient builds it (InferInput.set_data_from_numpy), parsed by us."""
    request = triton_pb.ModelInferRequest(model_name="m")
    for name, array, datatype in arrays:
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        request.inputs.append(tensor._get_tensor())
        request.raw_input_contents.append(tensor._get_content())
    return pb.ModelInferRequest.FromString(request.SerializeToString())


def typed_request(name: str, array: np.ndarray, datatype: str) -> pb.ModelInferRequest:
    """A request with typed contents (the non-binary form), built on tritonclient's classes."""
    request = triton_pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
    field = getattr(tensor.contents, dtypes.from_v2(datatype).v2_contents)
    field.extend(array.ravel().tolist())
    return pb.ModelInferRequest.FromString(request.SerializeToString())


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == (expected.dtype if expected.dtype != object else np.dtype(object))
    if expected.dtype == object:
        assert actual.tolist() == expected.tolist()
    else:
        np.testing.assert_array_equal(actual, expected)


# --- decode: what tritonclient sends -------------------------------------------------

@pytest.mark.parametrize("datatype", ALL)
def test_decodes_tritonclient_binary_inputs(datatype: str) -> None:
    array = sample(datatype)
    decoded = v2.decode_inputs(triton_request(("x", array, datatype)))
    assert list(decoded) == ["x"]
    assert_same(decoded["x"], array)


@pytest.mark.parametrize("datatype", [d for d in ALL if d != "FP16"])
def test_decodes_typed_contents(datatype: str) -> None:
    array = sample(datatype)
    assert_same(v2.decode_inputs(typed_request("x", array, datatype))["x"], array)


def test_decodes_several_inputs_in_order() -> None:
    a, b = sample("FP32", (4, 2)), sample("BYTES", (3,))
    decoded = v2.decode_inputs(triton_request(("a", a, "FP32"), ("b", b, "BYTES")))
    assert list(decoded) == ["a", "b"]
    assert_same(decoded["a"], a)
    assert_same(decoded["b"], b)


def test_raw_decode_is_a_view_not_a_copy() -> None:
    request = triton_request(("x", sample("FP32", (64, 784)), "FP32"))
    decoded = v2.decode_inputs(request)["x"]
    assert not decoded.flags.owndata and not decoded.flags.writeable


@pytest.mark.parametrize("datatype", ["FP32", "BYTES", "INT64"])
def test_zero_sized_tensor(datatype: str) -> None:
    array = sample(datatype, (0, 3))
    assert_same(v2.decode_inputs(triton_request(("x", array, datatype)))["x"], array)


# --- encode: what tritonclient reads -------------------------------------------------

@pytest.mark.parametrize("datatype", ALL)
def test_raw_outputs_read_back_by_tritonclient(datatype: str) -> None:
    array = sample(datatype, (3, 2))
    response = pb.ModelInferResponse(model_name="m")
    v2.encode_outputs(response, {"first": sample("FP32", (1,)), "y": array}, raw=True)
    result = triton.InferResult(triton_pb.ModelInferResponse.FromString(response.SerializeToString()))
    assert result.get_output("y").datatype == datatype
    assert list(result.get_output("y").shape) == [3, 2]
    assert_same(result.as_numpy("y"), array)


def test_typed_bytes_output_read_back_by_tritonclient() -> None:
    array = sample("BYTES", (2, 2))
    response = pb.ModelInferResponse()
    v2.encode_outputs(response, {"labels": array}, raw=False)
    assert not response.raw_output_contents
    result = triton.InferResult(triton_pb.ModelInferResponse.FromString(response.SerializeToString()))
    assert result.as_numpy("labels").tolist() == array.tolist()


@pytest.mark.parametrize("datatype", [d for d in ALL if d != "FP16"])
def test_typed_output_round_trip(datatype: str) -> None:
    array = sample(datatype)
    tensor, raw = v2.encode_output("y", array, raw=False)
    assert raw is None
    again = pb.ModelInferRequest.InferInputTensor(
        name="y", datatype=tensor.datatype, shape=tensor.shape, contents=tensor.contents)
    assert_same(v2.decode_input(again), array)


def test_fp16_forces_the_whole_response_raw() -> None:
    response = pb.ModelInferResponse()
    v2.encode_outputs(response, {"a": sample("FP32"), "h": sample("FP16")}, raw=False)
    assert len(response.raw_output_contents) == 2
    assert not response.outputs[0].contents.fp32_contents
    with pytest.raises(ValueError, match="FP16 can only be sent raw"):
        v2.encode_output("h", sample("FP16"), raw=False)


@pytest.mark.parametrize(
    "array",
    [np.array(["zero", "é"]), np.array([b"zero", "é".encode()]), np.array(["zero", "é"], dtype=object)],
    ids=["unicode", "fixed-bytes", "object-str"],
)
def test_str_and_fixed_width_arrays_encode_as_bytes(array: np.ndarray) -> None:
    tensor, raw = v2.encode_output("labels", array, raw=True)
    assert tensor.datatype == "BYTES"
    decoded = v2.decode_raw("labels", dtypes.from_v2("BYTES"), (2,), raw)
    assert decoded.tolist() == [b"zero", "é".encode()]


def test_big_endian_arrays_are_sent_little_endian() -> None:
    array = np.arange(4, dtype=">i4")
    raw = v2.encode_raw(array)
    assert raw == np.arange(4, dtype="<i4").tobytes()
    np.testing.assert_array_equal(v2.decode_raw("x", dtypes.from_v2("INT32"), (4,), raw), array)


@pytest.mark.parametrize("datatype", ALL)
def test_raw_round_trip_for_quorum_tensors(datatype: str) -> None:
    array = sample(datatype, (5, 1, 2))
    decoded = v2.decode_raw("inputs", dtypes.from_v2(datatype), array.shape, v2.encode_raw(array))
    assert_same(decoded, array)


# --- when to answer raw --------------------------------------------------------------

def test_wants_raw_outputs() -> None:
    assert v2.wants_raw_outputs(triton_request(("x", sample("FP32"), "FP32")))
    typed = typed_request("x", sample("FP32"), "FP32")
    assert not v2.wants_raw_outputs(typed)
    typed.parameters["binary_data_output"].bool_param = True
    assert v2.wants_raw_outputs(typed)
    typed = typed_request("x", sample("FP32"), "FP32")
    typed.outputs.add(name="y").parameters["binary_data"].bool_param = True
    assert v2.wants_raw_outputs(typed)


# --- errors --------------------------------------------------------------------------

def test_raw_byte_length_mismatch_names_tensor_shape_and_dtype() -> None:
    request = triton_request(("images", sample("FP32", (2, 3)), "FP32"))
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    with pytest.raises(InvalidInput, match=r"input 'images': raw content is 20 bytes but shape \[2, 3\] of FP32 needs 24"):
        v2.decode_inputs(request)


def test_shape_declared_larger_than_data() -> None:
    request = triton_request(("x", sample("INT64", (2, 3)), "INT64"))
    request.inputs[0].shape[0] = 3
    with pytest.raises(InvalidInput, match=r"shape \[3, 3\] of INT64 needs 72"):
        v2.decode_inputs(request)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x00\x00\x00a\x05\x00", r"\(7 bytes\) cannot hold the 2 elements"),  # checked before allocating
        (b"\x03\x00\x00\x00abc\x05", r"ends after 1 of 2 elements"),
        (b"\x01\x00\x00\x00a\x05\x00\x00\x00bc", r"element 1 declares 5 bytes but only 2 remain"),
        (b"\x01\x00\x00\x00a\x01\x00\x00\x00bc", r"1 bytes left over after 2 elements"),
    ],
)
def test_malformed_bytes_raw_content(content: bytes, message: str) -> None:
    request = triton_request(("s", sample("BYTES", (2,)), "BYTES"))
    request.raw_input_contents[0] = content
    with pytest.raises(InvalidInput, match=rf"input 's': BYTES .*{message}"):
        v2.decode_inputs(request)


def test_raw_entries_must_match_inputs() -> None:
    request = triton_request(("a", sample("FP32"), "FP32"), ("b", sample("FP32"), "FP32"))
    del request.raw_input_contents[1]
    with pytest.raises(InvalidInput, match="raw_input_contents has 1 entries for 2 inputs"):
        v2.decode_inputs(request)


def test_raw_and_typed_cannot_mix() -> None:
    request = triton_request(("a", sample("FP32"), "FP32"))
    request.inputs[0].contents.fp32_contents.extend([1.0] * 6)
    with pytest.raises(InvalidInput, match="input 'a' has typed contents while the request uses raw"):
        v2.decode_inputs(request)


def test_typed_contents_in_the_wrong_field() -> None:
    request = typed_request("x", sample("INT32"), "INT32")
    request.inputs[0].datatype = "FP32"
    with pytest.raises(InvalidInput, match=r"input 'x': datatype FP32 takes its data in contents.fp32_contents, not contents.int_contents"):
        v2.decode_inputs(request)


def test_typed_element_count_mismatch() -> None:
    request = typed_request("x", sample("FP64"), "FP64")
    request.inputs[0].contents.fp64_contents.append(1.0)
    with pytest.raises(InvalidInput, match=r"contents.fp64_contents has 7 elements but shape \[2, 3\] needs 6"):
        v2.decode_inputs(request)


def test_typed_values_out_of_range() -> None:
    request = typed_request("x", np.array([1, 300], dtype=np.int32), "INT8")
    with pytest.raises(InvalidInput, match="input 'x': contents.int_contents holds values out of range for INT8"):
        v2.decode_inputs(request)


def test_fp16_needs_raw() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="h", datatype="FP16", shape=[1])
    with pytest.raises(InvalidInput, match="input 'h': FP16 data must be sent in raw_input_contents"):
        v2.decode_inputs(request)


def test_unknown_datatype_and_negative_shape() -> None:
    request = triton_request(("x", sample("FP32"), "FP32"))
    request.inputs[0].datatype = "FP8"
    with pytest.raises(InvalidInput, match="input 'x': unsupported datatype 'FP8'"):
        v2.decode_inputs(request)
    request.inputs[0].datatype = "FP32"
    request.inputs[0].shape[0] = -1
    with pytest.raises(InvalidInput, match=r"input 'x': shape \[-1, 3\] has a negative dimension"):
        v2.decode_inputs(request)


def test_duplicate_inputs_and_shared_memory_are_rejected() -> None:
    request = triton_request(("x", sample("FP32"), "FP32"), ("x", sample("FP32"), "FP32"))
    with pytest.raises(InvalidInput, match="input 'x' appears more than once"):
        v2.decode_inputs(request)
    shm = triton.InferInput("x", [2, 3], "FP32")
    shm.set_shared_memory("region", 24)
    request = pb.ModelInferRequest.FromString(
        triton_pb.ModelInferRequest(inputs=[shm._get_tensor()]).SerializeToString())
    with pytest.raises(InvalidInput, match="input 'x': shared-memory inputs are not supported"):
        v2.decode_inputs(request)


def test_bool_raw_content_must_be_zero_or_one() -> None:
    request = triton_request(("b", sample("BOOL", (2,)), "BOOL"))
    request.raw_input_contents[0] = b"\x01\x07"
    with pytest.raises(InvalidInput, match="BOOL raw content holds bytes other than 0 and 1"):
        v2.decode_inputs(request)
