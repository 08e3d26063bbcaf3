"""What a bad or hostile client sends, for tests/e2e/test_bad_input.py: request builders, and
the matrix of hostile calls across every protocol and RPC with the status each must get."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2, get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
    prediction_service_pb2_grpc)
from tritonclient.grpc import service_pb2, service_pb2_grpc

from service._proto.quorum.v1 import ensemble_pb2 as qpb
from service._proto.quorum.v1 import ensemble_pb2_grpc as qpb_grpc
from tests.e2e.fixtures import ENSEMBLE, MEMBER

OK, INVALID, NOT_FOUND = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED
MB = "x" * 2**20  # a 1 MB name or id


# -- calling, and what the server became ----------------------------------------------------
def code_of_call(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, ""


def infer_request(model: str, rows: np.ndarray, *, name: str = "pixels", datatype: str = "FP32",
                   shape=None, raw: bytes | None = None, version: str = "") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=name, datatype=datatype, shape=list(rows.shape if shape is None else shape))
    request.raw_input_contents.append(rows.tobytes() if raw is None else raw)
    return request


def tf_predict_call(channel, model: str, tensor, version: int | None = None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["pixels"].CopyFrom(tensor)
    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)


def rss(server) -> int:
    for line in open(f"/proc/{server.process.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def code_of_future(future) -> grpc.StatusCode:
    try:
        future.result()
        return OK
    except grpc.RpcError as exc:
        return exc.code()


# -- request builders -------------------------------------------------------------------------
def v2_raw(datatype: str, shape, raw: bytes, **fields) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=fields.pop("model_name", ENSEMBLE), **fields)
    request.inputs.add(name="pixels", datatype=datatype, shape=list(shape))
    request.raw_input_contents.append(raw)
    return request


def v2_typed(datatype: str, shape, field: str, values) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=ENSEMBLE)
    tensor = request.inputs.add(name="pixels", datatype=datatype, shape=list(shape))
    getattr(tensor.contents, field).extend(values)
    return request


def v2_good(**fields) -> service_pb2.ModelInferRequest:
    return v2_raw("FP32", [1, 64], np.zeros((1, 64), np.float32).tobytes(), **fields)


def tensor_proto(dtype: int, shape, **values) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]))
    for key, value in values.items():
        if key == "tensor_content":
            proto.tensor_content = value
        else:
            getattr(proto, key).extend(value)
    return proto


def tf_predict(*tensors: tuple[str, tensor_pb2.TensorProto], model: str = MEMBER) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for key, proto in tensors:
        request.inputs[key].CopyFrom(proto)
    return request


def classify(examples: list[example_pb2.Example], model: str = MEMBER) -> classification_pb2.ClassificationRequest:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = model
    request.input.example_list.examples.extend(examples)
    return request


def example(feature: str, values) -> example_pb2.Example:
    return example_pb2.Example(features=feature_pb2.Features(feature={
        feature: feature_pb2.Feature(float_list=feature_pb2.FloatList(value=values))}))


def q_predict(shape=(1, 64), content: bytes | None = None, **fields) -> qpb.PredictRequest:
    content = np.zeros((1, 64), np.float32).tobytes() if content is None else content
    return qpb.PredictRequest(model=fields.pop("model", ENSEMBLE),
                              inputs=qpb.Tensor(dtype=fields.pop("dtype", "FP32"), shape=list(shape), content=content),
                              **fields)


def tf_metadata(name: str) -> get_model_metadata_pb2.GetModelMetadataRequest:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = name
    return request


def tf_status(name: str) -> get_model_status_pb2.GetModelStatusRequest:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    return request


def many_parameters() -> service_pb2.ModelInferRequest:
    request = v2_good()
    for i in range(10_000):
        request.parameters[f"p{i}"].int64_param = i
    return request


def feedback_unknown(n: int) -> qpb.FeedbackRequest:
    return qpb.FeedbackRequest(labels=[qpb.FeedbackRequest.Label(request_id=f"never-{i}", row=0, label="3")
                                       for i in range(n)])


# -- the matrix: (id, service stub attribute, method, request, expected code) ------------------
@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[grpc.Channel], Callable]  # the channel -> a callable taking (request, timeout)
    request: Callable[[], object]
    code: grpc.StatusCode


def v2(method: str):
    return lambda ch: getattr(service_pb2_grpc.GRPCInferenceServiceStub(ch), method)


def tfs(method: str):
    return lambda ch: getattr(prediction_service_pb2_grpc.PredictionServiceStub(ch), method)


def tfm(method: str):
    return lambda ch: getattr(model_service_pb2_grpc.ModelServiceStub(ch), method)


def quorum(method: str):
    return lambda ch: getattr(qpb_grpc.EnsembleServiceStub(ch), method)


def health(method: str):
    return lambda ch: getattr(health_pb2_grpc.HealthStub(ch), method)


def raw(method: str):
    return lambda ch: ch.unary_unary(method, request_serializer=None, response_deserializer=None)


GARBAGE = b"\xff" * 64 + b"\x0a\xff\xff\xff\xff"
F32 = types_pb2.DT_FLOAT
CASES = [
    # KServe v2 ModelInfer: declared shapes against raw and typed payloads, every kind of dtype
    Case("v2-bytes-raw-2^27", v2("ModelInfer"), lambda: v2_raw("BYTES", [1, 2**27], b"\0" * 8), INVALID),
    Case("v2-bytes-raw-2^40", v2("ModelInfer"), lambda: v2_raw("BYTES", [1, 2**40], b"\0" * 8), INVALID),
    Case("v2-fp32-raw-2^40", v2("ModelInfer"), lambda: v2_raw("FP32", [1, 2**40], b"\0" * 8), INVALID),
    Case("v2-fp32-raw-2^31-rows", v2("ModelInfer"), lambda: v2_raw("FP32", [2**31, 64], b"\0" * 256), INVALID),
    Case("v2-fp16-raw-2^40", v2("ModelInfer"), lambda: v2_raw("FP16", [2**40, 64], b"\0" * 2), INVALID),
    Case("v2-bool-raw-2^40", v2("ModelInfer"), lambda: v2_raw("BOOL", [1, 2**40], b"\1"), INVALID),
    Case("v2-int64-raw-overflow", v2("ModelInfer"), lambda: v2_raw("INT64", [2**62, 2**62], b"\0" * 8), INVALID),
    Case("v2-fp32-typed-2^40", v2("ModelInfer"), lambda: v2_typed("FP32", [1, 2**40], "fp32_contents", [1.0]), INVALID),
    Case("v2-bytes-typed-2^40", v2("ModelInfer"), lambda: v2_typed("BYTES", [1, 2**40], "bytes_contents", [b"a"]), INVALID),
    Case("v2-int32-typed-2^33", v2("ModelInfer"), lambda: v2_typed("INT32", [2**33], "int_contents", [1, 2]), INVALID),
    Case("v2-10000-dims", v2("ModelInfer"), lambda: v2_raw("FP32", [1] * 10_000, b"\0" * 4), INVALID),
    Case("v2-negative-dim", v2("ModelInfer"), lambda: v2_raw("FP32", [-1, 64], b"\0" * 256), INVALID),
    Case("v2-unknown-datatype", v2("ModelInfer"), lambda: v2_raw("FP99", [1, 64], b"\0" * 256), INVALID),
    Case("v2-1mb-model-name", v2("ModelInfer"), lambda: v2_good(model_name=MB), INVALID),
    Case("v2-version-abc", v2("ModelInfer"), lambda: v2_good(model_version="abc"), INVALID),
    Case("v2-version-minus-1", v2("ModelInfer"), lambda: v2_good(model_name=MEMBER, model_version="-1"), INVALID),
    Case("v2-1mb-id", v2("ModelInfer"), lambda: v2_good(id=MB), INVALID),
    Case("v2-10000-parameters", v2("ModelInfer"), many_parameters, INVALID),
    Case("v2-metadata-1mb-name", v2("ModelMetadata"), lambda: service_pb2.ModelMetadataRequest(name=MB), INVALID),
    Case("v2-metadata-unknown", v2("ModelMetadata"), lambda: service_pb2.ModelMetadataRequest(name="nope"), NOT_FOUND),
    Case("v2-ready-version-abc", v2("ModelReady"),
         lambda: service_pb2.ModelReadyRequest(name=MEMBER, version="abc"), INVALID),
    # TF Serving: TensorProto typed fields (TF pads them to the shape) and tensor_content
    Case("tf-float-val-2^28", tfs("Predict"), lambda: tf_predict(("pixels", tensor_proto(F32, [1, 2**28], float_val=[1.0]))), INVALID),
    Case("tf-float-val-2^40", tfs("Predict"), lambda: tf_predict(("pixels", tensor_proto(F32, [1, 2**40], float_val=[1.0]))), INVALID),
    Case("tf-no-values-2^40-rows", tfs("Predict"), lambda: tf_predict(("pixels", tensor_proto(F32, [2**40, 64]))), INVALID),
    Case("tf-string-val-2^40", tfs("Predict"),
         lambda: tf_predict(("pixels", tensor_proto(types_pb2.DT_STRING, [1, 2**40], string_val=[b"a"]))), INVALID),
    Case("tf-tensor-content-2^40", tfs("Predict"),
         lambda: tf_predict(("pixels", tensor_proto(F32, [1, 2**40], tensor_content=b"\0" * 8))), INVALID),
    Case("tf-1000-extra-inputs", tfs("Predict"),
         lambda: tf_predict(*[(f"in{i}", tensor_proto(F32, [1, 2**30], float_val=[1.0])) for i in range(1000)]), INVALID),
    Case("tf-unknown-dtype", tfs("Predict"), lambda: tf_predict(("pixels", tensor_proto(99, [1, 64]))), INVALID),
    Case("tf-1mb-model-name", tfs("Predict"),
         lambda: tf_predict(("pixels", tensor_proto(F32, [1, 64], float_val=[0.0])), model=MB), INVALID),
    Case("tf-garbage-bytes", raw("/tensorflow.serving.PredictionService/Predict"), lambda: GARBAGE, INVALID),
    Case("tf-classify-no-examples", tfs("Classify"), lambda: classify([]), INVALID),
    Case("tf-classify-wrong-feature", tfs("Classify"), lambda: classify([example(MB[:1000], [0.0] * 64)]), INVALID),
    Case("tf-classify-2^20-values", tfs("Classify"), lambda: classify([example("pixels", [0.0] * 2**20)]), INVALID),
    Case("tf-metadata-unknown", tfs("GetModelMetadata"), lambda: tf_metadata("nope"), NOT_FOUND),
    Case("tf-metadata-1mb-name", tfs("GetModelMetadata"), lambda: tf_metadata(MB), INVALID),
    Case("tf-status-unknown", tfm("GetModelStatus"), lambda: tf_status("nope"), NOT_FOUND),
    # quorum.v1: numeric parameters, ids, declared shapes, feedback at scale
    Case("q-latency-budget-nan", quorum("Predict"), lambda: q_predict(latency_budget_ms=math.nan), INVALID),
    Case("q-latency-budget-inf", quorum("Predict"), lambda: q_predict(latency_budget_ms=math.inf), INVALID),
    Case("q-latency-budget-negative", quorum("Predict"), lambda: q_predict(latency_budget_ms=-1.0), INVALID),
    Case("q-min-accuracy-nan", quorum("Predict"), lambda: q_predict(min_accuracy=math.nan), INVALID),
    Case("q-min-accuracy-2", quorum("Predict"), lambda: q_predict(min_accuracy=2.0), INVALID),
    Case("q-1mb-request-id", quorum("Predict"), lambda: q_predict(request_id=MB), INVALID),
    Case("q-declared-2^40-rows", quorum("Predict"), lambda: q_predict(shape=(2**40, 64)), INVALID),
    Case("q-bytes-2^40", quorum("Predict"), lambda: q_predict(shape=(1, 2**40), dtype="BYTES", content=b"\0" * 8), INVALID),
    Case("q-version-minus-1", quorum("Predict"), lambda: q_predict(model=MEMBER, version=-1), NOT_FOUND),
    Case("q-feedback-60000-unknown-ids", quorum("Feedback"), lambda: feedback_unknown(60_000), OK),
    Case("q-feedback-garbage", raw("/quorum.v1.EnsembleService/Feedback"), lambda: GARBAGE, INVALID),
    Case("q-status-unknown", quorum("GetStatus"), lambda: qpb.GetStatusRequest(model="nope"), NOT_FOUND),
    Case("q-status-1mb-name", quorum("GetStatus"), lambda: qpb.GetStatusRequest(model=MB), INVALID),
    Case("q-manifest-unknown", quorum("GetManifest"), lambda: qpb.GetManifestRequest(model="nope"), NOT_FOUND),
    Case("q-manifest-ensemble", quorum("GetManifest"), lambda: qpb.GetManifestRequest(model=ENSEMBLE), NOT_FOUND),
    Case("q-manifest-version-9", quorum("GetManifest"), lambda: qpb.GetManifestRequest(model=MEMBER, version=9),
         NOT_FOUND),
    Case("q-manifest-1mb-name", quorum("GetManifest"), lambda: qpb.GetManifestRequest(model=MB), INVALID),
    # health, unknown methods and services
    Case("health-list", health("List"), lambda: health_pb2.HealthListRequest(), OK),
    Case("health-unknown-1mb-service", health("Check"), lambda: health_pb2.HealthCheckRequest(service=MB), NOT_FOUND),
    Case("health-garbage", raw("/grpc.health.v1.Health/Check"), lambda: GARBAGE, INVALID),
    Case("unknown-method", raw("/inference.GRPCInferenceService/NoSuchMethod"), lambda: b"", UNIMPLEMENTED),
    Case("unknown-service", raw("/no.such.Service/Method"), lambda: b"", UNIMPLEMENTED),
]
