"""The image's HEALTHCHECK command, taken from the Dockerfile, against the real server:
unhealthy while nothing serves, healthy once every model is loaded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from tests.deploy.manifests import ROOT
from tests.server import running_server


def _healthcheck_commands() -> list[list[str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [json.loads(m) for m in re.findall(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", text, re.M)]


def _probe(command: list[str], port: int) -> int:
    assert command[0] == "python"
    env = {**os.environ, "QUORUM_GRPC_PORT": str(port)}
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode


def test_healthcheck_follows_grpc_health(tmp_path):
    commands = _healthcheck_commands()
    assert len(commands) == 2 and commands[0] == commands[1]  # cpu and gpu targets
    with running_server(tmp_path) as server:
        assert _probe(commands[0], server.grpc_port) == 0
    assert _probe(commands[0], server.grpc_port) != 0  # stopped: unhealthy
