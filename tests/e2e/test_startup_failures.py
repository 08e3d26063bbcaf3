"""A server that cannot start says why in one line on stderr, naming the path, port or
setting, with exit code 2 for a setting to fix and 1 for a port another process holds; no
traceback, and none of its ports left listening. The cases are the ones an operator meets:
a repository that is not there, a second server on the same ports (each port alone too),
out-of-range and malformed values, an unknown flag, one port for two roles, a bind address
this host does not have. (TLS files and explicit control without a token: test_refuse_to_start.)"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from tests.helpers import ROOT, free_ports
from tests.server import RunningServer


def _serve(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`quorum serve` with only these QUORUM_* variables, expected to exit before serving."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QUORUM_")}
    return subprocess.run([sys.executable, "-m", "service.cli", "serve", "--device", "cpu", *args], cwd=ROOT,
                          env={**clean, **(env or {})}, capture_output=True, text=True, timeout=60)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _one_line(done: subprocess.CompletedProcess, code: int) -> str:
    """The refusal's only line on stderr (nothing on stdout), checked for its exit code."""
    assert done.returncode == code, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1, lines
    assert done.stdout == ""
    assert lines[0].startswith("quorum serve: "), lines[0]
    return lines[0]


# -- settings to fix: exit code 2, nothing bound --------------------------------------------------
def test_a_missing_repository_is_one_line_naming_it(tmp_path):
    ports = free_ports(3)
    nope = tmp_path / "nope"
    done = _serve(["--model-repository", str(nope), "--grpc-port", str(ports[0]), "--http-port", str(ports[1]),
                   "--metrics-port", str(ports[2])])
    assert _one_line(done, 2) == (f"quorum serve: model repository {str(nope)!r} (--model-repository, "
                                  "QUORUM_MODEL_REPOSITORY) does not exist")
    assert not any(_listening(p) for p in ports)


def test_a_repository_that_is_a_file_is_one_line_naming_it(tmp_path):
    afile = tmp_path / "models.tar"
    afile.write_bytes(b"not a folder")
    done = _serve(["--model-repository", str(afile), "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"],
                  env={"QUORUM_MODEL_REPOSITORY": "/also/ignored"})  # the flag wins over its variable
    assert _one_line(done, 2).endswith(f"{str(afile)!r} (--model-repository, QUORUM_MODEL_REPOSITORY) is not a folder")


def test_an_unreadable_repository_is_one_line_naming_it():
    """As a user who cannot list the folder. Root lists anything, so `quorum serve`'s main runs in
    a fork of this process that becomes nobody first: the fork has every module it needs
    already (imported here), so it never reads the checkout, which nobody may not be able to
    (a clone in a 0700 temporary folder)."""
    import importlib

    import service.cli

    for module in ("service.export.cli", "service.client.predict", "service.export.repository_cli",
                   "service.serve_flags", "service.setting_names", "service.settings", "service.logs",
                   "service.startup", "service.api.engine", "service.runtimes.devices", "service.objectives.state"):
        importlib.import_module(module)  # what quorum serve's main imports on its way to the refusal
    parent = Path(tempfile.mkdtemp(prefix="quorum-unreadable-"))
    args = ["serve", "--device", "cpu", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QUORUM_")}
    try:
        parent.chmod(0o755)
        repository = parent / "models"
        repository.mkdir(mode=0o000)
        repository.chmod(0o000)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: nobody, then quorum serve's main, its output into the pipe
            code = 99
            try:
                os.dup2(write, 1)
                os.dup2(write, 2)
                sys.stdout = sys.stderr = os.fdopen(write, "w", buffering=1)  # not pytest's capture
                if os.geteuid() == 0:
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
                os.environ.clear()
                os.environ.update(clean)
                code = service.cli.main([*args, "--model-repository", str(repository)])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        os.close(write)
        with os.fdopen(read) as pipe:
            output = pipe.read()
        _, status = os.waitpid(pid, 0)
        done = subprocess.CompletedProcess([], os.waitstatus_to_exitcode(status), "", output)
        assert _one_line(done, 2) == (f"quorum serve: model repository {str(repository)!r} (--model-repository, "
                                      "QUORUM_MODEL_REPOSITORY) cannot be read: Permission denied")
    finally:
        (parent / "models").chmod(0o755)
        shutil.rmtree(parent)


BAD_SETTINGS = {
    # case: (args, env, what the one line says)
    "port-out-of-range": (["--grpc-port", "70000"], {},
                          "grpc_port (--grpc-port, QUORUM_GRPC_PORT): Input should be less than or equal to 65535, "
                          "not 70000"),
    "not-a-number-env": ([], {"QUORUM_MAX_REQUEST_ROWS": "many"},
                         "max_request_rows (--max-request-rows, QUORUM_MAX_REQUEST_ROWS): Input should be a valid "
                         "integer, unable to parse string as an integer, not 'many'"),
    "port-not-a-number-flag": (["--grpc-port", "abc"], {}, "argument --grpc-port: invalid int value: 'abc'"),
    "unknown-flag": (["--pol-interval", "1"], {}, "unrecognized arguments: --pol-interval 1"),
    "bad-choice": (["--model-control", "sometimes"], {}, "argument --model-control: invalid choice: 'sometimes'"),
    "negative-duration": ([], {"QUORUM_GRACE_PERIOD": "-1"},
                          "grace_period_s (--grace-period, QUORUM_GRACE_PERIOD): Input should be greater than or "
                          "equal to 0, not '-1'"),
    "one-port-two-roles": (["--http-port", "{grpc}"], {},
                           "the gRPC port (--grpc-port, QUORUM_GRPC_PORT) and the HTTP port (--http-port, QUORUM_HTTP_PORT) "
                           "are both {grpc}: give each its own"),
    "unknown-device": (["--device", "tpu"], {}, "device (--device, QUORUM_DEVICE): device must be auto, cpu, gpu "
                                                "or gpu:N, got 'tpu'"),
    "unknown-override-device": ([], {"QUORUM_DEVICE_OVERRIDES": '{"digits_logreg": "gpu:x"}'},
                                "device_overrides (--device-overrides, QUORUM_DEVICE_OVERRIDES): device must be auto, "
                                "cpu, gpu or gpu:N, got 'gpu:x'"),
    "not-a-url": (["--otlp-endpoint", "http://[collector"], {},
                  "otlp_endpoint (--otlp-endpoint, QUORUM_OTLP_ENDPOINT): 'http://[collector' is not a URL"),
    "workers-on-port-0": (["--workers", "2", "--grpc-port", "0"], {},
                          "--workers 2 needs a fixed gRPC port (--grpc-port, QUORUM_GRPC_PORT): with port 0 each "
                          "worker would pick its own"),
    "address-not-of-this-host": ([], {"QUORUM_GRPC_HOST": "192.0.2.1"},  # TEST-NET-1: never a local address
                                 "gRPC address '192.0.2.1' (--grpc-host, QUORUM_GRPC_HOST) is not an address of "
                                 "this host"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_a_bad_setting_is_one_line_naming_it_exit_code_2(case):
    grpc, http, metrics = free_ports(3)
    args, env, expected = BAD_SETTINGS[case]
    args = [a.format(grpc=grpc) for a in args]
    done = _serve(["--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics), *args], env)
    line = _one_line(done, 2)
    assert expected.format(grpc=grpc) in line, line
    assert not any(_listening(p) for p in (grpc, http, metrics))


# -- a port another process holds: exit code 1, the running server unharmed ------------------------
TAKEN = {"all": ("gRPC", "grpc"), "grpc": ("gRPC", "grpc"), "http": ("HTTP", "http"), "metrics": ("metrics", "metrics"),
         "grpc-reuse-port": ("gRPC", "grpc")}


@pytest.mark.parametrize("taken", list(TAKEN))
def test_a_taken_port_is_one_line_naming_it_exit_code_1(server: RunningServer, taken):
    """A second server on the running one's ports ("all"), or on one of them with the others
    free; with --reuse-port (as a worker binds), a port another process holds without it too."""
    held = {"grpc": server.grpc_port, "http": server.http_port, "metrics": server.metrics_port}
    fresh = dict(zip(held, free_ports(3)))
    what, flag = TAKEN[taken]
    ports = held if taken == "all" else {**fresh, flag: held[flag]}
    done = _serve(["--model-repository", str(ROOT / "models"), "--grpc-port", str(ports["grpc"]),
                   "--http-port", str(ports["http"]), "--metrics-port", str(ports["metrics"]),
                   *(["--reuse-port"] if taken.endswith("reuse-port") else [])])
    line = _one_line(done, 1)
    assert line.startswith(f"quorum serve: {what} port {ports[flag]} (--{flag}-port, QUORUM_{flag.upper()}_PORT) "), line
    assert line.endswith(" is already in use (another server on the same ports?)"), line
    for name, port in ports.items():  # the refused server's own ports were never opened
        if port != held[name]:
            assert not _listening(port), (name, port)
    assert server.health() == health_pb2.HealthCheckResponse.SERVING  # the running server is unharmed
