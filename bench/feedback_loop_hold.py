"""How long one large Feedback call holds the server's event loop, on each store.

Starts `quorum serve` with the in-process store and with a Redis store (a redis-server of its
own), stores --requests predictions of 64 rows each, then sends one Feedback call labelling
every row (--requests x 64 labels, within --max-feedback-labels) while another channel calls
health Check back to back: the slowest Check during the call is how long the loop was held.
Then one call with --refused labels (500,000 by default: ~10 MB), which the limit refuses.

    .venv/bin/python bench/feedback_loop_hold.py --requests 1500
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.feedback_bench import MODEL, start, start_redis, wait_ready  # noqa: E402
from service._proto.quorum.v1 import ensemble_pb2 as pb  # noqa: E402
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc  # noqa: E402

ROWS = np.zeros((64, 64), np.float32).tobytes()


async def probe(address: str, stop: asyncio.Event, slowest: list[float]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            start = time.perf_counter()
            await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
            slowest[0] = max(slowest[0], time.perf_counter() - start)


async def measure(name: str, address: str, requests: int, refused: int) -> None:
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.EnsembleServiceStub(channel)
        for i in range(requests):
            await stub.Predict(pb.PredictRequest(model=MODEL, request_id=f"big-{i}", inputs=pb.Tensor(
                dtype="FP32", shape=[64, 64], content=ROWS)), timeout=30)
        await asyncio.sleep(0.5)  # the Redis store's writer
        labels = [pb.FeedbackRequest.Label(request_id=f"big-{i}", row=r, label=str(r % 10))
                  for i in range(requests) for r in range(64)]
        for what, request in (("labels", pb.FeedbackRequest(labels=labels)),
                              ("refused", pb.FeedbackRequest(labels=[labels[0]] * refused))):
            stop, slowest = asyncio.Event(), [0.0]
            prober = asyncio.create_task(probe(address, stop, slowest))
            await asyncio.sleep(0.3)
            baseline = slowest[0]
            start = time.perf_counter()
            try:
                reply = await stub.Feedback(request, timeout=120)
                outcome = f"accepted {reply.accepted}"
            except grpc.aio.AioRpcError as exc:
                outcome = f"{exc.code().name}: {exc.details()[:60]}..."
            took = time.perf_counter() - start
            stop.set()
            await prober
            print(f"{name:10s} Feedback of {len(request.labels):7d} labels ({request.ByteSize() / 1e6:4.1f} MB): "
                  f"{took * 1000:7.0f} ms, {outcome}; slowest health Check meanwhile {slowest[0] * 1000:6.1f} ms "
                  f"(before: {baseline * 1000:.1f} ms)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1500, help="predictions of 64 rows to label")
    parser.add_argument("--refused", type=int, default=500_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="feedback-hold-") as folder:
        redis_process, url = start_redis(Path(folder))
        servers = {"in-process": start(), "redis": start("--state-url", url)}
        try:
            for name, (_, port) in servers.items():
                await wait_ready(f"127.0.0.1:{port}")
                await measure(name, f"127.0.0.1:{port}", args.requests, args.refused)
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(timeout=60)
            redis_process.terminate()
            redis_process.wait(timeout=30)


if __name__ == "__main__":
    asyncio.run(main())
