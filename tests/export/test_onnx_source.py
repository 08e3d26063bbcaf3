"""ONNX graphs as other frameworks write them (built here with onnx.helper, the way
torch.onnx.export lays out a linear classifier), rewired to one output of logits; expected
values are computed with numpy from the graph's own weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from sklearn.svm import LinearSVC

from service.export.errors import ExportError
from service.export.onnx_source import from_onnx_proto
from service.export.sklearn_source import from_estimator

RNG = np.random.default_rng(0)
W = RNG.normal(size=(6, 3)).astype(np.float32)
B = RNG.normal(size=3).astype(np.float32)
X = RNG.normal(size=(40, 6)).astype(np.float32)


def linear_graph(head: str | None, batch: str | int = "batch", outputs: int = 3) -> onnx.ModelProto:
    """x [batch, 6] -> MatMul/Add -> optional head -> output, like torch.onnx.export writes."""
    w, b = (W, B) if outputs == 3 else (W[:, :1], B[:1])
    nodes = [helper.make_node("MatMul", ["input", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["scores"])]
    last = "scores"
    if head == "softmax":
        nodes.append(helper.make_node("Softmax", ["scores"], ["probs"], axis=1))
        last = "probs"
    elif head == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["scores"], ["probs"]))
        last = "probs"
    nodes.append(helper.make_node("Identity", [last], ["output"]))
    graph = helper.make_graph(
        nodes, "torch_jit",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 6])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, outputs])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, producer_name="pytorch", ir_version=8,
                             opset_imports=[helper.make_opsetid("", 17)])


def run(source, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(source.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    (graph_output,) = session.get_outputs()
    assert (graph_input.name, graph_output.name) == (source.input_name, source.output_name)
    return session.run(None, {graph_input.name: x})[0]


def test_raw_scores_are_the_logits() -> None:
    source = from_onnx_proto(linear_graph(None), origin="m.onnx", input_name=None, output=None, sample=X)
    assert source.output_kind == "logits (output 'output')" and source.input_shape == (-1, 6)
    np.testing.assert_allclose(run(source, X), X @ W + B, rtol=1e-5, atol=1e-5)


def test_a_softmax_head_is_cut_off() -> None:
    source = from_onnx_proto(linear_graph("softmax"), origin="m.onnx", input_name="features",
                             output=None, sample=X)
    assert source.output_kind.startswith("logits before the Softmax head")
    assert source.input_name == "features"  # renamed on request
    np.testing.assert_allclose(run(source, X), X @ W + B, rtol=1e-5, atol=1e-5)


def test_a_one_unit_sigmoid_becomes_two_logits() -> None:
    source = from_onnx_proto(linear_graph("sigmoid", outputs=1), origin="m.onnx", input_name=None,
                             output=None, sample=X)
    z = X @ W[:, :1] + B[:1]
    np.testing.assert_allclose(run(source, X), np.concatenate([np.zeros_like(z), z], axis=1), atol=1e-5)
    p1 = 1 / (1 + np.exp(-z[:, 0]))
    logits = run(source, X)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax[:, 1], p1, atol=1e-6)


def test_a_fixed_batch_dimension_is_refused_with_the_fix() -> None:
    with pytest.raises(ExportError, match=r"input 'input' has a fixed batch dimension of 1; export it with a dynamic one"):
        from_onnx_proto(linear_graph(None, batch=1), origin="m.onnx", input_name=None, output=None, sample=X)


def test_a_classifier_without_probabilities_is_named() -> None:
    svc = LinearSVC().fit(X, (X[:, 0] > 0).astype(int))
    with pytest.raises(ExportError, match="LinearSVC has no predict_proba"):
        from_estimator(svc, input_name=None, sample=X)
