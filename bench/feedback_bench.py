"""Predict + Feedback throughput: the in-process store empty vs full, and the Redis store
(--state-url, issue 38) vs the in-process one, in one run.

Starts two `quorum serve` processes (digits_logreg: the cheapest model, so the store's own
cost is what shows), fills the second one's store with --fill predictions (past its
20,000-entry capacity, so every Predict there evicts the oldest), then drives each in turn
with closed-loop quorum.v1 traffic at a fixed concurrency, interleaved (fresh, full, fresh,
full) so that changes in the machine's load hit both alike: each worker sends Predict with its
own request id, then Feedback labelling that answer. A store that costs O(n) per prediction
at capacity shows as a collapse of the full server's figure.

    .venv/bin/python bench/feedback_bench.py --seconds 15 --concurrency 8 --fill 50000

Also prints the store's own cost per record() and add() in process, empty and at capacity.

Then (unless --no-redis) a redis-server on a free port and two more servers, one with the
in-process store and one with --state-url, driven interleaved: Predict+Feedback (each worker
labels the answer it got --lag requests before, as ground truth comes later: a label sent at
once could overtake the background writer) and Predict alone, with the share of labels
accepted. Needs redis-server on PATH (`make test` installs it).

    .venv/bin/python bench/feedback_bench.py --seconds 10 --rounds 2 --fill 30000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
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


def start(*args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--grpc-port", str(port), "--metrics-port", "0",
         "--http-port", "0", "--device", "cpu", "--log-level", "WARNING", *args], cwd=ROOT, env=env)
    return process, port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc): unlike throughput on a shared host,
    what a request costs does not move with what else runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    """A throwaway redis-server (no persistence) on a free port; its URL once it answers."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (make test installs Debian's), or pass --no-redis")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir",
                                str(folder), "--appendonly", "no"], stdout=subprocess.DEVNULL)
    for _ in range(200):
        try:
            redis.Redis(port=port).ping()
            return process, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    raise TimeoutError("redis-server did not start")


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


async def drive(address: str, seconds: float, concurrency: int, tag: str, feedback: bool = True,
                lag: int = 0, accepted: list[int] | None = None, per_call: int = 1,
                predicts: list[int] | None = None) -> float:
    """RPC/s (Predict and Feedback both counted) over `seconds` of closed-loop traffic; with
    `lag`, each Feedback labels the answer of `lag` requests before (counted in `accepted`);
    with `per_call` > 1, one Feedback call every `per_call` Predicts labels that many."""
    count = predicted = 0
    stop = time.monotonic() + seconds

    async def worker(w: int) -> None:
        nonlocal count, predicted
        i = 0
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            while time.monotonic() < stop:
                request_id = f"{tag}-{w}-{i}"
                await stub.Predict(_predict(request_id), timeout=30)
                count += 1
                predicted += 1
                if feedback and i >= lag + per_call - 1 and (i - lag + 1) % per_call == 0:
                    reply = await stub.Feedback(pb.FeedbackRequest(labels=[pb.FeedbackRequest.Label(
                        request_id=f"{tag}-{w}-{j}", row=0, label=str(j % 10))
                        for j in range(i - lag - per_call + 1, i - lag + 1)]), timeout=30)
                    count += 1
                    if accepted is not None:
                        accepted[0] += reply.accepted
                        accepted[1] += per_call
                i += 1

    start = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    if predicts is not None:
        predicts[0] += predicted
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
    vote = SimpleNamespace(members=("m",), label_index=np.zeros(1, int))
    results = SimpleNamespace(model="m", version=1, labels=labels, vote=vote, uncertain=None,
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
    parser.add_argument("--lag", type=int, default=32, help="Feedback labels the answer this many requests back")
    parser.add_argument("--batch", type=int, default=16, help="labels per Feedback call in the batched run")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis-vs-in-process comparison")
    parser.add_argument("--redis-only", action="store_true", help="only the Redis-vs-in-process comparison")
    parser.add_argument("--modes", default="alone,one,batch",
                        help="the Redis comparison's traffic: Predict alone, one label a call, --batch labels a call")
    args = parser.parse_args()
    if not args.redis_only:
        in_process(args.fill)
        await empty_vs_full(args)
    if not args.no_redis:
        await redis_vs_in_process(args)


async def empty_vs_full(args: argparse.Namespace) -> None:
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



async def redis_vs_in_process(args: argparse.Namespace) -> None:
    """The same traffic on the in-process store and on the Redis store, interleaved rounds."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="feedback-bench-redis-") as folder:
        redis_process, url = start_redis(Path(folder))
        servers = {"in-process": start(), "redis": start("--state-url", url)}
        addresses = {name: f"127.0.0.1:{port}" for name, (_, port) in servers.items()}
        try:
            for address in addresses.values():
                await wait_ready(address)
                await drive(address, 2.0, args.concurrency, "warm", lag=args.lag)
            modes = {"alone": ("Predict alone", 0), "one": ("Predict+Feedback, 1 label a call", 1),
                     "batch": (f"Predict+Feedback, {args.batch} labels a call", args.batch)}
            kinds = dict(modes[mode] for mode in args.modes.split(","))
            rates: dict[tuple[str, str], list[float]] = {(kind, name): [] for kind in kinds for name in servers}
            accepted = {key: [0, 0] for key in rates}
            predicts = {key: [0] for key in rates}
            cpu = {key: 0.0 for key in rates}  # the server's CPU seconds
            redis_cpu = {key: 0.0 for key in rates}  # redis-server's, for the redis store
            for r in range(args.rounds):
                for kind, per_call in kinds.items():
                    for name, address in addresses.items():
                        before = cpu_seconds(servers[name][0].pid), cpu_seconds(redis_process.pid)
                        rates[kind, name].append(await drive(
                            address, args.seconds, args.concurrency, f"{per_call}-{r}", feedback=per_call > 0,
                            lag=args.lag, accepted=accepted[kind, name], per_call=max(1, per_call),
                            predicts=predicts[kind, name]))
                        cpu[kind, name] += cpu_seconds(servers[name][0].pid) - before[0]
                        if name == "redis":
                            redis_cpu[kind, name] += cpu_seconds(redis_process.pid) - before[1]
            for kind in kinds:
                for name in servers:
                    done, sent = accepted[kind, name]
                    n = max(1, predicts[kind, name][0])
                    print(f"{kind:32s} {name:10s}: " + ", ".join(f"{v:6.0f}" for v in rates[kind, name]) + " RPC/s"
                          + (f" (labels accepted {done / sent:.1%})" if sent else "")
                          + f"; CPU per Predict{' and its label' if sent else ''}: server {cpu[kind, name] / n * 1e6:4.0f} us"
                          + (f" + redis-server {redis_cpu[kind, name] / n * 1e6:3.0f} us" if name == "redis" else ""))
                ratio = float(np.median(rates[kind, "redis"]) / np.median(rates[kind, "in-process"]))
                print(f"{kind:32s} redis / in-process (medians): {ratio:.3f}")
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(timeout=60)
            redis_process.terminate()
            redis_process.wait(timeout=30)


if __name__ == "__main__":
    asyncio.run(main())
