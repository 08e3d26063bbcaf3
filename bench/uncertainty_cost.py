"""What prediction sets cost: the same load with and without a coverage asked, side by side
in one run, rounds alternating:

    python bench/uncertainty_cost.py [--model digits] [--concurrency 64] [--duration 8] [--rounds 3]
                                     [--model-repository models] [--grpc-engine grpcio|native]
    python bench/uncertainty_cost.py --in-process [--calls 6400] ...

By default one `quorum serve` answers bench/loadgen.py's closed loop of one-row v2 ModelInfer
calls from --concurrency callers (so requests batch as they do in production), first plain,
then with `coverage` 0.9, then with `coverage` 0.9 and `max_risk` 0.05, and plain again; it
prints each variant's requests/s, p99 and server CPU per request, and its throughput as a ratio
to the mean of the round's two plain runs (0.95 would be 5% slower), and the same ratio for
the server's CPU per request (plain's over the variant's: less noisy than throughput on a
host the client shares). Odd rounds run the asked
variants in the other order, and the second plain run is the control (its ratio shows the
noise): a server whose throughput drifts over its life would otherwise charge the drift to
whichever variant runs last. `--in-process` measures the same three
through the wrapped servicer in this process instead (bench/inprocess.py's `measure`: no
transport, and every batch one request, so the per-batch work is not shared: an upper bound).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from loadgen import run_load  # noqa: E402

ASKS = {"plain": {}, "coverage 0.9": {"coverage": 0.9}, "coverage 0.9 + max_risk 0.05": {"coverage": 0.9,
                                                                                          "max_risk": 0.05}}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--device", "cpu", "--model-repository",
         str(args.model_repository), "--grpc-port", str(port), "--http-port", "0", "--metrics-port", "0",
         "--grpc-engine", args.grpc_engine], cwd=ROOT, env={**os.environ, "QUORUM_DRAIN_DELAY": "0"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    end = time.monotonic() + 120
    while True:
        try:
            asyncio.run(run_load(target=target, protocol="v2", model=args.model, shape=(1, 64), concurrency=1,
                                 duration=0.2, warmup=0.1))
            return server, target
        except Exception:  # not serving yet
            if time.monotonic() > end or server.poll() is not None:
                server.kill()
                raise SystemExit("quorum serve did not answer")
            time.sleep(0.5)


def over_server(args: argparse.Namespace) -> dict[str, list[float]]:
    server, target = _serve(args)
    ratios: dict[str, list[float]] = {name: [] for name in ASKS if name != "plain"}
    ratios["plain (control)"] = []
    cpu_ratios: dict[str, list[float]] = {name: [] for name in ratios}
    try:
        print("| round | asked | req/s | p99 ms | server CPU us/req | x plain | CPU x plain |\n"
              "|---|---|---|---|---|---|---|")
        for round_no in range(args.rounds):
            asked = [name for name in ASKS if name != "plain"]
            order = ["plain", *(asked if round_no % 2 == 0 else asked[::-1]), "plain"]
            measured = []
            for name in order:
                r = asyncio.run(run_load(target=target, protocol="v2", model=args.model, shape=(1, 64),
                                         concurrency=args.concurrency, duration=args.duration, warmup=args.warmup,
                                         server_pid=server.pid, parameters=ASKS[name]))
                assert not r.errors, r.errors
                measured.append((name, r))
            plain = statistics.mean(r.throughput_rps for name, r in measured if name == "plain")
            cpus = [r.server_cpu_us_per_req for name, r in measured if name == "plain"]
            plain_cpu = None if None in cpus else statistics.mean(cpus)  # type: ignore[type-var]
            for position, (name, r) in enumerate(measured):
                label = "plain (control)" if position == len(measured) - 1 else name
                cpu = r.server_cpu_us_per_req
                cpu_ratio = None if plain_cpu is None or not cpu else plain_cpu / cpu  # as throughput: < 1 costs more
                if position:
                    ratios[label].append(r.throughput_rps / plain)
                    if cpu_ratio is not None:
                        cpu_ratios[label].append(cpu_ratio)
                print(f"| {round_no + 1} | {label} | {r.throughput_rps:.0f} | {r.latency_ms['p99']:.1f} | "
                      f"{'-' if cpu is None else f'{cpu:.0f}'} | {r.throughput_rps / plain:.3f} | "
                      f"{'-' if cpu_ratio is None else f'{cpu_ratio:.3f}'} |", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print()
    for name, values in cpu_ratios.items():
        if values:
            print(f"{name}: median server CPU per request, plain / this, {statistics.median(values):.3f}")
    return ratios


def in_process(args: argparse.Namespace) -> dict[str, list[float]]:
    from inprocess import measure

    ratios: dict[str, list[float]] = {name: [] for name in ASKS}
    print("| round | asked | us per request | x plain (time) |\n|---|---|---|---|")
    for round_no in range(args.rounds):
        plain = None
        for name, parameters in ASKS.items():
            us = asyncio.run(measure(args.model, args.calls, 1, False, args.concurrency, parameters))["median_us"]
            plain = plain or us
            ratios[name].append(plain / us)  # as throughput: below 1 is slower
            print(f"| {round_no + 1} | {name} | {us:.1f} | {us / plain:.3f} |", flush=True)
    return ratios


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0, help="seconds measured per variant and round")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--model-repository", type=Path, default=ROOT / "models")
    p.add_argument("--grpc-engine", choices=["grpcio", "native"], default="grpcio")
    p.add_argument("--in-process", action="store_true")
    p.add_argument("--calls", type=int, default=6400, help="requests per variant and round (--in-process)")
    args = p.parse_args()
    ratios = in_process(args) if args.in_process else over_server(args)
    print()
    for name, values in ratios.items():
        print(f"{name}: median throughput x plain {statistics.median(values):.3f} over {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
