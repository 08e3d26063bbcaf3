"""Goodput under overload: the 5-member digits ensemble (KServe v2, one row per request).

Starts `quorum serve` (from --root, default this checkout, with this Python), measures its
closed-loop capacity at c=64 (30 s deadlines), then drives it with --clients concurrent
clients whose requests carry --deadline-ms deadlines for --seconds, and reports:

- goodput: answers within their deadline per second, and its ratio to the capacity;
- every failure by status code, and how long failures took (p99 against 2x the deadline:
  a refused request should fail fast, not at its deadline);
- the p99 latency of the successes (within the deadline, if admission works).

    .venv/bin/python bench/overload.py [--clients 512 --deadline-ms 50 --seconds 30]
    .venv/bin/python bench/overload.py --root /path/to/older/checkout   # the same, before

Results in bench/results/overload.json (the last run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.loadgen import MAX_MESSAGE, make_request, run_load  # noqa: E402
from service._proto.inference import grpc_service_pb2 as v2_pb  # noqa: E402
from tests.helpers import free_port  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def start(root: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(root)}
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--model-repository", str(root / "models"),
         "--grpc-port", str(port), "--metrics-port", str(free_port()), "--http-port", "0",
         "--device", "cpu", "--log-level", "WARNING"], cwd=root, env=env)


async def wait_ready(address: str, payload: bytes) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD)
        for _ in range(600):
            try:
                v2_pb.ModelInferResponse.FromString(await call(payload, timeout=5))
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
    raise TimeoutError("server not ready")


async def overload(address: str, payload: bytes, clients: int, deadline_s: float, seconds: float) -> dict:
    outcomes: list[tuple[str, float]] = []
    options = [("grpc.max_receive_message_length", MAX_MESSAGE)]
    channels = [grpc.aio.insecure_channel(address, options=options + [("bench.channel", i)]) for i in range(4)]
    calls = [ch.unary_unary(METHOD) for ch in channels]
    stop_at = time.perf_counter() + seconds

    async def client(i: int) -> None:
        call = calls[i % len(calls)]
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                await call(payload, timeout=deadline_s)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            outcomes.append((code, time.perf_counter() - start))

    began = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - began
    for ch in channels:
        await ch.close()
    ok = np.array([s for c, s in outcomes if c == "OK"]) * 1000
    failed = np.array([s for c, s in outcomes if c != "OK"]) * 1000
    in_time = int((ok <= deadline_s * 1000).sum())
    return {"clients": clients, "deadline_ms": deadline_s * 1000, "seconds": round(wall, 2),
            "requests": len(outcomes), "goodput_rps": in_time / wall,
            "codes": dict(Counter(c for c, _ in outcomes)),
            "success_p99_ms": float(np.percentile(ok, 99)) if ok.size else None,
            "failure_p50_ms": float(np.percentile(failed, 50)) if failed.size else None,
            "failure_p99_ms": float(np.percentile(failed, 99)) if failed.size else None}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=BENCH.parent, help="the checkout whose server runs")
    p.add_argument("--model", default="digits")
    p.add_argument("--clients", type=int, default=512)
    p.add_argument("--deadline-ms", type=float, default=50.0)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--capacity-seconds", type=float, default=15.0)
    args = p.parse_args()
    port = free_port()
    address = f"127.0.0.1:{port}"
    payload = make_request("v2", args.model, (1, 64), "pixels")
    server = start(args.root.resolve(), port)
    try:
        await wait_ready(address, payload)
        capacity = await run_load(target=address, protocol="v2", model=args.model, shape=(1, 64), concurrency=64,
                                  duration=args.capacity_seconds, warmup=2, channels=4, server_pid=server.pid)
        result = await overload(address, payload, args.clients, args.deadline_ms / 1000, args.seconds)
    finally:
        server.terminate()
        server.wait(timeout=60)
    result.update(root=str(args.root), model=args.model, capacity_rps=capacity.throughput_rps,
                  capacity_p99_ms=capacity.latency_ms["p99"])
    result["goodput_ratio"] = result["goodput_rps"] / capacity.throughput_rps
    out = BENCH / "results" / "overload.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"capacity (c=64): {capacity.throughput_rps:.0f} req/s, p99 {capacity.latency_ms['p99']:.1f} ms")
    print(f"overload ({args.clients} clients, {args.deadline_ms:g} ms deadlines, {result['seconds']} s): "
          f"goodput {result['goodput_rps']:.0f} req/s = {result['goodput_ratio']:.2f} x capacity")
    print(f"  outcomes {result['codes']}; successes p99 {result['success_p99_ms'] or float('nan'):.1f} ms; "
          f"failures p50 {result['failure_p50_ms'] or float('nan'):.1f} / p99 {result['failure_p99_ms'] or float('nan'):.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
