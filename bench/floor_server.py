"""The floor: a bare grpc.aio server speaking v2 ModelInfer with a precomputed answer.

    python bench/floor_server.py --port 8600 [--grpc-engine grpcio|native] [--handler bare|wrapped]

It does no work per request beyond what gRPC itself does: the request arrives as bytes
and is not parsed, and the answer is one serialised ModelInferResponse built at start-up,
shaped like Quorum's answer for one row of a 10-class model (probabilities FP32 [1,10],
label BYTES [1], class_index INT64 [1], confidence FP32 [1], raw_output_contents), so it
is the same size on the wire. Whatever a real server costs beyond this is its own.

Two variants take it apart:
- `--grpc-engine native`: the same handler on pygrpc-native (registered by name, so its
  Rust front serves it), the floor of Quorum's native engine.
- `--handler wrapped`: the request parsed as a ModelInferRequest and the handler wrapped by
  Quorum's own HandlerWrapper (request bounds, admission, request id trailer, error
  mapping), still answering the precomputed bytes: what gRPC plus Quorum's per-call edge
  cost before any model work.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service._proto.inference import grpc_service_pb2 as pb  # noqa: E402

SERVICE = "inference.GRPCInferenceService"
METHOD = f"/{SERVICE}/ModelInfer"
MAX_MESSAGE = 64 * 1024 * 1024


def precomputed_response(model: str = "digits_mlp_a", classes: int = 10) -> bytes:
    response = pb.ModelInferResponse(model_name=model, model_version="1")
    probabilities = np.full((1, classes), 1.0 / classes, dtype="<f4")
    label = b"7"
    for name, dtype, shape, raw in (
            ("probabilities", "FP32", [1, classes], probabilities.tobytes()),
            ("label", "BYTES", [1], len(label).to_bytes(4, "little") + label),
            ("class_index", "INT64", [1], np.array([7], dtype="<i8").tobytes()),
            ("confidence", "FP32", [1], np.array([0.9], dtype="<f4").tobytes())):
        response.outputs.add(name=name, datatype=dtype, shape=shape)
        response.raw_output_contents.append(raw)
    return response.SerializeToString()


async def serve(port: int, answer: bytes, engine: str = "grpcio", wrapped: bool = False) -> None:
    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return answer

    options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    if engine == "native":
        import pygrpc_native.aio

        server = pygrpc_native.aio.server(options=options)
    else:
        server = grpc.aio.server(options=options)
    if wrapped:
        from service.api.admission import Admission
        from service.api.handlers import HandlerWrapper

        admission = Admission()
        admission.loading = False  # nothing to load: open at once
        handler = grpc.unary_unary_rpc_method_handler(
            model_infer, request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelInferResponse.SerializeToString)
        HandlerWrapper(admission=admission).registrar(server).add_registered_method_handlers(
            SERVICE, {"ModelInfer": handler})
    else:
        handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)}  # bytes in, bytes out
        if engine == "native":  # registered by name: pygrpc-native serves only those itself
            server.add_registered_method_handlers(SERVICE, handlers)
        else:  # as the floor has always been measured
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    bound = server.add_insecure_port(f"[::]:{port}")
    await server.start()
    print(f"floor server on port {bound}, answer {len(answer)} bytes", flush=True)
    await server.wait_for_termination()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8600)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--grpc-engine", choices=["grpcio", "native"], default="grpcio")
    p.add_argument("--handler", choices=["bare", "wrapped"], default="bare",
                   help="wrapped: parsed and wrapped by Quorum's HandlerWrapper, as its handlers are")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        asyncio.run(serve(args.port, precomputed_response(classes=args.classes), args.grpc_engine,
                          args.handler == "wrapped"))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
