"""Multi-process serving: N copies of the server on one gRPC port (SO_REUSEPORT).

The parent starts the workers as child processes (`quorum serve` with the parsed settings
passed as QUORUM_* variables), forwards SIGTERM/SIGINT to them and exits when they have all
drained. Each worker is a complete server: it loads every model, polls the repository,
keeps its own feedback and serves its own /metrics on metrics_port + its index.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

from service.settings import Settings

log = logging.getLogger(__name__)


def worker_env(settings: Settings, index: int) -> dict[str, str]:
    """The environment that makes a child `quorum serve` worker `index` of `settings`."""
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        key = f"QUORUM_{name.upper()}"
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value if isinstance(value, str) else json.dumps(value)
    env["QUORUM_WORKERS"] = "1"
    env["QUORUM_REUSE_PORT"] = "true"
    if settings.metrics_port:
        env["QUORUM_METRICS_PORT"] = str(settings.metrics_port + index)
    return env


def run_workers(settings: Settings) -> int:
    if settings.grpc_port == 0:
        raise SystemExit("--workers needs a fixed --grpc-port: with port 0 each worker would pick its own")
    command = [sys.executable, "-m", "service.cli", "serve"]
    children = [subprocess.Popen(command, env=worker_env(settings, i)) for i in range(settings.workers)]
    log.info("started %d workers on port %d: pids %s", len(children), settings.grpc_port,
             ", ".join(str(c.pid) for c in children))

    def forward(signum: int, _frame) -> None:
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
        time.sleep(0.2)
    codes = [child.returncode for child in children]
    log.info("workers exited with %s", codes)
    return max(codes, key=abs)
