"""Bad remote members (issue 39): an endpoint that does not resolve or answer, a model it does not
serve, a server with no manifest to give, a token or TLS it refuses, a member listed twice, a
name this repository already has. Each such ensemble is not ready, says why in one line naming
the member, the endpoint and the cause, retries by itself, and the rest of the repository serves.
Real servers on loopback, tritonclient and grpc.health.v1."""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2
from tritonclient.utils import InferenceServerException

from tests.e2e.certs import make_pki
from tests.e2e.fixtures import module_server
from tests.e2e.remote_servers import infer, remote, repository, server_on
from tests.helpers import free_port, wait_until
from tests.server import EXPLICIT_CONTROL, running_server, wait_serving

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
TOKEN = "the-right-token"
GRPCIO_ONLY = True  # a TLS server is grpcio whatever the engine (tests/e2e/conftest.py)


@pytest.fixture(scope="module")
def b(tmp_path_factory, grpc_engine):
    repo = repository(tmp_path_factory.mktemp("repo-b") / "models",
                      {"digits_mlp_a": "digits_mlp_a", "digits_cnn_a": "digits_cnn_a"})
    with module_server(tmp_path_factory, "server-b", repository=repo) as server:
        yield server


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, grpc_engine):
    """A server that asks for a bearer token."""
    repo = repository(tmp_path_factory.mktemp("repo-t") / "models", {
        "digits_logreg_guarded": "digits_logreg", "digits_logreg_guarded_ok": "digits_logreg"})
    with module_server(tmp_path_factory, "server-t", repository=repo, env={"QUORUM_AUTH_TOKEN": TOKEN}) as server:
        yield server


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, grpc_engine):
    """A server that speaks TLS only, with a certificate for 127.0.0.1 from a CA of the test's own."""
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    repo = repository(tmp_path_factory.mktemp("repo-tls") / "models", {"digits_logreg_tls": "digits_logreg"})
    env = {"QUORUM_TLS_CERT": str(pki.server.cert), "QUORUM_TLS_KEY": str(pki.server.key)}
    with running_server(tmp_path_factory.mktemp("server-tls"), repo, wait=False, env=env) as server:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert.read_bytes())
        wait_serving(server, channel_factory=lambda: grpc.secure_channel(server.address, credentials))
        yield server, pki.ca.cert


@pytest.fixture(scope="module")
def bare():
    """A gRPC server that serves nothing at all (UNIMPLEMENTED for every method)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture(scope="module")
def later_port():
    """Where nothing answers when server C starts (nor ever in this module)."""
    return free_port()


@pytest.fixture(scope="module")
def comes_later_port():
    """Where nothing answers when server C starts, and a server comes later."""
    return free_port()


@pytest.fixture(scope="module")
def c(tmp_path_factory, grpc_engine, b, guarded, tls_server, bare, later_port, comes_later_port):
    good = remote("digits_mlp_a", b.address)

    def pair(member: dict) -> dict:
        return {"members": [good, member]}  # quorum 2: the bad member leaves it short

    root = tmp_path_factory.mktemp("repo-c") / "models"
    repo = repository(root, {"local_logreg": "digits_logreg"}, ensembles={
        "unresolvable": pair(remote("far_away", "no-such-host.invalid:8500")),
        "unanswering": pair(remote("digits_logreg", f"127.0.0.1:{later_port}")),
        "comes_later": pair(remote("digits_logreg_later", f"127.0.0.1:{comes_later_port}")),
        "missing_model": pair(remote("no_such_model", b.address)),
        "no_manifest": pair(remote("bare_model", bare)),
        "wrong_token": pair(remote("digits_logreg_guarded", guarded.address, token_file="token")),
        "tls_mismatch": pair(remote("digits_cnn_a", b.address, tls=True)),
        "twice": {"members": [good, remote("digits_mlp_a", guarded.address)]},
        "clash": pair(remote("local_logreg", b.address)),
        "token_ok": pair(remote("digits_logreg_guarded_ok", guarded.address, token_file="token")),
        "tls_ok": pair(remote("digits_logreg_tls", tls_server[0].address, tls=True, ca_file=str(tls_server[1]))),
    })
    (repo / "wrong_token" / "token").write_text("not-the-token\n")
    (repo / "token_ok" / "token").write_text(TOKEN + "\n")
    with module_server(tmp_path_factory, "server-c", repository=repo, args=EXPLICIT_CONTROL) as server:
        yield server


CAUSES = {
    "unresolvable": ("far_away", "no-such-host.invalid:8500", "it does not answer (UNAVAILABLE"),
    "unanswering": ("digits_logreg", None, "it does not answer (UNAVAILABLE"),
    "missing_model": ("no_such_model", "b", "it serves no model 'no_such_model' (NOT_FOUND"),
    "no_manifest": ("bare_model", "bare", "its manifest cannot be had: it serves no quorum.v1 GetManifest"),
    "wrong_token": ("digits_logreg_guarded", "guarded", "it refuses this server's credentials (UNAUTHENTICATED"),
    "tls_mismatch": ("digits_cnn_a", "b", "it does not answer (UNAVAILABLE"),
    "clash": ("local_logreg", "b", "this repository has a model 'local_logreg' of its own"),
}


@pytest.mark.parametrize("ensemble", sorted(CAUSES))
def test_a_bad_remote_member_leaves_its_ensemble_not_ready_saying_why_in_one_line(
        ensemble, c, b, guarded, bare, later_port, test_split):
    member, where, cause = CAUSES[ensemble]
    endpoint = {"b": b.address, "guarded": guarded.address, "bare": bare, None: f"127.0.0.1:{later_port}"}.get(
        where, where)
    assert c.health(ensemble) == NOT_SERVING and c.health() == SERVING
    with grpcclient.InferenceServerClient(c.address) as client, pytest.raises(InferenceServerException) as err:
        infer(client, ensemble, test_split[0][:2].astype(np.float32))
    message = err.value.message()
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    assert f"member '{member}'" in message and f"at {endpoint}" in message and cause in message, message
    assert "\n" not in message
    log = c.output().splitlines()
    said = [line for line in log if member in line and endpoint in line and cause in line]
    assert said, f"no log line names {member}, {endpoint} and the cause"
    # logged once, though the watch retries all along (each repeat only counted)
    first = said[0].split(" ", 3)[3]
    assert sum(first in line for line in log) == 1


def test_a_member_listed_twice_is_named_with_both_endpoints(c, b, guarded, test_split):
    assert c.health("twice") == NOT_SERVING
    with grpcclient.InferenceServerClient(c.address) as client, pytest.raises(InferenceServerException) as err:
        infer(client, "twice", test_split[0][:2].astype(np.float32))
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    assert (f"member 'digits_mlp_a' is listed twice (at {b.address} and at {guarded.address})"
            in err.value.message())
    assert sum("member 'digits_mlp_a' is listed twice" in line for line in c.output().splitlines()) == 1


@pytest.mark.parametrize("ensemble", ["token_ok", "tls_ok"])
def test_the_right_token_and_tls_serve(ensemble, c, test_split):
    assert c.health(ensemble) == SERVING
    with grpcclient.InferenceServerClient(c.address) as client:
        answer = infer(client, ensemble, test_split[0][:2].astype(np.float32))
    assert "members_left_out" not in answer.get_response().parameters


def test_a_remote_member_is_unloaded_on_its_own_server_not_here(c, b):
    with grpcclient.InferenceServerClient(c.address) as client, pytest.raises(InferenceServerException) as err:
        client.unload_model("digits_mlp_a")
    assert err.value.status() == "StatusCode.FAILED_PRECONDITION"
    assert f"model 'digits_mlp_a' is a member served at {b.address}: unload it on that server" in err.value.message()
    assert c.health("token_ok") == SERVING


def test_the_rest_of_the_repository_serves(c, test_split):
    pixels = test_split[0][:4].astype(np.float32)
    with grpcclient.InferenceServerClient(c.address) as client:
        assert infer(client, "local_logreg", pixels).as_numpy("class_index").shape == (4,)
        assert infer(client, "digits_mlp_a", pixels).as_numpy("class_index").shape == (4,)  # a remote member, alone
    assert c.health() == SERVING and c.health("local_logreg") == SERVING


def test_an_endpoint_that_comes_up_later_is_retried_by_itself(tmp_path, c, comes_later_port, test_split):
    assert c.health("comes_later") == NOT_SERVING
    repo = repository(tmp_path / "models", {"digits_logreg_later": "digits_logreg"})
    with server_on(tmp_path, repo, comes_later_port):
        wait_until(lambda: c.health("comes_later") == SERVING, "ready once its endpoint answers", timeout=60)
        with grpcclient.InferenceServerClient(c.address) as client:
            answer = infer(client, "comes_later", test_split[0][:2].astype(np.float32))
        assert "members_left_out" not in answer.get_response().parameters
    assert f"remote member digits_logreg_later at 127.0.0.1:{comes_later_port}: serving version 1" in c.output()
