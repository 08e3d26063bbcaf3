"""What oversized requests cost a Quorum server's memory, on each gRPC engine:

    python bench/engine_memory.py [--mib 256] [--limit-mib 64] [--model-repository models]

For each engine and case, a fresh `quorum serve` (so one peak does not hide the next) with a
--limit-mib message limit gets, from client processes, v2 ModelInfer messages of zeros: one
plain message of --mib MiB; one of --mib MiB gzip-compressed (a few hundred kB on the wire); one
of 4 x --mib MiB gzip-compressed (1 GiB at the default, about 1 MB on the wire); and four of
--mib MiB gzip-compressed at once. The table gives each case's answers and the server's peak
RSS growth: its peak is reset once the models have loaded (/proc/PID/clear_refs) and read
after the case (VmHWM), against its RSS at the reset.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
METHOD = "/inference.GRPCInferenceService/ModelInfer"
CASES = {  # name -> (MiB multiple of --mib, gzip, clients at once)
    "plain": (1, False, 1),
    "gzip": (1, True, 1),
    "gzip x4 size": (4, True, 1),
    "gzip, 4 at once": (1, True, 4),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _serving(port: int, process: subprocess.Popen, timeout: float = 180) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            if process.poll() is not None:
                raise SystemExit(f"quorum serve exited with {process.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit("quorum serve not SERVING in time")


def run_case(engine: str, case: str, mib: int, limit: int, repository: Path) -> str:
    multiple, gzip, clients = CASES[case]
    size = multiple * mib << 20
    port = _free_port()
    env = {**os.environ, "QUORUM_MAX_MESSAGE_BYTES": str(limit), "QUORUM_DRAIN_DELAY": "0"}
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--device", "cpu", "--model-repository", str(repository),
             "--grpc-port", str(port), "--metrics-port", "0", "--http-port", "0", "--grpc-engine", engine],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _serving(port, server)
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # resets the peak (VmHWM) to the RSS now
            base = _kib(server.pid, "VmRSS")
            senders = [subprocess.Popen([sys.executable, __file__, "--client", str(port), str(size), str(int(gzip))],
                                        stdout=subprocess.PIPE, text=True) for _ in range(clients)]
            answers = [s.communicate(timeout=600)[0].strip() for s in senders]
            grown = (_kib(server.pid, "VmHWM") - base) >> 10
        finally:
            server.terminate()
            server.wait(timeout=60)
    wire = " gzip" if gzip else ""
    return (f"| {engine} | {case} | {clients} x {size >> 20} MiB{wire} | {', '.join(sorted(set(answers)))} "
            f"| +{grown} MiB |")


def client(port: int, size: int, gzip: bool) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]) as channel:
        try:
            channel.unary_unary(METHOD)(b"\0" * size, timeout=300,
                                        compression=grpc.Compression.Gzip if gzip else None)
            print("OK")
        except grpc.RpcError as exc:
            print(exc.code().name)


def main() -> int:
    if sys.argv[1:2] == ["--client"]:
        client(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256, help="the size of one request (MiB)")
    p.add_argument("--limit-mib", type=int, default=64, help="the server's message limit (MiB; Quorum's default)")
    p.add_argument("--model-repository", type=Path, default=ROOT / "models")
    p.add_argument("--engines", default="grpcio,native")
    args = p.parse_args()
    print(f"message limit {args.limit_mib} MiB\n\n| engine | case | requests | answers | server peak RSS |\n"
          "|---|---|---|---|---|", flush=True)
    for engine in args.engines.split(","):
        for case in CASES:
            print(run_case(engine, case, args.mib, args.limit_mib << 20, args.model_repository), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
