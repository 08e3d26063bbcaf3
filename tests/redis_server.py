"""A real redis-server for the tests: on a free port, in a scratch folder, stoppable and
restartable on the same port (an outage, then the store coming back).

`make test` installs Debian's redis-server when it is missing (the Makefile's `redis` target)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.helpers import free_port


class RedisServer:
    def __init__(self, folder: Path, password: str | None = None, maxmemory: str = "256mb",
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        self.folder, self.password, self.maxmemory = folder, password, maxmemory
        self.tls = tls  # (certificate, key, CA): TLS only (rediss://), no plaintext port
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://localhost:{self.port}/0?ssl_ca_certs={self.tls[2]}"
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        if self.tls:
            return redis.Redis(host="localhost", port=self.port, password=self.password, socket_timeout=5, ssl=True,
                               ssl_ca_certs=str(self.tls[2]))
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)

    def start(self, timeout: float = 20) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: `make test` installs it (Debian's redis-server)"
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                   "--save", "", "--appendonly", "no", "--maxmemory", self.maxmemory,
                   "--maxmemory-policy", "volatile-ttl"]  # as deploy/k8s/components/redis-state runs it
        if self.password:
            command += ["--requirepass", self.password]
        if self.tls:
            cert, key, ca = self.tls
            command += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                        "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        log = open(self.folder / f"redis-{self.port}.log", "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        while True:
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                if self.process.poll() is not None or time.monotonic() > end:
                    raise AssertionError(f"redis-server did not start on port {self.port}: "
                                         f"{(self.folder / f'redis-{self.port}.log').read_text()[-2000:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


@contextlib.contextmanager
def running_redis(folder: Path, password: str | None = None, maxmemory: str = "256mb",
                  tls: tuple[Path, Path, Path] | None = None) -> Iterator[RedisServer]:
    folder.mkdir(parents=True, exist_ok=True)
    server = RedisServer(folder, password, maxmemory, tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()
