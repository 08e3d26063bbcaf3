"""The `kubectl create secret` commands docs/deploy.md shows, run as written (client-side
dry run: no cluster here) on real files: each gives a valid Secret, and the ones for
`overlays/cpu-secured` hold every file that overlay mounts, under the names it reads, so
that the pod's settings parse and its certificate and key are a pair."""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from service.settings import Settings
from tests.deploy.manifests import K8S, ROOT, container, find, render, settings_data, tool, validate

DOCS = (ROOT / "docs" / "deploy.md").read_text()
COMMANDS = list(dict.fromkeys(" ".join(c.replace("\\\n", " ").split())  # each once
                            for c in re.findall(r"^ *(kubectl -n quorum create secret (?:[^\n]*\\\n)*[^\n]*)$", DOCS, re.M)))
SECURED_SECTION = DOCS.split("### Token and TLS from Secrets", 1)[1].split("\n#", 1)[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The files the commands name, as an operator would have them: a token and real PEMs."""
    from tests.e2e.certs import make_pki

    folder = tmp_path_factory.mktemp("secret-files")
    pki = make_pki(folder / "pki")
    (folder / "token").write_text("s3cret-token\n")
    (folder / "redis-password").write_text("r3dis-password\n")  # components/redis-state
    (folder / "state-url").write_text("rediss://:r3dis-password@redis.example.internal:6380/0\n")  # external-state
    for name, source in {"server.pem": pki.server.cert, "server-key.pem": pki.server.key,
                         "tls.crt": pki.server.cert, "tls.key": pki.server.key, "ca.crt": pki.ca.cert}.items():
        shutil.copyfile(source, folder / name)
    return folder


def _run(command: str, cwd: Path) -> dict:
    argv = shlex.split(command)
    assert argv[0] == "kubectl"
    out = subprocess.run([tool("kubectl"), *argv[1:], "--dry-run=client", "-o", "json"], cwd=cwd,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (command, out.stderr)
    return json.loads(out.stdout)


def test_the_docs_show_the_secrets_each_component_needs():
    names = {shlex.split(c)[6] for c in COMMANDS}
    assert {"quorum-auth", "quorum-tls", "quorum-model-store"} <= names, COMMANDS
    assert sum(c in SECURED_SECTION for c in COMMANDS) == 2


@pytest.mark.parametrize("command", COMMANDS)
def test_each_documented_command_makes_a_valid_secret(command, files):
    secret = _run(command, files)
    assert secret["kind"] == "Secret" and secret["metadata"]["namespace"] == "quorum"
    assert secret["data"], command
    validate(secret)


def test_the_secured_overlay_finds_every_file_in_the_documented_secrets(files, tmp_path, monkeypatch):
    secrets = {s["metadata"]["name"]: s for s in (_run(c, files) for c in COMMANDS if c in SECURED_SECTION)}
    objects = render(K8S / "overlays" / "cpu-secured")
    pod = find(objects, "Deployment", "quorum")["spec"]["template"]["spec"]
    c = container(objects)
    # what the kubelet does: each Secret's keys become files in its volume's mount
    for mount in c["volumeMounts"]:
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        if "secret" not in volume:
            continue
        target = tmp_path / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True)
        for key, value in secrets[volume["secret"]["secretName"]]["data"].items():
            (target / key).write_bytes(base64.b64decode(value))
    for key in [k for k in __import__("os").environ if k.startswith("QUORUM_")]:
        monkeypatch.delenv(key)
    data = settings_data(objects)
    for key, value in data.items():
        monkeypatch.setenv(key, str(tmp_path / value.lstrip("/")) if value.startswith("/etc/") else value)
    settings = Settings()  # refuses to start on a missing or empty file (fail closed)
    assert settings.token() == "s3cret-token"
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)  # a certificate and its key
    context.load_verify_locations(settings.tls_client_ca)
