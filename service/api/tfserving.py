"""TF Serving's tensorflow.serving.PredictionService and ModelService, for the stubs of the
tensorflow-serving-api package."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np

from service import tf_protos

tf_protos.install()  # TF Serving's protos, not TensorFlow: an ONNX-only server never loads it
from tensorflow.core.framework import tensor_shape_pb2  # noqa: E402
from tensorflow.core.protobuf import meta_graph_pb2  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2, get_model_metadata_pb2, get_model_status_pb2, inference_pb2,
    model_management_pb2, predict_pb2, prediction_service_pb2_grpc, regression_pb2, status_pb2)
from tensorflow_serving.apis import model_service_pb2_grpc  # noqa: E402

from service.api import inference
from service.api.common import check_declared, deadline_of
from service.api.context import ApiContext
from service.api.limits import short
from service.codecs import tensorproto
from service.codecs.dtypes import from_numpy
from service.results import ModelInfo
from service.errors import InvalidInput, ModelNotFound
from service.outputs import outputs_of
from service.repository.served import State

SIGNATURES = ("", "serving_default", "predict")
CLASSIFY, REGRESS = "tensorflow/serving/classify", "tensorflow/serving/regress"


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, api: ApiContext) -> None:
        self.api = api

    def _version(self, spec) -> int | None:
        """model_spec's version, or its version_label resolved through model.yaml."""
        if spec.HasField("version"):
            return spec.version.value or None
        if spec.version_label:
            return inference.labelled_version(self.api, spec.name, spec.version_label)
        return None

    def _signature(self, spec) -> None:
        check_signature(spec.name, spec.signature_name)

    async def Predict(self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext) -> predict_pb2.PredictResponse:
        spec = request.model_spec
        self._signature(spec)
        version = self._version(spec)
        info = self.api.data.info(spec.name, version)  # NOT_FOUND before the inputs are decoded
        check_declared(info, {k: tensorproto.declared(v, k) for k, v in request.inputs.items()})
        limit = self.api.manager.settings.max_message_bytes
        inputs = {k: tensorproto.decode(v, k, limit) for k, v in request.inputs.items()}
        answer = await inference.infer(self.api, spec.name, inputs, version=version,
                                       deadline=deadline_of(context), outputs=list(request.output_filter), info=info)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = answer.result.version
        response.model_spec.signature_name = "serving_default"
        for name, array in answer.tensors.items():
            tensorproto.encode_into(array, response.outputs[name])
        return response

    async def _classify(self, spec, request_input, deadline: float | None) -> tuple[int, list[list[tuple[str, float]]]]:
        self._signature(spec)
        version = self._version(spec)
        info = self.api.data.info(spec.name, version)
        rows = _examples_to_rows(request_input, info)
        answer = await inference.infer(self.api, spec.name, {info.input.name: rows},
                                       version=version, deadline=deadline, outputs=["probabilities"])
        return answer.result.version, classifications(answer)

    async def Classify(self, request: classification_pb2.ClassificationRequest,
                       context: grpc.aio.ServicerContext) -> classification_pb2.ClassificationResponse:
        spec = request.model_spec
        version, rows = await self._classify(spec, request.input, deadline_of(context))
        response = classification_pb2.ClassificationResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = version
        response.model_spec.signature_name = "serving_default"
        _fill_classifications(response.result, rows)
        return response

    async def Regress(self, request: regression_pb2.RegressionRequest, context: grpc.aio.ServicerContext):
        raise InvalidInput(regress_refusal(request.model_spec.name))

    async def MultiInference(self, request: inference_pb2.MultiInferenceRequest,
                             context: grpc.aio.ServicerContext) -> inference_pb2.MultiInferenceResponse:
        """Classification tasks on one shared input (TF Serving answers each task in turn);
        regression tasks are refused as Regress is."""
        if not request.tasks:
            raise InvalidInput("MultiInference needs at least one task")
        for task in request.tasks:
            if task.method_name != CLASSIFY:
                raise InvalidInput(f"model '{task.model_spec.name}': MultiInference task method "
                                   f"{task.method_name!r} is not served; " + (
                                       regress_refusal(task.model_spec.name) if task.method_name == REGRESS
                                       else f"tasks must be {CLASSIFY}"))
        response = inference_pb2.MultiInferenceResponse()
        deadline = deadline_of(context)
        for task in request.tasks:
            version, rows = await self._classify(task.model_spec, request.input, deadline)
            result = response.results.add()
            result.model_spec.name = task.model_spec.name
            result.model_spec.version.value = version
            result.model_spec.signature_name = "serving_default"
            _fill_classifications(result.classification_result, rows)
        return response

    async def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest,
                               context: grpc.aio.ServicerContext) -> get_model_metadata_pb2.GetModelMetadataResponse:
        spec = request.model_spec
        if list(request.metadata_field) != ["signature_def"]:
            raise InvalidInput(f"metadata_field must be ['signature_def'], got {list(request.metadata_field)}")
        wanted = self._version(spec)
        info = self.api.data.info(spec.name, wanted)  # NOT_FOUND for an unknown model or version
        version = wanted or (info.versions[-1] if info.versions else 1)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = version
        signatures = get_model_metadata_pb2.SignatureDefMap()
        signatures.signature_def["serving_default"].CopyFrom(_signature_def(info))
        response.metadata["signature_def"].Pack(signatures)
        return response


def check_signature(model: str, signature: str) -> None:
    if signature not in SIGNATURES:
        raise InvalidInput(f"model '{model}' has no signature '{signature}' (use serving_default)")


def regress_refusal(model: str) -> str:
    return (f"model '{model}': Regress does not apply: Quorum serves classifiers, whose answer is a "
            "label and class probabilities, not a real-valued target; use Classify or Predict")


def classifications(answer: inference.Answer) -> list[list[tuple[str, float]]]:
    """Each row's (label, calibrated probability) for every class, as Classify answers."""
    labels = answer.result.labels
    return [list(zip(labels, row)) for row in answer.tensors["probabilities"].tolist()]


def _fill_classifications(result: classification_pb2.ClassificationResult,
                          rows: list[list[tuple[str, float]]]) -> None:
    for row in rows:
        classes = result.classifications.add().classes
        for label, score in row:
            classes.add(label=label, score=score)


def _signature_def(info: ModelInfo) -> meta_graph_pb2.SignatureDef:
    signature = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    tensor = signature.inputs[info.input.name]
    tensor.name = f"{info.input.name}:0"
    tensor.dtype = from_numpy(np.dtype(info.input.dtype)).tf
    tensor.tensor_shape.CopyFrom(_shape(info.input.shape))
    classes = len(info.labels)
    for output in outputs_of(info.kind, info.default_coverage is not None):
        out = signature.outputs[output.name]
        out.name, out.dtype = f"{output.name}:0", from_numpy(output.dtype).tf
        out.tensor_shape.CopyFrom(_shape(output.shape(classes)))
    return signature


def _shape(dims) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])


def _examples_to_rows(request_input, info: ModelInfo) -> np.ndarray:
    """tf.Example inputs carrying the model's input as a float feature, one row each."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        examples = request_input.example_list.examples
    elif kind == "example_list_with_context":
        examples = request_input.example_list_with_context.examples
    else:
        raise InvalidInput("Classify needs input.example_list with one tf.Example per row")
    if not examples:
        raise InvalidInput(f"model '{info.name}': Classify got no examples")
    name = info.input.name
    rows = []
    for i, example in enumerate(examples):
        feature = example.features.feature.get(name)
        if feature is None or feature.WhichOneof("kind") != "float_list":
            raise InvalidInput(f"model '{info.name}': example {i} needs float feature '{name}'")
        rows.append(np.asarray(feature.float_list.value, dtype=np.float32))
    if len({r.size for r in rows}) != 1:
        raise InvalidInput(f"model '{info.name}': examples' '{name}' features differ in length")
    return np.stack(rows)


TF_STATE = {State.START: get_model_status_pb2.ModelVersionStatus.START,
            State.LOADING: get_model_status_pb2.ModelVersionStatus.LOADING,
            State.AVAILABLE: get_model_status_pb2.ModelVersionStatus.AVAILABLE,
            State.UNLOADING: get_model_status_pb2.ModelVersionStatus.UNLOADING,
            State.END: get_model_status_pb2.ModelVersionStatus.END}


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, api: ApiContext) -> None:
        self.api = api

    async def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest,
                             context: grpc.aio.ServicerContext) -> get_model_status_pb2.GetModelStatusResponse:
        name = request.model_spec.name
        response = get_model_status_pb2.GetModelStatusResponse()
        manager = self.api.manager
        wanted = request.model_spec.version.value if request.model_spec.HasField("version") else None
        manager.check_known(name, wanted)  # NOT_FOUND for an unknown model or version
        if manager.ensemble(name) is not None:
            ready = manager.is_ready(name)
            status = response.model_version_status.add(
                version=1, state=TF_STATE[State.AVAILABLE if ready else State.END])
            status.status.error_code = 0 if ready else 14  # UNAVAILABLE
            status.status.error_message = manager.ensemble_problem(name)
            return response
        statuses = manager.statuses(name)
        if wanted:
            statuses = [s for s in statuses if s.version == wanted]
        if not statuses:
            raise ModelNotFound(f"model '{name}'" + (f" version {wanted}" if wanted else "") + " not found")
        for s in statuses:
            status = response.model_version_status.add(version=s.version, state=TF_STATE[s.state])
            status.status.error_code = 9 if s.error else 0  # FAILED_PRECONDITION
            status.status.error_message = s.error
        return response

    async def HandleReloadConfigRequest(self, request: model_management_pb2.ReloadConfigRequest,
                                        context: grpc.aio.ServicerContext) -> model_management_pb2.ReloadConfigResponse:
        """The listed models are served, every other one is unloaded (TF Serving replaces
        its whole model config the same way). Models come from this server's repository:
        the whole config is checked before anything changes (service.repository.control)."""
        manager = self.api.manager
        manager.check_control("HandleReloadConfigRequest")
        if request.config.WhichOneof("config") != "model_config_list":
            raise InvalidInput("ReloadConfigRequest needs config.model_config_list")
        configs = request.config.model_config_list.config
        for c in configs:
            expected = manager.root / c.name
            if c.base_path and Path(c.base_path).resolve() != expected.resolve():
                raise InvalidInput(f"model {short(c.name)!r}: base_path must be empty or {str(expected)!r}, "
                                   "models are served from this server's repository only; nothing was changed")
        errors = await manager.reload_config([c.name for c in configs])
        response = model_management_pb2.ReloadConfigResponse()
        response.status.CopyFrom(status_pb2.StatusProto(
            error_code=9 if errors else 0, error_message="; ".join(errors)))  # FAILED_PRECONDITION
        return response
