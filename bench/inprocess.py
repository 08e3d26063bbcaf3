"""What one request's Python costs in Quorum, with no transport: v2 ModelInfer calls made one
after another through the wrapped servicer, in the server's own process and objects.

    python bench/inprocess.py [--model digits_mlp_a] [--calls 2000] [--repeats 5] [--profile]

It builds what `quorum serve` builds (settings from QUORUM_* as usual, the model manager,
monitor, data plane, the v2 servicer wrapped by HandlerWrapper as at registration), then
parses, answers and serialises one one-row request at a time, as a client at concurrency 1
would see it minus gRPC. Prints the best and median time per request over the repeats
(`--json` writes them); `--profile` prints cProfile's top entries of one more repeat. Only a
stand-in context takes gRPC's place (no deadline, no metadata). Compare two checkouts by
running each one's copy of this file in turn, never across hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service._proto.inference import grpc_service_pb2 as pb  # noqa: E402
from service.api.handlers import HandlerWrapper  # noqa: E402
from service.api.v2 import InferenceServicer  # noqa: E402
from service.server import QuorumServer  # noqa: E402
from service.settings import Settings  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"


class CallContext:
    """gRPC's side of a unary call, as the wrapper and servicer use it: no deadline, no metadata."""

    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple:
        return ()

    def set_trailing_metadata(self, metadata: tuple) -> None:
        pass

    def cancelled(self) -> bool:
        return False


async def measure(model: str, calls: int, repeats: int, profile: bool, concurrency: int = 1,
                  parameters: dict[str, float] | None = None) -> dict:
    server = QuorumServer(Settings())
    await server.manager.start()
    try:
        if server.monitor:
            server.monitor.prime()
        server.api.loaded, server.admission.loading = True, False
        handler = grpc.unary_unary_rpc_method_handler(
            InferenceServicer(server.api).ModelInfer, request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelInferResponse.SerializeToString)
        wrapped = HandlerWrapper(observer=server.monitor, admission=server.admission).wrap(METHOD, handler)
        info = server.api.data.info(model)
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name=info.input.name, datatype="FP32", shape=[1, *info.input.shape[1:]])
        rng = np.random.default_rng(0)
        request.raw_input_contents.append(rng.random((1, *info.input.shape[1:]), dtype=np.float32).tobytes())
        for key, value in (parameters or {}).items():
            request.parameters[key].double_param = value
        data, context = request.SerializeToString(), CallContext()

        async def one() -> bytes:
            answer = await wrapped.unary_unary(wrapped.request_deserializer(data), context)
            return wrapped.response_serializer(answer)

        async def loop(n: int) -> None:
            for _ in range(n):
                await one()

        async def run(n: int) -> None:  # `concurrency` callers, n calls in all (they batch together)
            await asyncio.gather(*(loop(n // concurrency) for _ in range(concurrency)))

        await run(max(10 * concurrency, calls // 10))  # warm: first batches, caches
        per_request_us = []
        for _ in range(repeats):
            start = time.perf_counter()
            await run(calls)
            per_request_us.append((time.perf_counter() - start) / (calls // concurrency * concurrency) * 1e6)
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(calls):
                await one()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return {"model": model, "calls": calls, "repeats": repeats, "concurrency": concurrency,
                "parameters": parameters or {}, "per_request_us": per_request_us,
                "best_us": min(per_request_us), "median_us": statistics.median(per_request_us)}
    finally:
        await server.manager.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits_mlp_a")
    p.add_argument("--calls", type=int, default=2000, help="requests per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="cProfile one more repeat")
    p.add_argument("--json", type=Path, help="write the result here")
    args = p.parse_args()
    result = asyncio.run(measure(args.model, args.calls, args.repeats, args.profile))
    print(f"{result['model']}: {result['best_us']:.1f} us per request (best of {args.repeats}), "
          f"median {result['median_us']:.1f} us, {args.calls} calls each")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
