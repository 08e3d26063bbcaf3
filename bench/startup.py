"""Start-up cost of `quorum serve`: seconds until gRPC health says SERVING, resident memory
then, and whether TensorFlow itself was loaded (its shared library mapped).

    python bench/startup.py [--repository models] [--only digits_mlp_a,digits_cnn_a] [--runs 3]
                            [--root PATH]

`--only` copies those models into a temporary repository (an ONNX-only one, say);
`--root` runs another checkout's server (a worktree of an older commit) for a before/after
in one run. Runs alternate between the checkouts; each figure is the median.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
TF_LIBRARY = "libtensorflow_framework"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _tensorflow_mapped(pid: int) -> bool:
    return TF_LIBRARY in Path(f"/proc/{pid}/maps").read_text()


def measure(root: Path, repository: Path, timeout_s: float = 300.0) -> tuple[float, float, bool]:
    port = _free_port()
    command = [sys.executable, "-m", "service.cli", "serve", "--model-repository", str(repository),
               "--grpc-port", str(port), "--metrics-port", str(_free_port()), "--http-port", "0",
               "--device", "cpu"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the server in {root} exited with {process.returncode}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.perf_counter() - start > timeout_s:
                    raise TimeoutError(f"not SERVING after {timeout_s} s")
                time.sleep(0.02)
        ready_s = time.perf_counter() - start
        return ready_s, _rss_mb(process.pid), _tensorflow_mapped(process.pid)
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--only", default="", help="comma-separated models to copy into a temporary repository")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--root", type=Path, action="append", default=[], help="another checkout to compare")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repository = args.repository
        if args.only:
            repository = Path(tmp) / "repo"
            for name in args.only.split(","):
                shutil.copytree(args.repository / name, repository / name)
        roots = [ROOT, *args.root]
        results: dict[Path, list[tuple[float, float, bool]]] = {r: [] for r in roots}
        for _ in range(args.runs):
            for root in roots:
                results[root].append(measure(root, repository))
    print(f"repository: {args.only or args.repository}")
    print("| checkout | ready s (median) | RSS MB | TensorFlow loaded |")
    print("|---|---|---|---|")
    for root, runs in results.items():
        print(f"| {root} | {statistics.median(r[0] for r in runs):.2f} | "
              f"{statistics.median(r[1] for r in runs):.0f} | {'yes' if any(r[2] for r in runs) else 'no'} |")


if __name__ == "__main__":
    main()
