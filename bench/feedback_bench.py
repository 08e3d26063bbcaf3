"""Predict + Feedback throughput with an empty feedback store vs a full one, in one run.

Starts two `quorum serve` processes (digits_logreg: the cheapest model, so the store's own
cost is what shows), fills the second one's store with --fill predictions (past its
20,000-entry capacity, so every Predict there evicts the oldest), then drives each in turn
with closed-loop quorum.v1 traffic at a fixed concurrency, interleaved (fresh, full, fresh,
full) so that changes in the machine's load hit both alike: each worker sends Predict with its
own request id, then Feedback labelling that answer. A store that costs O(n) per prediction
at capacity shows as a collapse of the full server's figure.

    .venv/bin/python bench/feedback_bench.py --seconds 15 --concurrency 8 --fill 50000

Also prints the store's own cost per record() and add() in process, empty and at capacity.
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
from types import SimpleNamespace

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service._proto.quorum.v1 import ensemble_pb2 as pb  # noqa: E402
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc  # noqa: E402
from service.objectives.feedback import FeedbackStore  # noqa: E402

MODEL = "digits_logreg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start() -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--grpc-port", str(port), "--metrics-port", "0",
         "--http-port", "0", "--device", "cpu", "--log-level", "WARNING"], cwd=ROOT, env=env)
    return process, port


async def wait_ready(address: str) -> None:
    request = pb.GetStatusRequest(model=MODEL)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.EnsembleServiceStub(channel)
        for _ in range(600):
            try:
                await stub.GetStatus(request, timeout=2)
                await stub.Predict(_predict("warmup"), timeout=5)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
    raise TimeoutError("server not ready")


ROW = np.zeros((1, 64), np.float32).tobytes()


def _predict(request_id: str) -> pb.PredictRequest:
    return pb.PredictRequest(model=MODEL, request_id=request_id,
                             inputs=pb.Tensor(dtype="FP32", shape=[1, 64], content=ROW))


async def drive(address: str, seconds: float, concurrency: int, tag: str, feedback: bool = True) -> float:
    """RPC/s (Predict and Feedback both counted) over `seconds` of closed-loop traffic."""
    count = 0
    stop = time.monotonic() + seconds

    async def worker(w: int) -> None:
        nonlocal count
        i = 0
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            while time.monotonic() < stop:
                request_id = f"{tag}-{w}-{i}"
                await stub.Predict(_predict(request_id), timeout=30)
                count += 1
                if feedback:
                    await stub.Feedback(pb.FeedbackRequest(labels=[pb.FeedbackRequest.Label(
                        request_id=request_id, row=0, label=str(i % 10))]), timeout=30)
                    count += 1
                i += 1

    start = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return count / (time.monotonic() - start)


async def fill(address: str, n: int, concurrency: int) -> None:
    async def worker(w: int) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            for i in range(w, n, concurrency):
                await stub.Predict(_predict(f"fill-{i}"), timeout=30)

    await asyncio.gather(*(worker(w) for w in range(concurrency)))


def in_process(n: int = 50_000) -> None:
    """The store alone: microseconds per record() and add(), empty and at capacity."""
    labels = tuple("0123456789")
    probs = np.full((1, 1, 10), 0.1, np.float32)
    results = SimpleNamespace(model="m", labels=labels, vote=SimpleNamespace(members=("m",), label_index=np.zeros(1, int)),
                              members=(SimpleNamespace(name="m", version=1),), member_probabilities=probs, shadow={})
    store = FeedbackStore()
    for phase, count in (("empty", 1000), ("at capacity", 5000)):
        if phase == "at capacity":
            for i in range(n):
                store.record(f"fill-{i}", results)
        start = time.perf_counter()
        for i in range(count):
            store.record(f"{phase}-{i}", results)
        record_us = (time.perf_counter() - start) / count * 1e6
        start = time.perf_counter()
        for i in range(count):
            store.add(f"{phase}-{i}", 0, "3", 0.0)
        add_us = (time.perf_counter() - start) / count * 1e6
        print(f"in process, store {phase:11s} ({len(store):6d} entries): record {record_us:6.1f} us, add {add_us:6.1f} us")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--fill", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    in_process(args.fill)
    servers = [start(), start()]
    fresh, full = (f"127.0.0.1:{port}" for _, port in servers)
    try:
        for address in (fresh, full):
            await wait_ready(address)
            await drive(address, 2.0, args.concurrency, "warm")
        await fill(full, args.fill, args.concurrency)
        rates: dict[str, list[float]] = {"fresh": [], "full": []}
        for r in range(args.rounds):
            for name, address in (("fresh", fresh), ("full", full)):
                rates[name].append(await drive(address, args.seconds, args.concurrency, f"{name}{r}"))
        for name, values in rates.items():
            print(f"Predict+Feedback, {name:5s} store: " + ", ".join(f"{v:6.0f}" for v in values) + " RPC/s")
        ratio = float(np.median(rates["full"]) / np.median(rates["fresh"]))
        print(f"full / fresh (medians): {ratio:.2f} (after {args.fill} stored predictions)")
    finally:
        for process, _ in servers:
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    asyncio.run(main())
