"""JSON tensors of the REST APIs: what is accepted, and what is refused before allocation."""

from __future__ import annotations

import numpy as np
import pytest

from service.codecs import rest
from service.errors import InvalidInput


def _tensor(data, datatype="FP32", shape=(2, 2)):
    return {"name": "x", "datatype": datatype, "shape": list(shape), "data": data}


def test_flat_and_nested_data_decode_to_the_declared_shape():
    for data in ([1, 2, 3.5, 4], [[1, 2], [3.5, 4]]):
        name, array = rest.decode_v2_input(_tensor(data), None)
        assert name == "x" and array.dtype == np.float32 and array.shape == (2, 2)
        np.testing.assert_array_equal(array, [[1, 2], [3.5, 4]])


def test_bytes_and_bools():
    _, labels = rest.decode_v2_input(_tensor(["a", "bé"], "BYTES", (2,)), None)
    assert labels.tolist() == [b"a", "bé".encode()]
    _, flags = rest.decode_v2_input(_tensor([True, False], "BOOL", (2,)), None)
    assert flags.dtype == np.bool_


@pytest.mark.parametrize("tensor, message", [
    (_tensor([1, 2, 3]), r"3 elements but shape \[2, 2\] needs 4"),
    (_tensor([1.5, 2, 3, 4], "INT32"), "non-integers"),
    (_tensor([300, 1, 2, 3], "UINT8"), "out of range"),
    (_tensor([-1, 1, 2, 3], "UINT8"), "out of range"),
    (_tensor([True, False, True, True]), "booleans"),
    (_tensor(["a", "b", "c", "d"]), "strings"),
    (_tensor([[1, 2], [3]]), "rectangular"),
    (_tensor([1, 2, 3, 4], "FP99"), "FP99"),
    (_tensor([1, 2, 3, 4], shape=(2, -2)), "negative"),
    (_tensor([1, 2, 3, 4], shape="2x2"), "list of integers"),
    ({"name": "x", "datatype": "FP32", "shape": [4]}, "no 'data'"),
    ([1, 2], "must be an object"),
])
def test_refusals_name_what_is_wrong(tensor, message):
    with pytest.raises(InvalidInput, match=message):
        rest.decode_v2_input(tensor, None)


def test_a_huge_declared_shape_is_refused_by_arithmetic_not_allocation():
    with pytest.raises(InvalidInput, match="needs 1000000000000"):
        rest.decode_v2_input(_tensor([1.0], shape=(10**6, 10**6)), None)


def test_binary_data_is_read_in_place_and_its_size_checked():
    raw = np.arange(4, dtype="<f4").tobytes()
    tensor = {"name": "x", "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": 16}}
    assert rest.binary_size(tensor) == 16
    _, array = rest.decode_v2_input(tensor, memoryview(raw))
    np.testing.assert_array_equal(array.ravel(), [0, 1, 2, 3])
    with pytest.raises(InvalidInput, match="raw content is 12 bytes"):
        rest.decode_v2_input(tensor, memoryview(raw[:12]))
    with pytest.raises(InvalidInput, match="non-negative integer"):
        rest.binary_size({"name": "x", "parameters": {"binary_data_size": -1}})


def test_outputs_as_json_or_binary():
    tensor, raw = rest.encode_v2_output("label", np.asarray([b"7", b"1"], dtype=object), binary=False)
    assert tensor == {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["7", "1"]} and raw is None
    tensor, raw = rest.encode_v2_output("p", np.ones((1, 2), np.float32), binary=True)
    assert tensor["parameters"] == {"binary_data_size": 8} and raw == np.ones(2, "<f4").tobytes()
