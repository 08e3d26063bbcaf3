"""Settings that cannot serve safely refuse to start, before any port is bound: one line on
stderr naming the setting (its QUORUM_* variable and the path, for files), exit code 2, no
traceback. Explicit model control without a bearer token starts only when a flag says that
is intended, and then warns. TLS files are checked as a user misconfigures them: swapped,
missing, empty, a folder, not PEM, a key of another certificate, a key with a passphrase, a
client CA with no certificate (certificates made for the test by tests/e2e/certs.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.e2e.certs import Pki, make_pki
from tests.helpers import ROOT, free_ports
from tests.server import running_server

TOKEN = "control-token-for-tests"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _serve_refused(env: dict[str, str], args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`quorum serve` with only these QUORUM_* variables, expected to exit before serving."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QUORUM_")}
    return subprocess.run([sys.executable, "-m", "service.cli", "serve", "--grpc-port", "0", "--metrics-port", "0",
                           "--http-port", "0", *args], cwd=ROOT, env={**clean, **env}, capture_output=True,
                          text=True, timeout=120)


# -- explicit model control needs a token, or a flag that says none is intended ------------------
def test_explicit_control_without_a_token_refuses_to_start_in_one_line():
    ports = [str(p) for p in free_ports(3)]
    done = _serve_refused({}, ("--model-control", "explicit", "--grpc-port", ports[0], "--http-port", ports[1],
                               "--metrics-port", ports[2]))  # the last of a repeated flag wins
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        "quorum serve: invalid settings: model_control is explicit but no auth_token or auth_token_file is set: "
        "anyone who reaches the port could load, unload and reconfigure every model; set QUORUM_AUTH_TOKEN_FILE "
        "(or QUORUM_AUTH_TOKEN), or pass --allow-unauthenticated-control "
        "(QUORUM_ALLOW_UNAUTHENTICATED_CONTROL=true) if that is intended"]
    assert done.stdout == ""
    for port in ports:  # nothing was left listening (nothing was ever bound)
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", int(port))) != 0, port


def test_explicit_control_without_a_token_starts_when_asked_and_warns_once(tmp_path):
    # The flag's variable here; tests/server.py EXPLICIT_CONTROL passes the flag itself.
    env = {"QUORUM_ALLOW_UNAUTHENTICATED_CONTROL": "true"}
    with running_server(tmp_path, env=env, args=["--model-control", "explicit"]) as server:
        client = grpcclient.InferenceServerClient(server.address)
        try:
            client.unload_model("digits_logreg")  # no token asked for: what the flag allows
            assert not client.is_model_ready("digits_logreg")
            client.load_model("digits_logreg")
            assert client.is_model_ready("digits_logreg")
        finally:
            client.close()
        assert server.stop() == 0
    warnings = [line for line in server.output().splitlines() if "--allow-unauthenticated-control" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0], warnings
    assert "anyone who reaches the gRPC or HTTP port can load, unload and reconfigure models" in warnings[0]


def test_explicit_control_with_a_token_starts_without_the_warning(tmp_path):
    with running_server(tmp_path, env={"QUORUM_AUTH_TOKEN": TOKEN}, args=["--model-control", "explicit"]) as server:
        client = grpcclient.InferenceServerClient(server.address)
        try:
            with pytest.raises(InferenceServerException, match="bearer token"):
                client.unload_model("digits_logreg")
            client.unload_model("digits_logreg", headers={"authorization": f"Bearer {TOKEN}"})
        finally:
            client.close()
        assert server.stop() == 0
    assert "allow-unauthenticated-control" not in server.output()


# -- TLS files that cannot serve refuse to start: one line naming the setting and the path -------
def _tls_cases(pki: Pki, tmp_path) -> dict[str, tuple[dict[str, str], list[str]]]:
    """case -> (env, what its one line must say)."""
    cert, key = str(pki.server.cert), str(pki.server.key)
    empty, garbage, folder = tmp_path / "empty.pem", tmp_path / "garbage.pem", tmp_path / "a-folder"
    empty.write_text("")
    garbage.write_text("not a certificate\n")
    folder.mkdir()
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", key, "-aes256", "-passout", "pass:secret", "-out", str(encrypted)],
                   check=True, capture_output=True)
    absent = str(tmp_path / "absent.pem")
    pair = {"QUORUM_TLS_CERT": cert, "QUORUM_TLS_KEY": key}
    return {
        "swapped": ({"QUORUM_TLS_CERT": key, "QUORUM_TLS_KEY": cert},
                    [f"tls_cert {key!r} (QUORUM_TLS_CERT) holds a private key and tls_key {cert!r} (QUORUM_TLS_KEY) "
                     "a certificate: the two are swapped"]),
        "key-as-cert": ({"QUORUM_TLS_CERT": key, "QUORUM_TLS_KEY": key},
                        [f"tls_cert {key!r} (QUORUM_TLS_CERT) holds a private key, not a certificate"]),
        "cert-as-key": ({"QUORUM_TLS_CERT": cert, "QUORUM_TLS_KEY": cert},
                        [f"tls_key {cert!r} (QUORUM_TLS_KEY) holds a certificate, not a private key"]),
        "empty-cert-path": ({"QUORUM_TLS_CERT": "", "QUORUM_TLS_KEY": key},
                            ["tls_cert (QUORUM_TLS_CERT) is set but empty"]),
        "empty-key-path": ({"QUORUM_TLS_CERT": cert, "QUORUM_TLS_KEY": " "},
                           ["tls_key (QUORUM_TLS_KEY) is set but empty"]),
        "missing-cert": ({"QUORUM_TLS_CERT": absent, "QUORUM_TLS_KEY": key},
                         [f"tls_cert {absent!r} (QUORUM_TLS_CERT) cannot be read: No such file or directory"]),
        "missing-key": ({"QUORUM_TLS_CERT": cert, "QUORUM_TLS_KEY": absent},
                        [f"tls_key {absent!r} (QUORUM_TLS_KEY) cannot be read: No such file or directory"]),
        "empty-cert-file": ({"QUORUM_TLS_CERT": str(empty), "QUORUM_TLS_KEY": key},
                            [f"tls_cert {str(empty)!r} (QUORUM_TLS_CERT) is empty"]),
        "cert-is-a-folder": ({"QUORUM_TLS_CERT": str(folder), "QUORUM_TLS_KEY": key},
                             [f"tls_cert {str(folder)!r} (QUORUM_TLS_CERT) is a folder"]),
        "cert-not-pem": ({"QUORUM_TLS_CERT": str(garbage), "QUORUM_TLS_KEY": key},
                         [f"tls_cert {str(garbage)!r} (QUORUM_TLS_CERT) holds no PEM certificate"]),
        "key-of-another-certificate": ({"QUORUM_TLS_CERT": cert, "QUORUM_TLS_KEY": str(pki.client.key)},
                                       [f"tls_key {str(pki.client.key)!r} (QUORUM_TLS_KEY) is not the private key "
                                        f"of the certificate in tls_cert {cert!r} (QUORUM_TLS_CERT)"]),
        "encrypted-key": ({"QUORUM_TLS_CERT": cert, "QUORUM_TLS_KEY": str(encrypted)},
                          [f"tls_key {str(encrypted)!r} (QUORUM_TLS_KEY) is encrypted with a passphrase"]),
        "missing-client-ca": ({**pair, "QUORUM_TLS_CLIENT_CA": absent},
                              [f"tls_client_ca {absent!r} (QUORUM_TLS_CLIENT_CA) cannot be read"]),
        "client-ca-holds-a-key": ({**pair, "QUORUM_TLS_CLIENT_CA": key},
                                  [f"tls_client_ca {key!r} (QUORUM_TLS_CLIENT_CA) holds no PEM certificate"]),
    }


TLS_CASES = ["swapped", "key-as-cert", "cert-as-key", "empty-cert-path", "empty-key-path", "missing-cert",
             "missing-key", "empty-cert-file", "cert-is-a-folder", "cert-not-pem", "key-of-another-certificate",
             "encrypted-key", "missing-client-ca", "client-ca-holds-a-key"]


@pytest.mark.parametrize("case", TLS_CASES)
def test_tls_misconfiguration_refuses_to_start_in_one_line(tmp_path, pki, case):
    env, expected = _tls_cases(pki, tmp_path)[case]
    done = _serve_refused(env)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.splitlines()  # one line, no traceback
    assert line.startswith("quorum serve: invalid settings: "), line
    assert all(part in line for part in expected), line
    assert "Traceback" not in done.stderr and "bind" not in done.stderr
