"""Is the shared store's memory bounded under a long stream of predictions that never get a label?

    python bench/state_memory.py [--minutes 10] [--maxmemory 32mb] [--model-repository models]

Starts a redis-server as the manifests run it (maxmemory with volatile-ttl: only predictions,
which carry a TTL, are evicted) and one `quorum serve --state-url` on it, then streams
quorum.v1 Predict calls (each recorded, none labelled) with bench/loadgen.py's closed loop for
--minutes. Every 30 s (--every) it prints Redis's used memory, its evicted and stored keys, and the
server's resident memory, then the largest of each: both stay flat once Redis is full.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from loadgen import run_load  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_info(port: int) -> dict[str, str]:
    out = subprocess.run(["redis-cli", "-p", str(port), "info"], capture_output=True, text=True, timeout=10).stdout
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--maxmemory", default="32mb")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--model", default="digits")
    p.add_argument("--model-repository", type=Path, default=ROOT / "models")
    p.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    args = p.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (make test installs it)")
    folder = Path(tempfile.mkdtemp(prefix="quorum-state-memory-"))
    redis_port, grpc_port = _free_port(), _free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--maxmemory", args.maxmemory, "--maxmemory-policy",
                              "volatile-ttl", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--device", "cpu", "--model-repository",
         str(args.model_repository), "--grpc-port", str(grpc_port), "--http-port", "0", "--metrics-port", "0",
         "--state-url", f"redis://127.0.0.1:{redis_port}/0"], cwd=ROOT,
        env={**os.environ, "QUORUM_DRAIN_DELAY": "0"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: list[tuple[float, float, int, int, float]] = []
    stop = threading.Event()

    def sample() -> None:
        start = time.monotonic()
        while not stop.wait(args.every):
            info = _redis_info(redis_port)
            keys = int(info.get("db0", "keys=0,").split(",")[0].split("=")[1]) if "db0" in info else 0
            row = (time.monotonic() - start, int(info["used_memory"]) / 2**20, int(info["evicted_keys"]), keys,
                   _rss_mib(server.pid))
            samples.append(row)
            print(f"| {row[0]:5.0f} s | {row[1]:6.1f} MiB | {row[2]:9d} | {row[3]:8d} | {row[4]:6.0f} MiB |", flush=True)

    try:
        time.sleep(2)
        deadline = time.monotonic() + 120
        while True:  # until the server answers
            try:
                asyncio.run(run_load(target=f"127.0.0.1:{grpc_port}", protocol="quorum", model=args.model,
                                     shape=(1, 64), concurrency=1, duration=0.2, warmup=0.1))
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("quorum serve did not answer")
                time.sleep(0.5)
        print(f"maxmemory {args.maxmemory}, volatile-ttl\n\n| time | Redis used | evicted keys | keys | server RSS |\n"
              "|---|---|---|---|---|", flush=True)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = asyncio.run(run_load(target=f"127.0.0.1:{grpc_port}", protocol="quorum", model=args.model,
                                      shape=(1, 64), concurrency=args.concurrency, duration=args.minutes * 60,
                                      warmup=0.0))
        stop.set()
        sampler.join(timeout=args.every + 10)
        print(f"\n{result.throughput_rps:.0f} predictions/s for {args.minutes:g} min, errors {dict(result.errors)}")
        if samples:
            print(f"largest: Redis used {max(s[1] for s in samples):.1f} MiB, server RSS "
                  f"{max(s[4] for s in samples):.0f} MiB (first {samples[0][4]:.0f} MiB, last {samples[-1][4]:.0f} MiB)")
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=60)
        redis.terminate()
        redis.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
