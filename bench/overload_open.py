"""Open-loop overload in two priority classes, side by side: the bare floor and Quorum.

For each server asked (--servers floor,grpcio,native: the bare grpc.aio floor, Quorum on
either gRPC engine) in one run: start it, measure its closed-loop capacity (c=64, 30 s
deadlines), then offer it Poisson arrivals at --load times that capacity (or --rate req/s),
for at most --seconds and at most --count requests, each one row of KServe v2 ModelInfer with
a --deadline-ms deadline, --high-share of them asking priority 1 (high), the rest priority 2
(low), as tritonclient's `priority=` sends it (the v2 request parameter `priority`, uint64).
Quorum serves a copy of the repository whose model has `priority_levels: 2`; the floor
ignores what it is sent. Latency is measured from each request's scheduled arrival, so a
server (or a client) that falls behind is charged for it (no coordinated omission).

Reports, per server and per class: offered, answered within the deadline (and its share of
the offered), goodput as a share of the server's capacity, RESOURCE_EXHAUSTED and
DEADLINE_EXCEEDED counts, the time to a refusal (p50/p99 of RESOURCE_EXHAUSTED), the p99 of
the admitted (answered OK); and how late the client sent (send lag p99: above a few ms the
client, not the server, was the limit).

    .venv/bin/python bench/overload.py --open [--servers floor,grpcio,native --load 2
        --seconds 10 --deadline-ms 50 --high-share 0.2]

Results in bench/results/overload_open.json (the last run).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import yaml

from bench.loadgen import MAX_MESSAGE, make_request, run_load
from service._proto.inference import grpc_service_pb2 as v2_pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"
CLASSES = {"high": 1, "low": 2}
"""Each class and the priority it asks (1 is the highest)."""


def class_payloads(model: str) -> dict[str, bytes]:
    """One serialised request per class: the same row, its priority as tritonclient sets it."""
    base = v2_pb.ModelInferRequest.FromString(make_request("v2", model, (1, 64), "pixels"))
    payloads = {}
    for name, level in CLASSES.items():
        request = v2_pb.ModelInferRequest()
        request.CopyFrom(base)
        request.parameters["priority"].uint64_param = level
        payloads[name] = request.SerializeToString()
    return payloads


def with_priority_levels(repository: Path, model: str, into: Path, levels: int = len(CLASSES)) -> Path:
    """A repository at `into` serving what `repository` serves (its folders linked), except
    that `model`'s ensemble.yaml (or model.yaml) also says `priority_levels: levels`."""
    into.mkdir(parents=True, exist_ok=True)
    for entry in repository.iterdir():
        if entry.name != model:
            (into / entry.name).symlink_to(entry.resolve())
    folder = repository / model
    copy = into / model
    copy.mkdir()
    config_name = "ensemble.yaml" if (folder / "ensemble.yaml").exists() else "model.yaml"
    for entry in folder.iterdir():
        if entry.name != config_name:
            (copy / entry.name).symlink_to(entry.resolve())
    config = yaml.safe_load((folder / config_name).read_text()) if (folder / config_name).exists() else {}
    config = {**(config or {}), "priority_levels": levels}
    (copy / config_name).write_text(yaml.safe_dump(config))
    return into


async def offer(address: str, payloads: dict[str, bytes], rate: float, seconds: float, count: int,
                high_share: float, deadline_s: float, seed: int = 0, channels: int = 4) -> dict:
    """Poisson arrivals at `rate`/s for `seconds` (at most `count`), each of class high with
    probability `high_share`; every call waited for. Outcomes per class."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE)]
    opened = [grpc.aio.insecure_channel(address, options=options + [("bench.channel", i)]) for i in range(channels)]
    for channel in opened:
        await asyncio.wait_for(channel.channel_ready(), timeout=60)
    calls = [channel.unary_unary(METHOD) for channel in opened]
    rng = random.Random(seed)
    outcomes: list[tuple[str, str, float]] = []
    lags: list[float] = []

    async def one(i: int, name: str, scheduled: float) -> None:
        try:
            await calls[i % channels](payloads[name], timeout=deadline_s)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        outcomes.append((name, code, time.perf_counter() - scheduled))

    tasks: set[asyncio.Task] = set()
    began = next_at = time.perf_counter()
    stop_at = began + seconds
    sent = 0
    while next_at < stop_at and sent < count:
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(time.perf_counter() - next_at)
        name = "high" if rng.random() < high_share else "low"
        task = asyncio.ensure_future(one(sent, name, next_at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
        next_at += rng.expovariate(rate)
    offered_s = time.perf_counter() - began
    if tasks:
        await asyncio.wait(tasks, timeout=deadline_s + 30)
    for channel in opened:
        await channel.close()
    return {"offered_rps": sent / offered_s, "seconds": round(offered_s, 2), "sent": sent,
            "send_lag_p99_ms": float(np.percentile(lags, 99) * 1000) if lags else None,
            "outcomes": outcomes}


def _p(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.array(values) * 1000, q)) if values else None


def report(outcomes: list[tuple[str, str, float]], capacity_rps: float, seconds: float, deadline_s: float) -> dict:
    """Per class and in all: what was offered, answered in time, refused; goodput as a share
    of `capacity_rps`; time to a refusal; p99 of the admitted."""
    classes: dict[str, dict] = {}
    for name in (*CLASSES, "all"):
        mine = [o for o in outcomes if name in ("all", o[0])]
        ok = [s for _, c, s in mine if c == "OK"]
        refused = [s for _, c, s in mine if c == "RESOURCE_EXHAUSTED"]
        in_time = sum(1 for s in ok if s <= deadline_s)
        classes[name] = {
            "offered": len(mine), "in_time": in_time, "codes": dict(Counter(c for _, c, _ in mine)),
            "in_time_share": in_time / len(mine) if mine else None,
            "goodput_share": in_time / seconds / capacity_rps,
            "refusal_p50_ms": _p(refused, 50), "refusal_p99_ms": _p(refused, 99),
            "admitted_p99_ms": _p(ok, 99)}
    return classes


async def measure(name: str, address: str, server_pid: int, model: str, args) -> dict:
    """One server's capacity, then its open-loop overload."""
    capacity = await run_load(target=address, protocol="v2", model=model, shape=(1, 64), concurrency=64,
                              duration=args.capacity_seconds, warmup=args.warmup, channels=4, server_pid=server_pid)
    rate = args.rate or args.load * capacity.throughput_rps
    run = await offer(address, class_payloads(model), rate, args.seconds, args.count, args.high_share,
                      args.deadline_ms / 1000, args.seed)
    outcomes = run.pop("outcomes")
    return {"server": name, "capacity_rps": capacity.throughput_rps, "capacity_p99_ms": capacity.latency_ms["p99"],
            "rate_rps": rate, **run,
            "classes": report(outcomes, capacity.throughput_rps, run["seconds"], args.deadline_ms / 1000)}


def summary(result: dict) -> str:
    lines = [f"{result['server']}: capacity {result['capacity_rps']:.0f} req/s (c=64); offered "
             f"{result['offered_rps']:.0f} req/s for {result['seconds']} s ({result['sent']} requests, "
             f"client send lag p99 {result['send_lag_p99_ms']:.1f} ms)"]
    for name, c in result["classes"].items():
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"  {name:>4}: {c['offered']} offered, {c['in_time']} in time "
                     f"({(c['in_time_share'] or 0) * 100:.1f}%), goodput {c['goodput_share']:.2f} x capacity; "
                     f"refusals p50/p99 {fmt(c['refusal_p50_ms'])}/{fmt(c['refusal_p99_ms'])} ms; "
                     f"admitted p99 {fmt(c['admitted_p99_ms'])} ms; {c['codes']}")
    return "\n".join(lines)


def repository_for(args, root: Path) -> tuple[Path, Path]:
    """The repository Quorum serves in this run (with priority levels) and the folder to remove."""
    scratch = Path(tempfile.mkdtemp(prefix="quorum-overload-"))
    source = (args.model_repository or root / "models").resolve()
    return with_priority_levels(source, args.model, scratch / "models"), scratch


def cleanup(scratch: Path) -> None:
    shutil.rmtree(scratch, ignore_errors=True)
