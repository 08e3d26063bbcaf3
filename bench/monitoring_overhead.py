"""Throughput with monitoring (or tracing) on vs off, in one run.

Starts two `quorum serve` processes and drives each in turn with closed-loop load
(grpc.aio, KServe v2 ModelInfer, one row per request) at a fixed concurrency, interleaved
(on, off, on, off) so that drift in the machine's state hits both alike. Only one server is
loaded at a time.

- `--what monitoring` (default): QUORUM_MONITORING=true / false.
- `--what tracing`: OpenTelemetry traces to an OTLP receiver in this process, new traces
  sampled at `--sample-ratio` (default 0.01) / tracing off; monitoring on in both.

    .venv/bin/python bench/monitoring_overhead.py --model digits --seconds 20 --concurrency 16
    .venv/bin/python bench/monitoring_overhead.py --what tracing --model digits
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service._proto.inference import grpc_service_pb2 as pb  # noqa: E402
from service._proto.inference import grpc_service_pb2_grpc as pb_grpc  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "QUORUM_LOG_LEVEL": "WARNING", **env}
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--grpc-port", str(port),
         "--metrics-port", str(free_port()), "--http-port", "0", "--device", "cpu"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, port


def otlp_receiver() -> tuple[grpc.Server, str, list[int]]:
    """An OTLP/gRPC trace receiver on loopback that counts the spans it is sent."""
    from concurrent import futures

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received = [0]

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received[0] += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, f"http://127.0.0.1:{port}", received


async def wait_ready(port: int, model: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < end:
            try:
                if (await stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=2)).ready:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"server on {port} not ready")


def request(model: str, rows: np.ndarray) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="pixels", datatype="FP32", shape=list(rows.shape))
    req.raw_input_contents.append(rows.astype(np.float32).tobytes())
    return req


async def load(port: int, model: str, seconds: float, concurrency: int) -> tuple[float, float]:
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)
    requests = [request(model, x[i:i + 1]) for i in range(256)]
    done = errors = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for r in requests[:32]:  # warm-up
            await stub.ModelInfer(r)
        end = time.monotonic() + seconds
        latencies: list[float] = []

        async def worker(k: int) -> None:
            nonlocal done, errors
            i = k
            while time.monotonic() < end:
                t = time.perf_counter()
                try:
                    await stub.ModelInfer(requests[i % len(requests)])
                    done += 1
                    latencies.append(time.perf_counter() - t)
                except grpc.aio.AioRpcError:
                    errors += 1
                i += concurrency

        start = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.monotonic() - start
    if errors:
        print(f"  {errors} errors", flush=True)
    return done / elapsed, float(np.percentile(latencies, 99) * 1000)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--what", choices=["monitoring", "tracing"], default="monitoring")
    parser.add_argument("--sample-ratio", type=float, default=0.01, help="with --what tracing")
    args = parser.parse_args()
    receiver = None
    if args.what == "tracing":
        receiver, endpoint, received = otlp_receiver()
        on_env = {"QUORUM_OTLP_ENDPOINT": endpoint, "QUORUM_TRACE_SAMPLE_RATIO": str(args.sample_ratio)}
        servers = {True: start(on_env), False: start({})}
    else:
        servers = {True: start({"QUORUM_MONITORING": "true"}), False: start({"QUORUM_MONITORING": "false"})}
    what = args.what
    try:
        for _, port in servers.values():
            await wait_ready(port, args.model)
        rates: dict[bool, list[float]] = {True: [], False: []}
        for round_ in range(args.rounds):
            for monitoring in (True, False):
                rate, p99 = await load(servers[monitoring][1], args.model, args.seconds, args.concurrency)
                rates[monitoring].append(rate)
                print(f"round {round_ + 1} {what}={'on ' if monitoring else 'off'} "
                      f"{rate:8.1f} req/s  p99 {p99:6.2f} ms", flush=True)
        on, off = np.mean(rates[True]), np.mean(rates[False])
        print(f"\n{args.model}, concurrency {args.concurrency}, {args.rounds} x {args.seconds:.0f} s each")
        print(f"{what} on : {on:8.1f} req/s")
        print(f"{what} off: {off:8.1f} req/s")
        print(f"on / off = {on / off:.3f}  (cost {100 * (1 - on / off):+.1f}%)")
        if receiver is not None:
            print(f"spans received at sampling {args.sample_ratio:g}: {received[0]}")
    finally:
        if receiver is not None:
            receiver.stop(0)
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    asyncio.run(main())
