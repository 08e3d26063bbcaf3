"""Server reflection under both names grpcurl and other tools look for:
`grpc.reflection.v1alpha.ServerReflection` (grpcio-reflection's) and
`grpc.reflection.v1.ServerReflection` (what newer grpcurl and grpcui try first).

grpcio-reflection 1.85 registers v1alpha only. v1 is the same service with the same
messages under another package, so the one servicer answers both; the v1 file descriptor
is v1alpha's renamed, so that v1 can describe itself too.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from service._proto import POOL
from service._proto.inference import grpc_service_pb2
from service._proto.quorum.v1 import ensemble_pb2
from service.api.engine import HandlerRegistry

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    file.name, file.package = V1_FILE, "grpc.reflection.v1"
    for message in file.message_type:
        for field in message.field:
            if field.type_name.startswith(".grpc.reflection.v1alpha."):
                field.type_name = field.type_name.replace(".v1alpha.", ".v1.", 1)
    for method in file.service[0].method:
        method.input_type = method.input_type.replace(".v1alpha.", ".v1.", 1)
        method.output_type = method.output_type.replace(".v1alpha.", ".v1.", 1)
    pool.Add(file)


def enable(server: HandlerRegistry, service_names: list[str], pool: descriptor_pool.DescriptorPool) -> None:
    """Serve reflection v1 and v1alpha over `service_names` (both reflection services added)."""
    _add_v1_descriptor(pool)
    names = [*service_names, reflection.SERVICE_NAME, V1_SERVICE]
    # grpc-stubs 1.53 has no grpc_reflection.v1alpha.reflection.aio (grpcio-reflection's asyncio servicer).
    servicer = reflection.aio.ReflectionServicer(names, pool=pool)  # type: ignore[attr-defined]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}),))


def service_names() -> list[str]:
    from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2

    return [
        prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name,
        model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
        grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        ensemble_pb2.DESCRIPTOR.services_by_name["EnsembleService"].full_name,
    ]


def _add_to_pool(pool: descriptor_pool.DescriptorPool, file: FileDescriptor) -> None:
    """Copy a proto file (dependencies first) into the reflection pool, once."""
    try:
        pool.FindFileByName(file.name)
        return
    except KeyError:
        pass
    for dependency in file.dependencies:
        _add_to_pool(pool, dependency)
    pool.AddSerializedFile(file.serialized_pb)


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """Quorum's protos live in their own pool (tritonclient registers the same `inference`
    names in the default pool); TF Serving's and health's files are copied in beside them."""
    from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2

    for module in (prediction_service_pb2, model_service_pb2, health_pb2):
        _add_to_pool(POOL, module.DESCRIPTOR)
    return POOL
