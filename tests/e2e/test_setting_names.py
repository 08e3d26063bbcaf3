"""Settings say what they are: each flag's variable is QUORUM_ plus the flag's name
(`--grace-period`: QUORUM_GRACE_PERIOD), the names of before (QUORUM_GRACE_PERIOD_S) still
work with one deprecation line, a QUORUM_* variable that names no setting refuses to start
naming the closest one, and `quorum serve --help` lists every setting with its default."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from service.settings import Settings
from service.workers import worker_env
from tests.helpers import ROOT, free_ports
from tests.server import running_server

# Stated here rather than imported: the rule a user reads in README.
FLAGS = {name: "--" + name.removesuffix("_s").replace("_", "-") for name in Settings.model_fields}
VARIABLES = {name: "QUORUM_" + flag[2:].upper().replace("-", "_") for name, flag in FLAGS.items()}


def _serve(env: dict[str, str], args: list[str] = ()) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QUORUM_")}
    return subprocess.run([sys.executable, "-m", "service.cli", "serve", *args], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


def test_help_lists_every_setting_with_its_flag_variable_and_default():
    done = _serve({}, ["--help"])
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps lines anywhere between words
    for name, variable in VARIABLES.items():
        if name == "auth_token":  # environment only: a flag would show the token in `ps`
            assert re.search(rf"{variable}: [^;]*\(default: unset\)", text), name
            continue
        entry = re.search(rf"{FLAGS[name]}[ ,].{{0,300}}?\(default: ([^;]+); {variable}\)", text)
        assert entry, f"{name}: no '{FLAGS[name]} ... (default: ...; {variable})' in --help"
    # The ones that were environment-only, by name.
    for flag, default in [("--grpc-host", "[::]"), ("--http-host", "0.0.0.0"), ("--metrics-host", "0.0.0.0"),
                          ("--compute-threads", "0"), ("--tls-cert", "unset"), ("--auth-token-file", "unset"),
                          ("--poll-interval", "2.0"), ("--model-repository", "the bundled models/")]:
        variable = "QUORUM_" + flag[2:].upper().replace("-", "_")
        assert re.search(rf"{flag} .{{0,300}}?\(default: {re.escape(default)}; {variable}\)", text), flag


def test_the_flags_variable_sets_it_and_an_old_name_works_with_one_warning(tmp_path):
    env = {"QUORUM_DRAIN_DELAY": "0.3", "QUORUM_GRACE_PERIOD_S": "6"}  # the new name, and an old one
    with running_server(tmp_path, env=env) as server:
        assert server.stop() == 0
    log = server.output()
    assert "drain delay 0.3s, grace 6.0s" in log, log[-3000:]  # both were read
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert warnings == [w for w in warnings if "QUORUM_GRACE_PERIOD_S" in w] and len(warnings) == 1, warnings
    assert warnings[0].endswith("QUORUM_GRACE_PERIOD_S is deprecated: rename it QUORUM_GRACE_PERIOD "
                                "(the flag --grace-period)"), warnings[0]


def test_an_old_names_bad_value_is_refused_naming_both_names():
    done = _serve({"QUORUM_GRACE_PERIOD_S": "-1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "quorum serve: invalid settings: grace_period_s (--grace-period, QUORUM_GRACE_PERIOD): Input should be "
        "greater than or equal to 0, not '-1'; QUORUM_GRACE_PERIOD_S is deprecated: rename it QUORUM_GRACE_PERIOD "
        "(the flag --grace-period)"]


def test_the_new_name_wins_over_the_old_one():
    done = _serve({"QUORUM_POLL_INTERVAL": "-1", "QUORUM_POLL_INTERVAL_S": "5"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "quorum serve: invalid settings: poll_interval_s (--poll-interval, QUORUM_POLL_INTERVAL): Input should be "
        "greater than or equal to 0, not '-1'; QUORUM_POLL_INTERVAL_S is deprecated and ignored: "
        "QUORUM_POLL_INTERVAL is set too and wins"]


@pytest.mark.parametrize("variable, closest", [
    ("QUORUM_POLL_INTERVL", "QUORUM_POLL_INTERVAL"), ("QUORUM_GRPC_HOTS", "QUORUM_GRPC_HOST"),
    ("QUORUM_TLS_CRT", "QUORUM_TLS_CERT"), ("QUORUM_WORKER", "QUORUM_WORKERS"), ("QUORUM_XYZZY", None)])
def test_an_unknown_quorum_variable_refuses_to_start_naming_the_closest(variable, closest):
    ports = free_ports(3)
    done = _serve({variable: "1"}, ["--grpc-port", str(ports[0]), "--http-port", str(ports[1]),
                                    "--metrics-port", str(ports[2])])
    assert done.returncode == 2, done.stderr[-3000:]
    hint = f" (did you mean {closest}?)" if closest else ""
    assert done.stderr.splitlines() == [
        f"quorum serve: {variable} names no setting{hint}; `quorum serve --help` lists every setting and its variable"]
    for port in ports:
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, port


def test_a_workers_environment_holds_the_settings_under_their_current_names(monkeypatch):
    """--workers passes the parsed settings to each worker as QUORUM_* variables: current names
    only (an old name the parent read is not passed on, so workers do not warn again)."""
    for key in [k for k in os.environ if k.startswith("QUORUM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("QUORUM_GRACE_PERIOD_S", "6")
    parent = Settings(poll_interval_s=7, workers=2, metrics_port=9100)
    env = worker_env(parent, 1)
    assert "QUORUM_GRACE_PERIOD_S" not in env and env["QUORUM_GRACE_PERIOD"] == "6.0"
    assert {k for k in env if k.startswith("QUORUM_")} <= set(VARIABLES.values())
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    worker = Settings()
    assert worker.model_dump() == {**parent.model_dump(), "workers": 1, "reuse_port": True, "metrics_port": 9101}

