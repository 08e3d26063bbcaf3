"""Multi-process serving: N copies of the server on one gRPC port (SO_REUSEPORT).

The parent starts the workers as child processes (`quorum serve` with the parsed settings
passed as QUORUM_* variables), forwards SIGTERM/SIGINT to them and exits when they have all
drained. Each worker is a complete server: it loads every model, polls the repository,
keeps its own feedback and serves its own /metrics on metrics_port + its index.

The shared ports open only once every worker has loaded (`WorkerBarrier`): the kernel hands
a new connection to any socket listening on the port, so a worker that listened while
loading would take connections after readiness, asked of another worker, said SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

from service.setting_names import env_name, old_env_name
from service.settings import Settings

log = logging.getLogger(__name__)


def worker_env(settings: Settings, index: int) -> dict[str, str]:
    """The environment that makes a child `quorum serve` worker `index` of `settings`."""
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        key, old = env_name(name), old_env_name(name)
        if old:
            env.pop(old, None)  # its value is in `key` now; the parent warned about the name once
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value if isinstance(value, str) else json.dumps(value)
    env["QUORUM_WORKERS"] = "1"
    env["QUORUM_REUSE_PORT"] = "true"
    if settings.metrics_port:
        env["QUORUM_METRICS_PORT"] = str(settings.metrics_port + index)
    return env


BARRIER_ENV = "_QUORUM_WORKER_BARRIER"
"""A worker's two pipe ends, "loaded_fd,go_fd" (outside the QUORUM_ settings: not a setting)."""


class WorkerBarrier:
    """A worker's side: say "loaded" to the parent, then wait for its "go" (every worker loaded)."""

    def __init__(self, loaded_fd: int, go_fd: int) -> None:
        self.loaded_fd, self.go_fd = loaded_fd, go_fd

    @classmethod
    def from_env(cls) -> WorkerBarrier | None:
        """This process's barrier; None outside `--workers N`."""
        value = os.environ.pop(BARRIER_ENV, None)
        if not value:
            return None
        loaded_fd, go_fd = (int(fd) for fd in value.split(","))
        return cls(loaded_fd, go_fd)

    async def loaded_then_go(self, stopping: asyncio.Event) -> bool:
        """True once the parent says every worker has loaded; False if this worker is told to
        stop first (a signal, or the parent closing the pipe because another worker failed)."""
        os.write(self.loaded_fd, b"l")
        os.close(self.loaded_fd)
        loop = asyncio.get_running_loop()
        go: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            if not go.done():
                go.set_result(os.read(self.go_fd, 1))

        loop.add_reader(self.go_fd, readable)
        stop: asyncio.Future[Any] = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({go, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(self.go_fd)
            os.close(self.go_fd)
            stop.cancel()
        return go.done() and go.result() == b"g"


class _Gate:
    """The parent's side: one pipe pair per worker; "go" to all once all have said "loaded"."""

    def __init__(self, count: int) -> None:
        self.loaded = [os.pipe() for _ in range(count)]  # worker writes, parent reads
        self.go = [os.pipe() for _ in range(count)]  # parent writes, worker reads
        self.waiting = {self.loaded[i][0]: i for i in range(count)}
        self.released = False

    def child_fds(self, index: int) -> tuple[int, int]:
        return self.loaded[index][1], self.go[index][0]

    def after_spawn(self) -> None:
        for index in range(len(self.loaded)):
            for fd in self.child_fds(index):
                os.close(fd)

    def poll(self, timeout: float) -> None:
        """Collects "loaded" (or a worker's exit: EOF) for up to `timeout`; opens when all have."""
        if self.released or not self.waiting:
            time.sleep(timeout)
            return
        readable, _, _ = select.select(list(self.waiting), [], [], timeout)
        for fd in readable:
            said = os.read(fd, 1)
            os.close(fd)
            index = self.waiting.pop(fd)
            if said != b"l":  # exited while loading: the ports stay closed; its exit code stops the rest
                log.error("worker %d exited while loading; the ports stay closed", index)
                self.release(b"")
        if not self.waiting and not self.released:
            log.info("every worker has loaded: opening the ports")
            self.release(b"g")

    def release(self, word: bytes) -> None:
        """b"g": open the ports; b"": stop (closing the pipes says it to workers still waiting).
        Said once: whichever comes first."""
        if self.released:
            return
        self.released = True
        for _, write_fd in self.go:
            if word:
                with contextlib.suppress(BrokenPipeError):  # a worker that died closed its end
                    os.write(write_fd, word)
            os.close(write_fd)


def run_workers(settings: Settings) -> int:
    if settings.grpc_port == 0:
        raise SystemExit("--workers needs a fixed --grpc-port: with port 0 each worker would pick its own")
    command = [sys.executable, "-m", "service.cli", "serve"]
    gate = _Gate(settings.workers)
    children = []
    for i in range(settings.workers):
        fds = gate.child_fds(i)
        env = {**worker_env(settings, i), BARRIER_ENV: ",".join(map(str, fds))}
        children.append(subprocess.Popen(command, env=env, pass_fds=fds))
    gate.after_spawn()
    log.info("started %d workers on port %d: pids %s; the ports open once every worker has loaded",
             len(children), settings.grpc_port, ", ".join(str(c.pid) for c in children))

    def forward(signum: int, _frame) -> None:
        gate.release(b"")  # a worker still loading stops without opening the ports
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    failed = False
    while any(child.poll() is None for child in children):
        # A worker that dies on its own takes the others down: half a server is not one.
        if not failed and any(child.poll() not in (None, 0) for child in children):
            log.error("a worker exited with %s; stopping the others",
                      [c.returncode for c in children if c.returncode])
            forward(signal.SIGTERM, None)
            failed = True
        gate.poll(0.2)
    codes = [child.returncode for child in children]
    log.info("workers exited with %s", codes)
    return max(codes, key=abs)
