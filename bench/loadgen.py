"""Asyncio gRPC load generator for Quorum and its peers.

    python bench/loadgen.py --target localhost:8500 --model digits_mlp_a --shape 1,64 \
        [--protocol v2|quorum|tfserving] [--concurrency 64 | --rate 2000] [--duration 10] \
        [--warmup 2] [--server-pid PID] [--json out.json]

Closed loop (`--concurrency N`): N workers, each sending its next request as soon as the
previous one answers. Open loop (`--rate R`): requests arrive as a Poisson process of R per
second whatever the server does; each latency is measured from the request's scheduled
arrival, so a server that falls behind is charged for the queue it builds (no coordinated
omission).

Protocols: `v2` is KServe v2 `inference.GRPCInferenceService/ModelInfer` with the tensor in
`raw_input_contents`, exactly as tritonclient sends it (no typed contents, no outputs
requested); `quorum` is `quorum.v1.EnsembleService/Predict`. Each request message is
serialised once up front and sent as bytes, and responses are only parsed for the final
check, so the client spends its CPU on gRPC, not on protobuf: client and server share the
machine.

Reports throughput (requests/s and rows/s), p50/p90/p99/max latency, errors by status code,
and the CPU used by this process and by the server (the server pid and its child
processes, from /proc), in cores and in CPU-µs per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service._proto.inference import grpc_service_pb2 as v2_pb  # noqa: E402
from service._proto.quorum.v1 import ensemble_pb2 as q_pb  # noqa: E402
from service import tf_protos  # noqa: E402

tf_protos.install()  # TF Serving's messages without importing TensorFlow
from tensorflow_serving.apis import predict_pb2  # noqa: E402

METHODS = {
    "v2": ("/inference.GRPCInferenceService/ModelInfer", v2_pb.ModelInferResponse),
    "quorum": ("/quorum.v1.EnsembleService/Predict", q_pb.PredictResponse),
    "tfserving": ("/tensorflow.serving.PredictionService/Predict", predict_pb2.PredictResponse),
}
MAX_MESSAGE = 64 * 1024 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- requests ------------------------------------------------------------------------------
def make_request(protocol: str, model: str, shape: tuple[int, ...], input_name: str,
                 seed: int = 0, parameters: dict[str, float] | None = None) -> bytes:
    """One serialised request: FP32 rows of `shape`, random but fixed (`parameters`: v2 request
    parameters, as numbers)."""
    array = np.random.default_rng(seed).uniform(0, 16, size=shape).astype("<f4")
    if protocol == "v2":
        request = v2_pb.ModelInferRequest(model_name=model)
        request.inputs.add(name=input_name, datatype="FP32", shape=list(shape))
        request.raw_input_contents.append(array.tobytes())
        for key, value in (parameters or {}).items():
            request.parameters[key].double_param = value
    elif protocol == "tfserving":  # a TensorProto with tensor_content, as tf.make_tensor_proto builds it
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        tensor = request.inputs[input_name]
        tensor.dtype = 1  # DT_FLOAT
        for size in shape:
            tensor.tensor_shape.dim.add().size = size
        tensor.tensor_content = array.tobytes()
    else:
        request = q_pb.PredictRequest(model=model)
        request.inputs.dtype = "FP32"
        request.inputs.shape.extend(shape)
        request.inputs.content = array.tobytes()
    return request.SerializeToString()


# -- CPU accounting ------------------------------------------------------------------------
def _proc_cpu_s(pid: int) -> float:
    """utime + stime of one process, in seconds (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of `pid` and its descendants (SO_REUSEPORT workers, MLServer workers)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += _proc_cpu_s(p)
        todo.extend(_children(p))
    return total


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# -- the run -------------------------------------------------------------------------------
@dataclass
class Result:
    target: str
    protocol: str
    model: str
    rows_per_request: int
    mode: str
    concurrency: int | None
    rate: float | None
    duration_s: float
    requests: int
    errors: dict[str, int]
    throughput_rps: float
    rows_per_s: float
    latency_ms: dict[str, float]
    client_cpu_cores: float
    server_cpu_cores: float | None
    client_cpu_us_per_req: float
    server_cpu_us_per_req: float | None
    request_bytes: int
    response_bytes: int
    dropped: int = 0
    label: str = ""
    extra: dict = field(default_factory=dict)


class Recorder:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.response_bytes = 0
        self.recording = False

    def ok(self, seconds: float, size: int) -> None:
        if self.recording:
            self.latencies.append(seconds)
            self.response_bytes = size

    def fail(self, code: str) -> None:
        if self.recording:
            self.errors[code] += 1


async def _call(stub, payload: bytes, rec: Recorder, start: float, timeout: float) -> None:
    try:
        response = await stub(payload, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        rec.fail(exc.code().name)
        return
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - counted, the run goes on
        rec.fail(type(exc).__name__)
        return
    rec.ok(time.perf_counter() - start, len(response))


async def _closed(stubs, payload, rec, concurrency, stop_at, timeout) -> int:
    async def worker(i: int) -> None:
        stub = stubs[i % len(stubs)]
        while time.perf_counter() < stop_at:
            await _call(stub, payload, rec, time.perf_counter(), timeout)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return 0


async def _open(stubs, payload, rec, rate, stop_at, timeout, max_outstanding, seed) -> int:
    rng = random.Random(seed)
    tasks: set[asyncio.Task] = set()
    dropped = 0
    i = 0
    next_at = time.perf_counter()
    while next_at < stop_at:
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_outstanding:
            dropped += 1
            rec.fail("CLIENT_OVERLOAD")
        else:
            task = asyncio.ensure_future(_call(stubs[i % len(stubs)], payload, rec, next_at, timeout))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        i += 1
        next_at += rng.expovariate(rate)
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)
    return dropped


def _percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {k: math.nan for k in ("p50", "p90", "p99", "max", "mean")}
    a = np.asarray(latencies) * 1e3
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(a.max()),
            "mean": float(a.mean())}


async def run_load(*, target: str, protocol: str, model: str, shape: tuple[int, ...],
                   input_name: str = "pixels", concurrency: int | None = None,
                   rate: float | None = None, duration: float = 10.0, warmup: float = 2.0,
                   channels: int = 1, server_pid: int | None = None, timeout: float = 30.0,
                   max_outstanding: int = 4096, seed: int = 0, label: str = "",
                   parameters: dict[str, float] | None = None) -> Result:
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
    method, response_type = METHODS[protocol]
    payload = make_request(protocol, model, shape, input_name, seed, parameters)
    options = [("grpc.max_receive_message_length", MAX_MESSAGE),
               ("grpc.max_send_message_length", MAX_MESSAGE)]
    # Distinct channels need distinct arguments, or gRPC shares one subchannel (connection).
    opened = [grpc.aio.insecure_channel(target, options=options + [("bench.channel", i)])
              for i in range(channels)]
    try:
        for ch in opened:
            await asyncio.wait_for(ch.channel_ready(), timeout=60)
        raw = [ch.unary_unary(method) for ch in opened]  # bytes in, bytes out
        # One parsed call up front: the server answers, and answers this request.
        first = response_type.FromString(await raw[0](payload, timeout=timeout))
        check = _check(protocol, first)
        rec = Recorder()

        async def phase(seconds: float) -> int:
            stop_at = time.perf_counter() + seconds
            if concurrency is not None:
                return await _closed(raw, payload, rec, concurrency, stop_at, timeout)
            return await _open(raw, payload, rec, rate, stop_at, timeout, max_outstanding, seed)

        if warmup > 0:
            await phase(warmup)
        rec.recording = True
        cpu0, scpu0, t0 = own_cpu_s(), tree_cpu_s(server_pid) if server_pid else 0.0, time.perf_counter()
        dropped = await phase(duration)
        wall = time.perf_counter() - t0
        cpu1, scpu1 = own_cpu_s(), tree_cpu_s(server_pid) if server_pid else 0.0
        rec.recording = False
    finally:
        for ch in opened:
            await ch.close()
    n = len(rec.latencies)
    server_cpu = (scpu1 - scpu0) if server_pid else None
    return Result(
        target=target, protocol=protocol, model=model, rows_per_request=shape[0],
        mode="closed" if concurrency is not None else "open", concurrency=concurrency, rate=rate,
        duration_s=round(wall, 3), requests=n, errors=dict(rec.errors),
        throughput_rps=n / wall, rows_per_s=n * shape[0] / wall,
        latency_ms=_percentiles(rec.latencies),
        client_cpu_cores=(cpu1 - cpu0) / wall,
        server_cpu_cores=None if server_cpu is None else server_cpu / wall,
        client_cpu_us_per_req=(cpu1 - cpu0) / max(n, 1) * 1e6,
        server_cpu_us_per_req=None if server_cpu is None else server_cpu / max(n, 1) * 1e6,
        request_bytes=len(payload), response_bytes=rec.response_bytes, dropped=dropped,
        label=label, extra={"check": check, "channels": channels})


def _check(protocol: str, response) -> str:
    """A short description of the first response, kept in the JSON as a sanity check."""
    if protocol == "v2":
        return ",".join(f"{o.name}:{o.datatype}{list(o.shape)}" for o in response.outputs)
    if protocol == "tfserving":
        return ",".join(f"{name}:{[d.size for d in t.tensor_shape.dim]}" for name, t in sorted(response.outputs.items()))
    return f"{len(response.predictions)} predictions, first label {response.predictions[0].label!r}"


def summary(r: Result) -> str:
    load = f"c={r.concurrency}" if r.mode == "closed" else f"rate={r.rate:g}/s"
    scpu = "-" if r.server_cpu_cores is None else f"{r.server_cpu_cores:.2f}"
    lat = r.latency_ms
    return (f"{r.label or r.target} {r.protocol} {r.model} {load}: {r.throughput_rps:.0f} req/s "
            f"({r.rows_per_s:.0f} rows/s) p50 {lat['p50']:.2f} p90 {lat['p90']:.2f} "
            f"p99 {lat['p99']:.2f} max {lat['max']:.2f} ms, errors {sum(r.errors.values())}, "
            f"cpu client {r.client_cpu_cores:.2f} server {scpu} cores")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="localhost:8500")
    p.add_argument("--protocol", choices=sorted(METHODS), default="v2")
    p.add_argument("--model", default="digits_mlp_a")
    p.add_argument("--input-name", default="pixels")
    p.add_argument("--shape", default="1,64", help="request tensor shape, rows first")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    p.add_argument("--channels", type=int, default=1, help="gRPC channels (connections)")
    p.add_argument("--server-pid", type=int, help="server process for CPU accounting")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, seconds")
    p.add_argument("--label", default="")
    p.add_argument("--parameter", action="append", default=[], metavar="KEY=NUMBER",
                   help="a v2 request parameter (repeatable), e.g. coverage=0.9")
    p.add_argument("--json", type=Path, help="write the result here")
    args = p.parse_args(argv)
    if args.concurrency is None and args.rate is None:
        args.concurrency = 1
    result = asyncio.run(run_load(
        target=args.target, protocol=args.protocol, model=args.model,
        shape=tuple(int(d) for d in args.shape.split(",")), input_name=args.input_name,
        concurrency=args.concurrency, rate=args.rate, duration=args.duration,
        warmup=args.warmup, channels=args.channels, server_pid=args.server_pid,
        timeout=args.timeout, label=args.label,
        parameters={k: float(v) for k, _, v in (item.partition("=") for item in args.parameter)}))
    print(summary(result), file=sys.stderr)
    text = json.dumps(asdict(result), indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
