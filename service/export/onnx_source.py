"""ONNX graphs from any framework (torch.onnx.export, skl2onnx, tf2onnx), rewired to return
one output of logits.

Which output: the one named by --output, else the graph's only float output of one row per
input row, preferring raw scores over probabilities. skl2onnx's ZipMap (a list of
{label: probability} maps) is looked through to the probability tensor it wraps. Then: a
Softmax (or LogSoftmax) head is cut off and its input taken as logits; a one-column sigmoid
becomes the two logits [0, z]; a probability output without such a head becomes
log(max(p, 1e-12)). Softmax of any of these gives the model's own probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.export.errors import ExportError, UsageError
from service.export.source import OUTPUT_NAME, fit_rows, PROB_EPSILON, Hints, looks_like_probabilities

_FLOATS = (1, 10, 11)  # TensorProto FLOAT, FLOAT16, DOUBLE
_PASS_THROUGH = ("Identity", "Cast")


@dataclass
class OnnxSource:
    family: str
    proto: Any
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    output_kind: str
    hints: Hints = field(default_factory=Hints)
    formats: tuple[str, ...] = ("onnx",)

    def __post_init__(self) -> None:
        self._session = _session(self.proto)

    def predict(self, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), *self.input_shape[1:])
        parts = [self._session.run([self.output_name], {self.input_name: x[i:i + batch]})[0]
                 for i in range(0, len(x), batch)]
        return np.concatenate(parts).astype(np.float32)

    def write(self, fmt: str, path: Path) -> tuple[str, str]:
        path.write_bytes(self.proto.SerializeToString())
        return self.input_name, self.output_name


def _session(proto: Any):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: pruned initializers are not news
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _input(graph: Any, origin: str) -> tuple[Any, tuple[int, ...]]:
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ExportError(f"{origin}: export needs a graph with one input, this one takes "
                          f"{[i.name for i in inputs]}")
    (graph_input,) = inputs
    tensor = graph_input.type.tensor_type
    if tensor.elem_type != 1:
        import onnx

        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type) if tensor.elem_type else "unknown"
        raise ExportError(f"{origin}: input '{graph_input.name}' is {dtype}; export needs float32 "
                          "(skl2onnx: FloatTensorType; torch: a float32 example input)")
    dims = list(tensor.shape.dim)
    if len(dims) < 2:
        raise ExportError(f"{origin}: input '{graph_input.name}' must be [batch, features...], "
                          f"has {len(dims)} dimension(s)")
    if dims[0].HasField("dim_value"):
        raise ExportError(f"{origin}: input '{graph_input.name}' has a fixed batch dimension of "
                          f"{dims[0].dim_value}; export it with a dynamic one "
                          "(torch.onnx.export(..., dynamic_axes={name: {0: 'batch'}}), skl2onnx: [None, n])")
    rest = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
    static = [d for d in rest if d is not None and d >= 1]
    if len(static) != len(rest):
        raise ExportError(f"{origin}: input '{graph_input.name}' needs static dimensions after the "
                          f"batch, has {['batch', *[d if d else '?' for d in rest]]}")
    return graph_input, (-1, *static)


def _candidates(graph: Any, producers: dict[str, Any]) -> list[str]:
    """Float graph outputs, and the tensor inside each ZipMap output."""
    names = []
    for out in graph.output:
        kind = out.type.WhichOneof("value")
        if kind == "tensor_type" and out.type.tensor_type.elem_type in _FLOATS:
            names.append(out.name)
        elif kind in ("sequence_type", "map_type"):
            node = producers.get(out.name)
            if node is not None and node.op_type == "ZipMap":
                names.append(node.input[0])
    return names


def _head(name: str, producers: dict[str, Any]) -> tuple[str, Any | None]:
    """The tensor and the node that produced it, looking through Identity/Cast."""
    node = producers.get(name)
    while node is not None and node.op_type in _PASS_THROUGH:
        name = node.input[0]
        node = producers.get(name)
    return name, node


def _probe(proto: Any, tensors: list[str], input_name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """Values of (possibly internal) tensors for sample rows, from a copy exposing them."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors)
    try:
        values = _session(probe).run(tensors, {input_name: x})
    except Exception as exc:  # onnxruntime's own exception types
        raise ExportError(f"ONNX Runtime cannot run the graph on x_train rows: {str(exc).splitlines()[0]}") from exc
    return dict(zip(tensors, values))


def from_onnx_proto(proto: Any, *, origin: str, input_name: str | None, output: str | None,
                    sample: np.ndarray, family: str = "onnx", hints: Hints | None = None) -> OnnxSource:
    import onnx

    graph = proto.graph
    graph_input, shape = _input(graph, origin)
    x = np.ascontiguousarray(fit_rows(sample[:256], shape, graph_input.name))
    producers = {out: node for node in graph.node for out in node.output}
    if output is not None:
        outputs = [o.name for o in graph.output]
        if output not in outputs:
            raise UsageError(f"--output {output}: the graph's outputs are {outputs}")
        found = _candidates(graph, producers)
        wanted = [c for c in found if c == output or producers.get(output) is not None
                  and c in producers[output].input]
        if not wanted:
            raise UsageError(f"--output {output}: not a float tensor of scores or probabilities")
        candidates = wanted
    else:
        candidates = _candidates(graph, producers)
    if not candidates:
        raise ExportError(f"{origin}: no float output of scores or probabilities among "
                          f"{[o.name for o in graph.output]}")
    values = _probe(proto, candidates, graph_input.name, x)
    per_row = [c for c in candidates if values[c].ndim == 2 and len(values[c]) == len(x)]
    if not per_row:
        raise ExportError(f"{origin}: no output has one row of class scores per input row "
                          f"(shapes {[list(values[c].shape) for c in candidates]})")
    scores = [c for c in per_row if not looks_like_probabilities(values[c])]
    chosen_list = scores or per_row
    if len(chosen_list) > 1:
        raise UsageError(f"{origin}: several outputs could be the logits ({chosen_list}); name one with --output")
    chosen = chosen_list[0]
    is_probs = chosen not in scores
    tensor, node = _head(chosen, producers)
    nodes: list[Any] = []
    final = OUTPUT_NAME if OUTPUT_NAME not in producers else f"{OUTPUT_NAME}_quorum"
    width = values[chosen].shape[1]
    if node is not None and node.op_type == "Softmax" and width > 1:
        source_tensor, kind = node.input[0], f"logits before the Softmax head ('{node.name or node.output[0]}')"
    elif node is not None and node.op_type == "LogSoftmax":
        source_tensor, kind = tensor, "log-softmax output (logits up to a per-row constant)"
    elif node is not None and node.op_type == "Sigmoid" and width == 1:
        z = node.input[0]
        nodes.append(onnx.helper.make_node("Sub", [z, z], ["quorum_zero"]))
        nodes.append(onnx.helper.make_node("Concat", ["quorum_zero", z], ["quorum_pair"], axis=-1))
        source_tensor, kind = "quorum_pair", f"logits [0, z] before the Sigmoid head ('{node.name or z}')"
    elif is_probs:
        nodes.append(onnx.helper.make_node("Constant", [], ["quorum_eps"], value=onnx.helper.make_tensor(
            "quorum_eps", 1, [], [PROB_EPSILON])))
        p = chosen
        if width == 1:
            nodes.append(onnx.helper.make_node("Constant", [], ["quorum_one"], value=onnx.helper.make_tensor(
                "quorum_one", 1, [], [1.0])))
            nodes.append(onnx.helper.make_node("Sub", ["quorum_one", chosen], ["quorum_q"]))
            nodes.append(onnx.helper.make_node("Concat", ["quorum_q", chosen], ["quorum_pq"], axis=-1))
            p = "quorum_pq"
        nodes.append(onnx.helper.make_node("Max", [p, "quorum_eps"], ["quorum_floored"]))
        nodes.append(onnx.helper.make_node("Log", ["quorum_floored"], ["quorum_logp"]))
        source_tensor, kind = "quorum_logp", f"log-probabilities (output '{chosen}' holds probabilities)"
    else:
        source_tensor, kind = chosen, f"logits (output '{chosen}')"
    n_classes = 2 if width == 1 else width
    new = onnx.ModelProto()
    new.CopyFrom(proto)
    new.graph.node.extend(nodes)
    new.graph.node.append(onnx.helper.make_node("Cast", [source_tensor], [final], to=1))
    del new.graph.output[:]
    new.graph.output.append(onnx.helper.make_tensor_value_info(final, 1, ["batch", n_classes]))
    new = _prune(new)
    name = graph_input.name
    if input_name and input_name != name:
        _rename_input(new, name, input_name)
        name = input_name
    try:
        onnx.checker.check_model(new)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{origin}: the rewired graph fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    return OnnxSource(family, new, name, shape, final, kind, hints or Hints())


def _prune(proto: Any) -> Any:
    """Drop the nodes (and initializers) the one output no longer needs, such as ZipMap."""
    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    needed, stack, keep = set(), [o.name for o in graph.output], set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producers.get(name)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(i for i in node.input if i)
            for attr in node.attribute:  # subgraphs (If/Loop) read outer tensors
                for sub in [attr.g, *attr.graphs]:
                    stack.extend(i for n in sub.node for i in n.input if i)
    nodes = [n for n in graph.node if id(n) in keep]
    del graph.node[:]
    graph.node.extend(nodes)
    initializers = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    used_domains = {n.domain or "" for n in nodes}
    opsets = [o for o in proto.opset_import if (o.domain or "") in used_domains or o.domain in ("", "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend(opsets)
    return proto


def _rename_input(proto: Any, old: str, new: str) -> None:
    for graph_input in proto.graph.input:
        if graph_input.name == old:
            graph_input.name = new
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def from_onnx_file(path: Path, *, input_name: str | None, output: str | None,
                   sample: np.ndarray) -> OnnxSource:
    import onnx

    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and onnx's own
        raise ExportError(f"--model {path}: not a readable ONNX model ({type(exc).__name__})") from exc
    hints = Hints()
    if proto.producer_name == "skl2onnx":  # fitted on raw features; the classes are in the graph
        hints = Hints(classes=_onnx_classes(proto), default_model_input="raw")
    return from_onnx_proto(proto, origin=f"--model {path}", input_name=input_name, output=output,
                           sample=sample, hints=hints)


def _onnx_classes(proto: Any) -> tuple[Any, ...] | None:
    """Class labels a converted classifier carries (ZipMap, TreeEnsembleClassifier, ...)."""
    import onnx

    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.name in ("classlabels_strings", "classlabels_int64s"):
                values = onnx.helper.get_attribute_value(attr)
                return tuple(v.decode() if isinstance(v, bytes) else int(v) for v in values)
    return None
