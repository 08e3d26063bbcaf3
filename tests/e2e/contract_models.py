"""Real member models that break (or bend) the ensemble contract, made from the bundled
ONNX variants: one with its class axis permuted, one with another label set, one taking
another input shape. Each is a real ONNX graph the real server loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import copy_variant


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "variant.json").read_text())


def _write(folder: Path, manifest: dict) -> None:
    (folder / "variant.json").write_text(json.dumps(manifest))


def permuted_member(source: str, repo: Path, name: str, order: np.ndarray) -> Path:
    """`source` with output class j = source's class order[j]: a Gather on the logits,
    labels and stored validation rewritten to match, as an exporter would write them."""
    folder = copy_variant(source, repo, as_name=name)
    model = onnx.load(folder / "model.onnx")
    graph = model.graph
    out = graph.output[0]
    inner = f"{out.name}_before_permutation"
    for node in graph.node:
        node.output[:] = [inner if o == out.name else o for o in node.output]
    graph.initializer.append(numpy_helper.from_array(order.astype(np.int64), "class_permutation"))
    graph.node.append(helper.make_node("Gather", [inner, "class_permutation"], [out.name], axis=1))
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    m = _manifest(folder)
    m["labels"] = [m["labels"][i] for i in order]
    inverse = np.argsort(order)  # source class c is new class inverse[c]
    v = m["validation"]
    v["probabilities"] = np.asarray(v["probabilities"])[:, order].tolist()
    v["labels"] = inverse[np.asarray(v["labels"])].tolist()
    d = m["drift_reference"]
    d["predicted_class_frequencies"] = np.asarray(d["predicted_class_frequencies"])[order].tolist()
    _write(folder, m)
    return folder


def relabelled_member(source: str, repo: Path, name: str, labels: list[str]) -> Path:
    """`source` predicting another label set (same graph)."""
    folder = copy_variant(source, repo, as_name=name)
    m = _manifest(folder)
    m["labels"] = labels
    _write(folder, m)
    return folder


def narrow_member(source: str, repo: Path, name: str, features: int = 32) -> Path:
    """A linear model on the first `features` pixels: input [-1, features], not [-1, 64]."""
    folder = copy_variant(source, repo, as_name=name)
    m = _manifest(folder)
    classes = len(m["labels"])
    weights = np.random.default_rng(0).normal(size=(features, classes)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["pixels", "weights"], ["logits"])], "narrow",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [None, features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, classes])],
        [numpy_helper.from_array(weights, "weights")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    m["inputs"][0]["shape"] = [-1, features]
    m["normalization"] = {k: v[:features] for k, v in m["normalization"].items()}
    d = m["drift_reference"]
    d["features"] = [f for f in d["features"] if f.get("index") is None or f["index"] < features]
    _write(folder, m)
    return folder
