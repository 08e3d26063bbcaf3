"""Wire compatibility of protos/inference/grpc_service.proto with tritonclient's copy.

Every RPC Quorum serves, and every message reachable from them, must match the
descriptors tritonclient.grpc was generated from: field names, numbers, types,
labels, message/enum type names, oneofs and map-ness. Then a request built by
tritonclient must survive a trip through Quorum's classes byte for byte.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from tritonclient.grpc import service_pb2 as triton_pb

from service._proto import POOL
from service._proto.inference import grpc_service_pb2 as pb
from service._proto.inference import grpc_service_pb2_grpc

OURS = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
THEIRS = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVED = [
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
    "ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex",
    "RepositoryModelLoad", "RepositoryModelUnload", "TraceSetting", "LogSettings",
]
# protos/inference/model_config.proto carries a subset of Triton's ModelConfig fields.
SUBSET_FILE = "inference/model_config.proto"


def _reachable(roots: list[Descriptor]) -> dict[str, Descriptor]:
    """Every message type reachable from `roots`, nested and field types included."""
    seen: dict[str, Descriptor] = {}
    stack = list(roots)
    while stack:
        message = stack.pop()
        if message.full_name in seen:
            continue
        seen[message.full_name] = message
        stack.extend(message.nested_types)
        stack.extend(f.message_type for f in message.fields if f.message_type is not None)
    return seen


def _signature(field: FieldDescriptor) -> tuple:
    # protobuf 7 dropped FieldDescriptor.label; is_repeated and has_presence carry it
    # (repeated / singular / explicitly optional).
    return (
        field.number,
        field.type,
        field.is_repeated,
        field.message_type.full_name if field.message_type else None,
        field.enum_type.full_name if field.enum_type else None,
        field.containing_oneof.name if field.containing_oneof else None,
        field.has_presence,
    )


def _our_messages() -> dict[str, Descriptor]:
    methods = [OURS.methods_by_name[name] for name in SERVED]
    return _reachable([m.input_type for m in methods] + [m.output_type for m in methods])


def test_service_serves_exactly_the_chosen_rpcs() -> None:
    assert [m.name for m in OURS.methods] == SERVED
    assert OURS.full_name == THEIRS.full_name == "inference.GRPCInferenceService"


@pytest.mark.parametrize("name", SERVED)
def test_rpc_signature_matches_tritonclient(name: str) -> None:
    ours, theirs = OURS.methods_by_name[name], THEIRS.methods_by_name[name]
    assert ours.input_type.full_name == theirs.input_type.full_name
    assert ours.output_type.full_name == theirs.output_type.full_name
    assert ours.client_streaming == theirs.client_streaming
    assert ours.server_streaming == theirs.server_streaming


def test_the_reachable_messages_are_the_expected_ones() -> None:
    names = set(_our_messages())
    # Spot checks that the walk really covers nested and transitively used types.
    for expected in [
        "inference.ModelInferRequest.InferInputTensor",
        "inference.ModelInferRequest.InferInputTensor.ParametersEntry",
        "inference.InferTensorContents",
        "inference.InferParameter",
        "inference.ModelStatistics.ResponseStatsEntry",
        "inference.InferResponseStatistics",
        "inference.RepositoryIndexResponse.ModelIndex",
        "inference.ModelRepositoryParameter",
    ]:
        assert expected in names
    assert len(names) >= 40


@pytest.mark.parametrize("full_name", sorted(_our_messages()))
def test_message_matches_tritonclient(full_name: str) -> None:
    ours = POOL.FindMessageTypeByName(full_name)
    theirs = triton_pb.DESCRIPTOR.pool.FindMessageTypeByName(full_name)
    subset = ours.file.name == SUBSET_FILE
    if subset:  # each field we carry is theirs, in name, number, type and oneof
        assert {f.name for f in ours.fields} <= {f.name for f in theirs.fields}
        assert {o.name for o in ours.oneofs} <= {o.name for o in theirs.oneofs}
        assert {n.name for n in ours.nested_types} <= {n.name for n in theirs.nested_types}
    else:
        assert [f.name for f in ours.fields] == [f.name for f in theirs.fields]
        assert [o.name for o in ours.oneofs] == [o.name for o in theirs.oneofs]
        assert sorted(n.name for n in ours.nested_types) == sorted(n.name for n in theirs.nested_types)
    for field in ours.fields:
        assert _signature(field) == _signature(theirs.fields_by_name[field.name]), field.full_name
        if field.enum_type is not None:
            ours_values = [(v.name, v.number) for v in field.enum_type.values]
            theirs_values = {(v.name, v.number) for v in theirs.fields_by_name[field.name].enum_type.values}
            assert set(ours_values) <= theirs_values, field.full_name
    assert ours.GetOptions().map_entry == theirs.GetOptions().map_entry


def test_quorum_protos_live_in_their_own_pool() -> None:
    # tritonclient owns `inference.*` in the default pool; both load in one process.
    assert pb.DESCRIPTOR.pool is POOL
    assert triton_pb.DESCRIPTOR.pool is not POOL
    assert pb.ModelInferRequest.__module__ == "service._proto.inference.grpc_service_pb2"


def test_stub_paths_are_the_triton_paths() -> None:
    import grpc

    channel = grpc.insecure_channel("localhost:1")
    try:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelInfer._method == b"/inference.GRPCInferenceService/ModelInfer"
    finally:
        channel.close()


def test_tritonclient_request_round_trips_byte_for_byte() -> None:
    image = triton.InferInput("images", [2, 3], "FP32")
    image.set_data_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    names = triton.InferInput("names", [2], "BYTES")
    names.set_data_from_numpy(np.array([b"a", b"bc"], dtype=object))
    request = triton_pb.ModelInferRequest(model_name="digits", model_version="3", id="r1")
    request.parameters["priority"].uint64_param = 2
    request.parameters["timeout"].int64_param = 1000
    for tensor in (image, names):
        request.inputs.append(tensor._get_tensor())
        request.raw_input_contents.append(tensor._get_content())
    requested = request.outputs.add(name="probabilities")
    requested.parameters["classification"].int64_param = 3
    wire = request.SerializeToString(deterministic=True)

    ours = pb.ModelInferRequest.FromString(wire)
    assert ours.model_name == "digits" and ours.model_version == "3" and ours.id == "r1"
    assert ours.parameters["priority"].uint64_param == 2
    assert [t.name for t in ours.inputs] == ["images", "names"]
    assert ours.outputs[0].parameters["classification"].int64_param == 3
    assert ours.SerializeToString(deterministic=True) == wire


def test_our_response_reads_back_in_tritonclient() -> None:
    response = pb.ModelInferResponse(model_name="digits", model_version="1", id="r1")
    response.outputs.add(name="probabilities", datatype="FP32", shape=[1, 2])
    response.raw_output_contents.append(np.array([[0.25, 0.75]], dtype=np.float32).tobytes())
    stream = pb.ModelStreamInferResponse(infer_response=response)
    stats = pb.ModelStatisticsResponse()
    model = stats.model_stats.add(name="digits", version="1", inference_count=5)
    model.inference_stats.success.count = 5
    model.inference_stats.success.ns = 123
    model.batch_stats.add(batch_size=4).compute_infer.ns = 9

    theirs = triton_pb.ModelStreamInferResponse.FromString(stream.SerializeToString())
    result = triton.InferResult(theirs.infer_response)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), [[0.25, 0.75]])
    their_stats = triton_pb.ModelStatisticsResponse.FromString(stats.SerializeToString())
    assert their_stats.model_stats[0].inference_stats.success.ns == 123
    assert their_stats.model_stats[0].batch_stats[0].compute_infer.ns == 9
