"""What members on other servers cost: the digits ensemble with its members in-process against
the same ensemble with its members on two other local servers, side by side, rounds alternating:

    python bench/remote_members.py [--concurrency 64] [--duration 8] [--rounds 3] [--onnx-only]
                                   [--grpc-engine grpcio|native] [--out DIR]

"local" is one `quorum serve` of the bundled repository answering its `digits` ensemble. "remote"
is three: server A serves digits_mlp_a, digits_mlp_b and digits_logreg, server B digits_cnn_a and
digits_cnn_b, and server C serves only `digits`, the same ensemble.yaml (policy, order) with
each member named at its endpoint (issue 39), so every batch of C asks A and B once each per
member. Both answer bench/loadgen.py's closed loop of one-row v2 ModelInfer calls; each round
measures local then remote, odd rounds the other way round. Per variant: requests/s, p50, p99,
the CPU of every server process per request, and its throughput as a ratio to local's; then,
at concurrency 1 (one request, one batch), the median latency of each and their difference:
what the hops to the members add to a batch. `--onnx-only` leaves the two SavedModel members
out (no TensorFlow: each server is ready in seconds; the tests run it so).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MODELS = ROOT / "models"
sys.path.insert(0, str(BENCH))

from loadgen import run_load, tree_cpu_s  # noqa: E402

POOLS = {"a": ("digits_mlp_a", "digits_mlp_b", "digits_logreg"), "b": ("digits_cnn_a", "digits_cnn_b")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _framework(name: str) -> str:
    return json.loads((MODELS / name / "1" / "variant.json").read_text())["framework"]


class Server:
    """One `quorum serve` on a free port, answering once its model does."""

    def __init__(self, repository: Path, args: argparse.Namespace, model: str, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--device", "cpu", "--model-repository", str(repository),
             "--grpc-port", str(self.port), "--http-port", "0", "--metrics-port", "0",
             "--grpc-engine", args.grpc_engine], cwd=ROOT, env={**os.environ, "QUORUM_DRAIN_DELAY": "0"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.model = model

    def wait(self) -> None:
        end = time.monotonic() + 180
        while True:
            try:
                asyncio.run(run_load(target=self.target, protocol="v2", model=self.model, shape=(1, 64),
                                     concurrency=1, duration=0.2, warmup=0.1, timeout=10))
                return
            except Exception:  # not serving yet
                if time.monotonic() > end or self.process.poll() is not None:
                    raise SystemExit(f"quorum serve on {self.target} did not answer {self.model}")
                time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def repositories(root: Path, onnx_only: bool) -> dict[str, Path]:
    """local: the members and digits; a and b: their pools' members; c: digits with endpoints (filled in later)."""
    keep = [m for m in yaml.safe_load((MODELS / "digits" / "ensemble.yaml").read_text())["members"]
            if not onnx_only or _framework(m) == "onnx"]
    out = {}
    for name, members in {"local": keep, **{p: [m for m in ms if m in keep] for p, ms in POOLS.items()}}.items():
        repo = out[name] = root / name
        for member in members:
            shutil.copytree(MODELS / member, repo / member)
    return out


def ensemble(members: list[str], where: dict[str, str] | None) -> dict:
    config = yaml.safe_load((MODELS / "digits" / "ensemble.yaml").read_text())
    config["members"] = [m if where is None else {"name": m, "endpoint": where[m]} for m in members]
    return config


def measure(label: str, servers: list[Server], target: str, concurrency: int, args: argparse.Namespace) -> dict:
    before = sum(tree_cpu_s(s.process.pid) for s in servers)
    result = asyncio.run(run_load(target=target, protocol="v2", model="digits", shape=(1, 64),
                                  concurrency=concurrency, duration=args.duration, warmup=args.warmup))
    cpu = sum(tree_cpu_s(s.process.pid) for s in servers) - before  # over the warm-up and the measured time
    return {"variant": label, "concurrency": concurrency, "rps": result.throughput_rps,
            "p50_ms": result.latency_ms["p50"], "p99_ms": result.latency_ms["p99"],
            "errors": sum(result.errors.values()), "requests": result.requests,
            "server_cpu_us_per_req": cpu / max(1, result.requests) * 1e6 * args.duration / (args.duration + args.warmup)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per variant and round")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--onnx-only", action="store_true", help="the three ONNX members only (no TensorFlow)")
    p.add_argument("--grpc-engine", choices=("grpcio", "native"), default="grpcio")
    p.add_argument("--out", type=Path, help="write results.json and results.md here")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="quorum-remote-bench-"))
    servers: list[Server] = []
    try:
        repos = repositories(root, args.onnx_only)
        members = sorted({m for pool in ("a", "b") for m in os.listdir(repos[pool])},
                         key=[*POOLS["a"], *POOLS["b"]].index)
        order = [m for m in yaml.safe_load((MODELS / "digits" / "ensemble.yaml").read_text())["members"]
                 if m in members]
        (repos["local"] / "digits").mkdir()
        (repos["local"] / "digits" / "ensemble.yaml").write_text(yaml.safe_dump(ensemble(order, None)))
        a = Server(repos["a"], args, POOLS["a"][0])
        b = Server(repos["b"], args, os.listdir(repos["b"])[0])
        local = Server(repos["local"], args, "digits")
        where = {m: (a.target if m in POOLS["a"] else b.target) for m in order}
        repos["c"] = root / "c"
        (repos["c"] / "digits").mkdir(parents=True)
        (repos["c"] / "digits" / "ensemble.yaml").write_text(yaml.safe_dump(ensemble(order, where)))
        servers = [a, b, local]
        for s in servers:
            s.wait()
        c = Server(repos["c"], args, "digits")
        servers.append(c)
        c.wait()
        variants = {"local (members in-process)": ([local], local.target),
                    "remote (members on 2 other servers)": ([a, b, c], c.target)}
        rows = []
        print("| round | variant | concurrency | req/s | p50 ms | p99 ms | servers' CPU us/req | errors |\n"
              "|---|---|---|---|---|---|---|---|")
        for round_no in range(args.rounds):
            names = list(variants) if round_no % 2 == 0 else list(reversed(variants))
            for concurrency in (args.concurrency, 1):
                for name in names:
                    row = {"round": round_no + 1, **measure(name, *variants[name], concurrency, args)}
                    rows.append(row)
                    print(f"| {row['round']} | {name} | {concurrency} | {row['rps']:.0f} | {row['p50_ms']:.2f} | "
                          f"{row['p99_ms']:.2f} | {row['server_cpu_us_per_req']:.0f} | {row['errors']} |", flush=True)
        lines = ["", "| variant | concurrency | req/s (mean) | x local | p99 ms (mean) | p50 ms (mean) |", "|---|---|---|---|---|---|"]
        summary = {}
        for concurrency in (args.concurrency, 1):
            base = statistics.mean(r["rps"] for r in rows if r["variant"] == next(iter(variants))
                                   and r["concurrency"] == concurrency)
            for name in variants:
                mine = [r for r in rows if r["variant"] == name and r["concurrency"] == concurrency]
                rps = statistics.mean(r["rps"] for r in mine)
                summary[(name, concurrency)] = statistics.mean(r["p50_ms"] for r in mine)
                lines.append(f"| {name} | {concurrency} | {rps:.0f} | {rps / base:.2f} | "
                             f"{statistics.mean(r['p99_ms'] for r in mine):.2f} | {summary[(name, concurrency)]:.2f} |")
        local_name, remote_name = list(variants)
        added = summary[(remote_name, 1)] - summary[(local_name, 1)]
        lines.append(f"\nadded latency per batch (concurrency 1, p50 remote - p50 local): {added:.2f} ms")
        print("\n".join(lines))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps({"rows": rows, "added_ms_per_batch": added,
                                                               "members": order}, indent=1))
            (args.out / "results.md").write_text("\n".join(lines) + "\n")
        return 0 if all(r["errors"] == 0 for r in rows) else 1
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
