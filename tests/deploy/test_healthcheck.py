"""The image's health check (HEALTHCHECK in the Dockerfile, and the exec probes of the TLS
component) against the real server: unhealthy while nothing serves, healthy once every
model is loaded, over plaintext and over mutual TLS."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import grpc

from tests.deploy.manifests import ROOT
from tests.e2e.certs import _EC, _openssl, make_pki
from tests.server import running_server, wait_serving

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _healthcheck_commands() -> list[list[str]]:
    text = DOCKERFILE.replace("\\\n", " ")
    return [json.loads(m) for m in re.findall(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", text, re.M)]


def _in_checkout(command: list[str]) -> list[str]:
    """The command with the image's paths mapped back to the files the Dockerfile copies there."""
    copies = {dst: src for src, dst in re.findall(r"^COPY --chown=\S+ (\S+) (\S+)$", DOCKERFILE, re.M)}
    return [str(ROOT / copies[arg]) if arg in copies else arg for arg in command]


def _probe(command: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    assert command[0] == "python"
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("QUORUM_")},
                "QUORUM_GRPC_PORT": str(port), **(env or {})}
    return subprocess.run([sys.executable, *_in_checkout(command)[1:]], env=full_env, capture_output=True,
                          text=True, timeout=60)


def test_healthcheck_follows_grpc_health(tmp_path):
    commands = _healthcheck_commands()
    assert len(commands) == 2 and commands[0] == commands[1]  # cpu and gpu targets
    with running_server(tmp_path) as server:
        assert _probe(commands[0], server.grpc_port).returncode == 0
        unknown = _probe(commands[0] + ["no-such-model"], server.grpc_port)  # the argument names the service
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    assert _probe(commands[0], server.grpc_port).returncode != 0  # stopped: unhealthy


def _server_and_client_cert(folder: Path, ca) -> tuple[Path, Path]:
    """A certificate for the pod that serves and, for the probe, also acts as a client (as
    cert-manager issues with `usages: [server auth, client auth]`); first DNS name first."""
    (folder / "pod.ext").write_text("subjectAltName=DNS:quorum.quorum.svc,IP:127.0.0.1\n"
                                    "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", *_EC, "-keyout", "pod.key", "-out", "pod.csr", "-subj", "/CN=quorum", cwd=folder)
    _openssl("x509", "-req", "-in", "pod.csr", "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
             "-out", "pod.pem", "-days", "2", "-extfile", "pod.ext", cwd=folder)
    return folder / "pod.pem", folder / "pod.key"


def test_healthcheck_speaks_mutual_tls_with_the_servers_certificate(tmp_path):
    pki = make_pki(tmp_path / "pki")
    cert, key = _server_and_client_cert(tmp_path / "pki", pki.ca)
    tls = {"QUORUM_TLS_CERT": str(cert), "QUORUM_TLS_KEY": str(key), "QUORUM_TLS_CLIENT_CA": str(pki.ca.cert)}
    client = grpc.ssl_channel_credentials(pki.ca.cert.read_bytes(), *pki.client.read())
    command = _healthcheck_commands()[0]
    with running_server(tmp_path, env=tls, wait=False) as server:
        wait_serving(server, channel_factory=lambda: grpc.secure_channel(server.address, client))
        assert _probe(command, server.grpc_port, tls).returncode == 0  # the pod's env, as the exec probe sees it
        plaintext = _probe(command, server.grpc_port)
        assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr
        no_client_cert = {k: v for k, v in tls.items() if k != "QUORUM_TLS_CLIENT_CA"}
        assert _probe(command, server.grpc_port, {**no_client_cert, "HEALTHCHECK_CA": str(pki.ca.cert)}).returncode == 1
        wrong_ca = _probe(command, server.grpc_port, {**tls, "HEALTHCHECK_CA": str(pki.stranger.cert)})
        assert wrong_ca.returncode == 1
