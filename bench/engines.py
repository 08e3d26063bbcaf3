"""Quorum's gRPC engines and event loops side by side, against the grpc.aio floor:

    python bench/engines.py [--duration 10] [--rounds 2] [--concurrency 64] [--model digits_mlp_a]
                            [--variants grpcio-asyncio,grpcio-uvloop,native-asyncio,native-uvloop]
                            [--out bench/results/engines]

Starts the floor (bench/floor_server.py) and one Quorum server per engine x event loop
(`--grpc-engine grpcio|native`, `--event-loop asyncio|uvloop`, otherwise the suite's settings:
`--device cpu --poll-interval 0`), waits for a real answer from each, then runs the same closed
loop (bench/loadgen.py, v2 ModelInfer, one row) against each of them in turn, round after round,
so that every round sees the same machine. Each figure is the median over the rounds, and each
ratio is taken to the floor of the same round. Writes results.json and results.md under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_suite import PY, ROOT, Config, Server, free_port, machine, run_load, start_all  # noqa: E402

VARIANTS = [("grpcio", "asyncio"), ("grpcio", "uvloop"), ("native", "asyncio"), ("native", "uvloop")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--model", default="digits_mlp_a")
    p.add_argument("--model-repository", type=Path, default=ROOT / "models", help="the repository Quorum serves")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "engines")
    p.add_argument("--variants", default=",".join(f"{e}-{loop}" for e, loop in VARIANTS),
                   help="ENGINE-LOOP,... to run (default: all four)")
    args = p.parse_args(argv)
    variants = [tuple(v.split("-")) for v in args.variants.split(",")]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted('-'.join(v) for v in unknown)}")
    out: Path = args.out
    (out / "runs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    servers = {"floor": Server("floor", [PY, str(BENCH / "floor_server.py"), "--port", str(port := free_port())],
                               port)}
    for engine, loop in variants:
        port = free_port()
        servers[f"quorum-{engine}-{loop}"] = Server(
            f"quorum-{engine}-{loop}",
            [PY, "-m", "service.cli", "serve", "--device", "cpu", "--poll-interval", "0",
             "--model-repository", str(args.model_repository), "--grpc-port", str(port),
             "--metrics-port", str(free_port()), "--http-port", "0", "--grpc-engine", engine, "--event-loop", loop], port)
    base = Config("engines", "floor", args.model, concurrency=args.concurrency)
    configs = [replace(base, server=name) for name in servers]
    runs: dict[str, list[dict]] = {c.server: [] for c in configs}
    try:
        start_all(servers, out)
        for round_no in range(args.rounds):
            print(f"round {round_no + 1}/{args.rounds}", flush=True)
            for cfg in configs:
                runs[cfg.server].append(run_load(cfg, servers[cfg.server], args.duration, args.warmup,
                                                 out, round_no))
    finally:
        for s in servers.values():
            s.stop()

    rows = []
    for cfg in configs:
        done = [r for r in runs[cfg.server] if "failed" not in r]
        floors = [f for f in runs["floor"] if "failed" not in f]
        ratios = [r["throughput_rps"] / f["throughput_rps"] for r, f in zip(done, floors)]
        rows.append({
            "server": cfg.server,
            "rps": statistics.median(r["throughput_rps"] for r in done),
            "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in done),
            "server_us_per_req": statistics.median(r["server_cpu_us_per_req"] for r in done),
            "x_floor": statistics.median(ratios),
            "each_rps": [round(r["throughput_rps"]) for r in done],
            "errors": sum(sum(r["errors"].values()) for r in done)})
    report = {"machine": machine(), "command": " ".join(["python", "bench/engines.py", *(argv or sys.argv[1:])]),
              "duration_s": args.duration, "rounds": args.rounds, "concurrency": args.concurrency,
              "model": args.model, "results": rows, "wall_s": round(time.monotonic() - started, 1)}
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"Command: `{report['command']}` ({args.rounds} rounds of {args.duration:g} s, c={args.concurrency}, "
             f"{args.model}, v2 ModelInfer, medians; ratio to the floor of the same round)", "",
             "| server | req/s | p99 ms | server CPU µs/req | × floor | req/s each round | errors |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['server']} | {r['rps']:.0f} | {r['p99_ms']:.1f} | {r['server_us_per_req']:.0f} | "
              f"{r['x_floor']:.2f} | {', '.join(map(str, r['each_rps']))} | {r['errors']} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
