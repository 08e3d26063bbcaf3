"""service.codecs.v2_response: the raw ModelInferResponse written as bytes, read back by
tritonclient and compared with what protobuf itself writes for the same message."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as triton_pb

from service.codecs.v2_response import encode_raw_response
from tests.codecs.test_v2_codec import ALL, assert_same, sample


def read_back(data: bytes) -> triton.InferResult:
    return triton.InferResult(triton_pb.ModelInferResponse.FromString(data))


def protobuf_writes(model: str, version: str, request_id: str, outputs: dict[str, tuple[str, np.ndarray]],
                    parameters: dict[str, str] | None = None) -> bytes:
    """The same response built with tritonclient's generated classes and serialised by protobuf;
    raw contents little-endian, BYTES elements each after a 4-byte little-endian length."""
    response = triton_pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for key, value in (parameters or {}).items():
        response.parameters[key].string_param = value
    for name, (datatype, array) in outputs.items():
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if datatype == "BYTES":
            elements = [e.encode() if isinstance(e, str) else bytes(e) for e in array.ravel().tolist()]
            response.raw_output_contents.append(b"".join(struct.pack("<I", len(e)) + e for e in elements))
        else:
            response.raw_output_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    return response.SerializeToString()


@pytest.mark.parametrize("datatype", ALL)
@pytest.mark.parametrize("shape", [(3, 2), (1,), (0, 4), ()], ids=["3x2", "1", "0x4", "scalar"])
def test_every_dtype_and_shape_reads_back(datatype: str, shape: tuple[int, ...]) -> None:
    array = sample(datatype, shape)
    data = encode_raw_response("m", "2", "", {"first": sample("FP32", (1,)), "y": array})
    result = read_back(data)
    assert result.get_output("y").datatype == datatype
    assert tuple(result.get_output("y").shape) == shape
    assert_same(result.as_numpy("y"), array)
    assert result.get_response().model_name == "m" and result.get_response().model_version == "2"


def test_an_ensemble_answer_is_what_protobuf_writes() -> None:
    labels = np.asarray(["seven", "é"], dtype=object)
    outputs = {"probabilities": ("FP32", np.linspace(0, 1, 20, dtype=np.float32).reshape(2, 10)),
               "label": ("BYTES", labels),
               "class_index": ("INT64", np.array([7, -1], dtype=np.int64)),
               "confidence": ("FP32", np.array([0.5, 0.25], dtype=np.float32))}
    arrays = {name: array for name, (_, array) in outputs.items()}
    left_out = {"members_left_out": "digits_cnn_b,digits_mlp_a"}
    assert encode_raw_response("digits", "1", "req-9", arrays, left_out) == protobuf_writes(
        "digits", "1", "req-9", outputs, left_out)
    assert encode_raw_response("digits", "1", "", arrays) == protobuf_writes("digits", "1", "", outputs)
    assert encode_raw_response("", "", "", arrays) == protobuf_writes("", "", "", outputs)


def test_headers_are_not_shared_between_row_counts() -> None:
    """The tensor headers are cached per layout: a second answer with other rows gets its own."""
    for rows in (1, 3, 1, 200):
        outputs = {"p": ("FP32", np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)),
                   "label": ("BYTES", np.asarray(["a"] * rows, dtype=object))}
        data = encode_raw_response("m", "1", "", {n: a for n, (_, a) in outputs.items()})
        assert data == protobuf_writes("m", "1", "", outputs)
        assert read_back(data).as_numpy("p").shape == (rows, 2)


@pytest.mark.parametrize(
    "array", [np.array(["zero", "é"]), np.array([b"zero", "é".encode()]), np.array(["zero", b"\xff"], dtype=object)],
    ids=["unicode", "fixed-bytes", "object-mixed"])
def test_strings_of_any_kind_are_sent_as_bytes(array: np.ndarray) -> None:
    result = read_back(encode_raw_response("m", "1", "", {"labels": array}))
    assert result.get_output("labels").datatype == "BYTES"
    expected = [e.encode() if isinstance(e, str) else bytes(e) for e in array.tolist()]
    assert result.as_numpy("labels").tolist() == expected


def test_big_endian_and_strided_arrays_are_sent_little_endian_row_major() -> None:
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    strided = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    result = read_back(encode_raw_response("m", "1", "", {"big": big, "strided": strided}))
    np.testing.assert_array_equal(result.as_numpy("big"), big)
    np.testing.assert_array_equal(result.as_numpy("strided"), strided)
    assert result.get_output("big").datatype == "INT32"
