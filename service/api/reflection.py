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
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

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
