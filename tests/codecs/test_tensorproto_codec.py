"""service.codecs.tensorproto against TensorFlow's own make_tensor_proto / make_ndarray."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

from service.codecs import dtypes, tensorproto
from service.errors import InvalidInput

NUMERIC = [np.bool_, np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16,
           np.int32, np.int64, np.float16, np.float32, np.float64]


def sample(dtype, shape=(2, 3)) -> np.ndarray:
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    if dtype == np.bool_:
        return (np.arange(count) % 3 == 0).reshape(shape)
    if dtype.kind == "f":
        return np.linspace(-2.5, 7.25, count).astype(dtype).reshape(shape)
    info = np.iinfo(dtype)
    values = [info.min, info.max, 0, 1, info.max // 3, info.min // 7 if info.min else 2]
    return np.resize(np.array(values, dtype=dtype), count).reshape(shape)


def strings(shape=(2, 2)) -> np.ndarray:
    values = np.empty(int(np.prod(shape)), dtype=object)
    values[:] = [b"", b"\x00a", "é".encode(), b"long" * 50][: values.size]
    return values.reshape(shape)


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    if expected.dtype == object:
        assert actual.tolist() == expected.tolist()
    else:
        np.testing.assert_array_equal(actual, expected)


def test_dtype_table_matches_tensorflow() -> None:
    for entry in dtypes.TABLE:
        assert types_pb2.DataType.Value(entry.tf_name) == entry.tf
        as_tf = tf.dtypes.as_dtype(entry.tf)
        assert as_tf.as_numpy_dtype == (object if entry.is_bytes else entry.numpy.type)


# --- TF -> us -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", NUMERIC, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(2, 3), (1,), ()], ids=["matrix", "one", "scalar"])
def test_decodes_make_tensor_proto(dtype, shape) -> None:
    # make_tensor_proto writes tensor_content for most multi-element arrays and the
    # typed value field otherwise (scalars, bool): both paths get used.
    array = sample(dtype, shape)
    assert_same(tensorproto.decode(tf.make_tensor_proto(array)), array)


def test_both_paths_really_are_exercised() -> None:
    assert tf.make_tensor_proto(sample(np.float32)).tensor_content
    assert not tf.make_tensor_proto(sample(np.bool_)).tensor_content
    assert list(tf.make_tensor_proto(np.uint32(7)).uint32_val) == [7]
    assert len(tf.make_tensor_proto(np.float16(1.5)).half_val) == 1


def test_decodes_strings() -> None:
    array = strings()
    assert_same(tensorproto.decode(tf.make_tensor_proto(array)), array)


@pytest.mark.parametrize("dtype", [np.float32, np.int8, np.float16, np.bool_, np.uint64],
                         ids=lambda d: np.dtype(d).name)
def test_single_value_is_broadcast_like_tensorflow(dtype) -> None:
    proto = tf.make_tensor_proto(sample(dtype, (1,)))
    proto.tensor_shape.Clear()
    for size in (2, 3):
        proto.tensor_shape.dim.add(size=size)
    assert_same(tensorproto.decode(proto), tf.make_ndarray(proto))
    assert tensorproto.decode(proto).shape == (2, 3)


def test_short_values_are_padded_with_the_last_and_none_means_zeros() -> None:
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_INT64, int64_val=[4, 5])
    proto.tensor_shape.dim.add(size=4)
    assert_same(tensorproto.decode(proto), tf.make_ndarray(proto))
    np.testing.assert_array_equal(tensorproto.decode(proto), [4, 5, 5, 5])
    del proto.int64_val[:]
    assert_same(tensorproto.decode(proto), np.zeros(4, np.int64))
    text = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"a"])
    text.tensor_shape.dim.add(size=3)
    assert tensorproto.decode(text).tolist() == [b"a", b"a", b"a"]


def test_decodes_a_real_predict_request() -> None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    images = sample(np.float32, (4, 64))
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    parsed = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    decoded = tensorproto.decode(parsed.inputs["images"], "images")
    assert_same(decoded, images)
    assert not decoded.flags.owndata  # np.frombuffer view of tensor_content


def _encode(array: np.ndarray, *, use_tensor_content: bool = False):
    """A fresh TensorProto filled by encode_into, as the server fills its responses' outputs."""
    proto = tf.make_tensor_proto(np.zeros(0, np.float32))
    proto.Clear()
    tensorproto.encode_into(array, proto, use_tensor_content=use_tensor_content)
    return proto


# --- us -> TF -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", NUMERIC, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("use_tensor_content", [False, True], ids=["typed", "content"])
def test_make_ndarray_reads_what_we_encode(dtype, use_tensor_content: bool) -> None:
    array = sample(dtype, (3, 2))
    proto = _encode(array, use_tensor_content=use_tensor_content)
    assert bool(proto.tensor_content) == use_tensor_content
    assert_same(tf.make_ndarray(proto), array)
    assert_same(tensorproto.decode(proto), array)


def test_typed_fields_follow_tensorflow_rules() -> None:
    assert list(_encode(np.array([1, -2], np.int8)).int_val) == [1, -2]
    assert list(_encode(np.array([65535], np.uint16)).int_val) == [65535]
    assert list(_encode(np.array([True, False])).bool_val) == [True, False]
    assert list(_encode(np.array([1.0], np.float16)).half_val) == [0x3C00]
    assert list(_encode(np.array([7], np.uint32)).uint32_val) == [7]
    assert list(_encode(np.array([0.5], np.float32)).float_val) == [0.5]


def test_encodes_strings_and_str() -> None:
    assert_same(tf.make_ndarray(_encode(strings())), strings())
    assert tf.make_ndarray(_encode(np.array(["zero", "é"]))).tolist() == [b"zero", "é".encode()]


def test_encode_into_a_response_map_entry_replaces_its_content() -> None:
    response = predict_pb2.PredictResponse()
    response.outputs["scores"].float_val.append(9.0)
    tensorproto.encode_into(np.array([[0.25, 0.75]], np.float32), response.outputs["scores"])
    parsed = predict_pb2.PredictResponse.FromString(response.SerializeToString())
    np.testing.assert_array_equal(tf.make_ndarray(parsed.outputs["scores"]), [[0.25, 0.75]])
    assert list(parsed.outputs["scores"].float_val) == [0.25, 0.75]


def test_scalar_and_empty() -> None:
    assert_same(tf.make_ndarray(_encode(np.float64(2.5))), np.array(2.5))
    empty = np.zeros((0, 3), np.float32)
    assert_same(tf.make_ndarray(_encode(empty)), empty)
    assert_same(tensorproto.decode(tf.make_tensor_proto(empty)), empty)


# --- errors --------------------------------------------------------------------------

def test_tensor_content_length_mismatch_names_tensor_dtype_and_shape() -> None:
    proto = tf.make_tensor_proto(sample(np.float32, (2, 3)))
    proto.tensor_content = proto.tensor_content[:-1]
    with pytest.raises(InvalidInput, match=r"tensor 'images': tensor_content is 23 bytes but shape \[2, 3\] of DT_FLOAT needs 24"):
        tensorproto.decode(proto, "images")


def test_too_many_values() -> None:
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1, 2, 3])
    proto.tensor_shape.dim.add(size=2)
    with pytest.raises(InvalidInput, match=r"tensor 'x': float_val has 3 values but shape \[2\] holds 2"):
        tensorproto.decode(proto, "x")


def test_values_in_the_wrong_field() -> None:
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, int_val=[1, 2])
    proto.tensor_shape.dim.add(size=2)
    with pytest.raises(InvalidInput, match="takes its values in float_val, not int_val"):
        tensorproto.decode(proto, "x")


def test_out_of_range_and_bad_half_bits() -> None:
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_UINT8, int_val=[1, 256])
    proto.tensor_shape.dim.add(size=2)
    with pytest.raises(InvalidInput, match="tensor 'x': int_val holds values out of range for DT_UINT8"):
        tensorproto.decode(proto, "x")
    half = tensor_pb2.TensorProto(dtype=types_pb2.DT_HALF, half_val=[70000])
    with pytest.raises(InvalidInput, match="half_val holds values that are not 16-bit patterns"):
        tensorproto.decode(half, "h")


def test_unsupported_dtype_and_bad_shapes() -> None:
    with pytest.raises(InvalidInput, match="tensor 'c': unsupported TensorFlow dtype enum 8"):
        tensorproto.decode(tensor_pb2.TensorProto(dtype=types_pb2.DT_COMPLEX64), "c")
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0])
    proto.tensor_shape.dim.add(size=-1)
    with pytest.raises(InvalidInput, match=r"shape \[-1\] has a negative"):
        tensorproto.decode(proto, "x")
    proto.tensor_shape.unknown_rank = True
    with pytest.raises(InvalidInput, match="unknown rank"):
        tensorproto.decode(proto, "x")
    text = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_content=b"abc")
    with pytest.raises(InvalidInput, match="DT_STRING values go in string_val"):
        tensorproto.decode(text, "s")
