"""Helpers of the remote-member tests (issue 39): repositories whose ensembles name members on
other servers, a server started on a gRPC port chosen beforehand (to stop and start it again
there), and a TCP proxy that delays what a server sends back."""

from __future__ import annotations

import queue
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import yaml

from tests.helpers import MODELS, copy_variant
from tests.server import RunningServer, running_server, wait_serving

STRICT = ["--batch-invariance", "strict"]
WATCH = {"watch_interval_s": 0.2, "timeout_s": 3}
"""Every remote member of these tests is looked at every 0.2 s (1 s by default)."""


def remote(name: str, endpoint: str, **settings) -> dict:
    return {"name": name, "endpoint": endpoint, **WATCH, **settings}


def repository(root: Path, variants: dict[str, str] = {}, ensembles: dict[str, dict] = {}) -> Path:  # noqa: B006
    """`root` holding bundled variants (name -> bundled source) and ensembles (name -> ensemble.yaml)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, source in variants.items():
        if name == source:
            shutil.copytree(MODELS / source, root / name)
        else:
            copy_variant(source, root, as_name=name)
    for name, config in ensembles.items():
        (root / name).mkdir()
        (root / name / "ensemble.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


@contextmanager
def server_on(tmp_path: Path, repo: Path, port: int, args: list[str] = (), env: dict | None = None,  # type: ignore[assignment]
              wait: bool = True) -> Iterator[RunningServer]:
    """`quorum serve` with its gRPC port `port` (a later flag wins: tests/server.py picks one first)."""
    with running_server(tmp_path, repo, wait=False, args=[*args, "--grpc-port", str(port)], env=env) as server:
        server.grpc_port = port
        if wait:
            wait_serving(server)
        yield server


def infer(client: grpcclient.InferenceServerClient, model: str, pixels: np.ndarray, **kwargs):
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    return client.infer(model, [tensor], **kwargs)


def left_out(answer) -> str:
    parameters = answer.get_response().parameters
    return parameters["members_left_out"].string_param if "members_left_out" in parameters else ""


class DelayProxy:
    """A TCP proxy on loopback to `target_port`: what the server sends back waits `delay`
    seconds (set at any time; 0 at first) before the client gets it, in order."""

    def __init__(self, target_port: int) -> None:
        self.delay = 0.0
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="delay-proxy").start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                continue
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, delayed: bool) -> None:
        chunks: queue.Queue = queue.Queue()

        def send() -> None:
            while (item := chunks.get()) is not None:
                at, data = item
                time.sleep(max(0.0, at - time.monotonic()))
                try:
                    sink.sendall(data)
                except OSError:
                    return

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            while data := source.recv(65536):
                chunks.put((time.monotonic() + (self.delay if delayed else 0.0), data))
        except OSError:
            pass
        chunks.put(None)
        sender.join(timeout=30)
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
