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
    .venv/bin/python bench/overload.py --grpc-engine native             # the server on pygrpc-native
    .venv/bin/python bench/overload.py --backoff-ms 50   # refused clients wait the server's
                                                         # pushback (else jittered backoff)
    .venv/bin/python bench/overload.py --server floor    # the same load on the bare grpc.aio
                                                         # floor: what a server doing nothing gets
    .venv/bin/python bench/overload.py --open    # open-loop Poisson load in two priority
        [--servers floor,grpcio,native --load 2 --high-share 0.2]   # classes, side by side
                                                         # (bench/overload_open.py)

Results in bench/results/overload.json (the last run; --open: overload_open.json).
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

from bench import overload_open  # noqa: E402
from bench.loadgen import MAX_MESSAGE, make_request, run_load  # noqa: E402
from service._proto.inference import grpc_service_pb2 as v2_pb  # noqa: E402
from tests.helpers import free_port  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def start(root: Path, port: int, engine: str | None, server: str = "quorum",
          repository: Path | None = None) -> subprocess.Popen:
    if server == "floor":  # answers a precomputed response: gRPC's own cost and nothing else
        return subprocess.Popen([sys.executable, str(BENCH / "floor_server.py"), "--port", str(port)],
                                stdout=subprocess.DEVNULL)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(root)}
    # An older checkout may predate --grpc-engine: name it only when asked.
    engine_args = ["--grpc-engine", engine] if engine else []
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--model-repository", str(repository or root / "models"),
         "--grpc-port", str(port), "--metrics-port", str(free_port()), "--http-port", "0",
         "--device", "cpu", "--log-level", "WARNING", *engine_args], cwd=root, env=env)


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


PUSHBACK_KEY = "grpc-retry-pushback-ms"
MAX_BACKOFF_S = 1.0


def pushback_s(exc: grpc.aio.AioRpcError) -> float:
    """The server's `grpc-retry-pushback-ms` (gRPC's retry design, A6), 0 when absent."""
    for key, value in exc.trailing_metadata() or ():
        if key == PUSHBACK_KEY:
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return 0.0
    return 0.0


async def overload(address: str, payload: bytes, clients: int, deadline_s: float, seconds: float,
                   backoff_s: float = 0.0, seed: int = 0) -> dict:
    """Closed-loop clients. backoff_s = 0: a refused client sends its next request at once.
    backoff_s > 0: after RESOURCE_EXHAUSTED it waits as a gRPC client with a retry policy
    does: the server's pushback if it sent one, else a jittered exponential backoff from
    backoff_s (doubling per refusal in a row, at most MAX_BACKOFF_S)."""
    outcomes: list[tuple[str, float]] = []
    options = [("grpc.max_receive_message_length", MAX_MESSAGE)]
    channels = [grpc.aio.insecure_channel(address, options=options + [("bench.channel", i)]) for i in range(4)]
    calls = [ch.unary_unary(METHOD) for ch in channels]
    stop_at = time.perf_counter() + seconds
    rng = np.random.default_rng(seed)

    async def client(i: int) -> None:
        call = calls[i % len(calls)]
        refused = 0
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            wait = 0.0
            try:
                await call(payload, timeout=deadline_s)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                if backoff_s > 0 and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    wait = pushback_s(exc) or min(MAX_BACKOFF_S, backoff_s * 2 ** refused) * rng.uniform(0.5, 1.5)
            refused = refused + 1 if wait else 0
            outcomes.append((code, time.perf_counter() - start))
            if wait:
                await asyncio.sleep(min(wait, max(0.0, stop_at - time.perf_counter())))

    began = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - began
    for ch in channels:
        await ch.close()
    ok = np.array([s for c, s in outcomes if c == "OK"]) * 1000
    failed = np.array([s for c, s in outcomes if c != "OK"]) * 1000
    in_time = int((ok <= deadline_s * 1000).sum())
    return {"clients": clients, "deadline_ms": deadline_s * 1000, "seconds": round(wall, 2),
            "requests": len(outcomes), "in_time": in_time, "goodput_rps": in_time / wall,
            "codes": dict(Counter(c for c, _ in outcomes)),
            "success_p99_ms": float(np.percentile(ok, 99)) if ok.size else None,
            "failure_p50_ms": float(np.percentile(failed, 50)) if failed.size else None,
            "failure_p99_ms": float(np.percentile(failed, 99)) if failed.size else None}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=BENCH.parent, help="the checkout whose server runs")
    p.add_argument("--model", default="digits")
    p.add_argument("--model-repository", type=Path, help="the repository Quorum serves (default: ROOT/models)")
    p.add_argument("--clients", type=int, default=512)
    p.add_argument("--deadline-ms", type=float, default=50.0)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--capacity-seconds", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the capacity is measured")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "overload.json")
    p.add_argument("--backoff-ms", type=float, default=0.0,
                   help="after RESOURCE_EXHAUSTED wait the server's pushback, else a jittered exponential "
                        "backoff from this (0: send the next request at once)")
    p.add_argument("--grpc-engine", choices=["grpcio", "native"], help="the server's engine (default: its own)")
    p.add_argument("--server", choices=["quorum", "floor"], default="quorum",
                   help="floor: bench/floor_server.py (bare grpc.aio, precomputed answer, no admission), "
                        "the reference for what this machine and client allow")
    p.add_argument("--open", action="store_true",
                   help="open-loop Poisson load in two priority classes, every --servers in one run "
                        "(bench/overload_open.py)")
    p.add_argument("--servers", default="floor,grpcio,native",
                   help="--open: the servers, in order: floor (bare grpc.aio), grpcio, native (Quorum's engines)")
    p.add_argument("--load", type=float, default=2.0, help="--open: offered load, times each server's capacity")
    p.add_argument("--rate", type=float, help="--open: offered load in requests/s (instead of --load)")
    p.add_argument("--count", type=int, default=200_000, help="--open: at most this many requests per server")
    p.add_argument("--high-share", type=float, default=0.2, help="--open: share of requests of the high class")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.open:
        await open_loop(args)
        return
    if args.server == "floor" and args.grpc_engine:
        p.error("--grpc-engine is Quorum's: the floor is grpc.aio")
    port = free_port()
    address = f"127.0.0.1:{port}"
    payload = make_request("v2", args.model, (1, 64), "pixels")
    server = start(args.root.resolve(), port, args.grpc_engine, args.server, args.model_repository)
    try:
        await wait_ready(address, payload)
        capacity = await run_load(target=address, protocol="v2", model=args.model, shape=(1, 64), concurrency=64,
                                  duration=args.capacity_seconds, warmup=args.warmup, channels=4, server_pid=server.pid)
        result = await overload(address, payload, args.clients, args.deadline_ms / 1000, args.seconds,
                                backoff_s=args.backoff_ms / 1000)
    finally:
        server.terminate()
        server.wait(timeout=60)
    result.update(server=args.server, root=str(args.root), model=args.model, grpc_engine=args.grpc_engine, backoff_ms=args.backoff_ms, capacity_rps=capacity.throughput_rps,
                  capacity_p99_ms=capacity.latency_ms["p99"])
    result["goodput_ratio"] = result["goodput_rps"] / capacity.throughput_rps
    out = args.out
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"capacity (c=64): {capacity.throughput_rps:.0f} req/s, p99 {capacity.latency_ms['p99']:.1f} ms")
    print(f"overload ({args.clients} clients, {args.deadline_ms:g} ms deadlines, {result['seconds']} s): "
          f"goodput {result['goodput_rps']:.0f} req/s = {result['goodput_ratio']:.2f} x capacity")
    print(f"  outcomes {result['codes']}; successes p99 {result['success_p99_ms'] or float('nan'):.1f} ms; "
          f"failures p50 {result['failure_p50_ms'] or float('nan'):.1f} / p99 {result['failure_p99_ms'] or float('nan'):.1f} ms")


async def open_loop(args: argparse.Namespace) -> None:
    """--open: bench/overload_open.py's run on each of --servers, one after the other."""
    root = args.root.resolve()
    servers = [s for s in args.servers.split(",") if s]
    unknown = set(servers) - {"floor", "grpcio", "native"}
    if unknown:
        raise SystemExit(f"--servers: unknown {sorted(unknown)}; choose from floor, grpcio, native")
    repository, scratch = overload_open.repository_for(args, root)
    payload = make_request("v2", args.model, (1, 64), "pixels")
    results = []
    try:
        for name in servers:
            port = free_port()
            address = f"127.0.0.1:{port}"
            server = (start(root, port, None, "floor") if name == "floor"
                      else start(root, port, name, "quorum", repository))
            try:
                await wait_ready(address, payload)
                results.append(await overload_open.measure(name, address, server.pid, args.model, args))
            finally:
                server.terminate()
                server.wait(timeout=60)
            print(overload_open.summary(results[-1]), flush=True)
    finally:
        overload_open.cleanup(scratch)
    out = args.out if args.out != BENCH / "results" / "overload.json" else BENCH / "results" / "overload_open.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "deadline_ms": args.deadline_ms, "load": args.load,
                               "rate": args.rate, "high_share": args.high_share, "results": results}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
