"""Starting the real server, as a separate process on free ports, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import ROOT, free_ports, onnx_models


@dataclass
class RunningServer:
    process: subprocess.Popen
    grpc_port: int
    metrics_port: int
    log: Path
    engine: str | None = None
    http_port: int = 0
    """The HTTP/REST port (0 when the test turned it off with --http-port 0)."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def health(self, service: str = "", channel: grpc.Channel | None = None) -> int:
        with (channel or self.channel()) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2).status

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


EXPLICIT_CONTROL = ["--model-control", "explicit", "--allow-unauthenticated-control"]
"""`args` of a test server whose tests call the model-control RPCs without a bearer token:
explicit control without a token refuses to start unless the flag says it is intended."""


def wait_serving(server: RunningServer, timeout: float = 90, channel_factory=None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.output()[-4000:]}")
        try:
            channel = channel_factory() if channel_factory else None
            if server.health(channel=channel) == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not SERVING after {timeout}s:\n{server.output()[-4000:]}")


@contextmanager
def running_server(tmp_path: Path, repository: Path | None = None, *, wait: bool = True,
                   env: dict[str, str] | None = None, args: list[str] = ()) -> Iterator[RunningServer]:
    """`quorum serve` on free ports; settings through flags and QUORUM_* env, as a user would.

    Defaults differ from a real `quorum serve` in two ways only, to keep the suite fast: a
    0.2 s drain delay (5 s by default) and a 0.5 s poll interval (2 s), which matters only to
    a test that asks for hot reload with `args=["--model-control", "poll"]` (the default
    model control is none, as in production).

    The repository is the bundled one less its SavedModel members (tests/helpers.py
    onnx_models) unless a test names another: pass MODELS where TensorFlow is the subject.

    The gRPC engine is QUORUM_TEST_GRPC_ENGINE's, when set (tests/e2e/conftest.py sets it).
    An `--http-port` in `args` wins over the free one picked here (0 turns HTTP off)."""
    grpc_port, metrics_port, free_http_port = free_ports(3)
    args = list(args)
    http_port = int(args[args.index("--http-port") + 1]) if "--http-port" in args else free_http_port
    log = tmp_path / f"server-{grpc_port}.log"
    engine = os.environ.get("QUORUM_TEST_GRPC_ENGINE")
    repository = onnx_models() if repository is None else repository
    command = [sys.executable, "-m", "service.cli", "serve", "--model-repository", str(repository),
               "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
               "--http-port", str(http_port), "--device", "cpu",
               *(["--grpc-engine", engine] if engine else []), *args]
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("QUORUM_TEST_")}  # the suite's own, not settings
    full_env = {**inherited, "QUORUM_POLL_INTERVAL": "0.5", "QUORUM_DRAIN_DELAY": "0.2",
                "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = RunningServer(process, grpc_port, metrics_port, log, engine=engine, http_port=http_port)
    try:
        if wait:
            wait_serving(server)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
