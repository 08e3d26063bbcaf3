"""add_servicer: TF Serving's older generated code registers only a generic handler, which
pygrpc-native hands to its grpcio fallback; add_servicer registers every method by name too."""

from __future__ import annotations

import grpc
from tensorflow_serving.apis import (model_service_pb2, model_service_pb2_grpc, predict_pb2, prediction_service_pb2,
                                     prediction_service_pb2_grpc)

from service.api.engine import add_servicer


class Recording:
    """What a server is told (the registration API of grpc.aio.Server)."""

    def __init__(self) -> None:
        self.generic: list = []
        self.registered: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers) -> None:
        self.registered[service] = dict(handlers)


class Predicting(prediction_service_pb2_grpc.PredictionServiceServicer):
    def Predict(self, request, context):
        return predict_pb2.PredictResponse(model_spec=request.model_spec)


def test_every_tf_serving_method_is_registered_by_name_as_the_generated_code_defines_it():
    server = Recording()
    for add, servicer, module, name in (
            (prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server, Predicting(),
             prediction_service_pb2, "PredictionService"),
            (model_service_pb2_grpc.add_ModelServiceServicer_to_server,
             model_service_pb2_grpc.ModelServiceServicer(), model_service_pb2, "ModelService")):
        add_servicer(server, add, servicer, module.DESCRIPTOR.services_by_name[name])
    assert set(server.registered["tensorflow.serving.PredictionService"]) == {
        "Classify", "Regress", "Predict", "MultiInference", "GetModelMetadata"}
    assert set(server.registered["tensorflow.serving.ModelService"]) == {"GetModelStatus", "HandleReloadConfigRequest"}
    assert len(server.generic) == 2  # grpcio still finds them the generic way too
    predict = server.registered["tensorflow.serving.PredictionService"]["Predict"]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    wire = predict.request_deserializer(request.SerializeToString())
    answer = predict.response_serializer(predict.unary_unary(wire, None))
    assert predict_pb2.PredictResponse.FromString(answer).model_spec.name == "digits"
