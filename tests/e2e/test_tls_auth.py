"""Transport security and authentication of the real server: TLS, mutual TLS and bearer
tokens, with certificates made for the test (tests/e2e/certs.py) and real clients: grpc
stubs of quorum.v1 and TF Serving, and tritonclient.grpc."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import numpy as np
import pytest
import tensorflow as tf
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from tests.e2e.certs import Pki, make_pki
from tests.e2e.fixtures import Reference
from tests.helpers import ROOT
from tests.server import RunningServer, running_server, wait_serving

TOKEN = "s3cret-token-for-tests"
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _request(pixels: np.ndarray) -> pb.PredictRequest:
    rows = np.ascontiguousarray(pixels, dtype=np.float32).reshape(-1, 64)
    return pb.PredictRequest(model="digits", inputs=pb.Tensor(dtype="FP32", shape=list(rows.shape),
                                                              content=rows.tobytes()))


def _predict(channel: grpc.Channel, pixels: np.ndarray, **kwargs) -> list[str]:
    response = pb_grpc.EnsembleServiceStub(channel).Predict(_request(pixels), timeout=10, **kwargs)
    return [p.label for p in response.predictions]


def _tls(pki: Pki, client: bool = False, stranger: bool = False) -> grpc.ChannelCredentials:
    key, chain = (pki.client.read() if client else pki.stranger.read() if stranger else (None, None))
    return grpc.ssl_channel_credentials(pki.ca.cert.read_bytes(), private_key=key, certificate_chain=chain)


def _start(tmp_path_factory, name: str, env: dict[str, str], credentials=None):
    """running_server, waiting for SERVING over the right kind of channel."""
    factory = (lambda: grpc.secure_channel(server.address, credentials)) if credentials else None
    with running_server(tmp_path_factory.mktemp(name), env=env, wait=False) as server:
        wait_serving(server, channel_factory=factory)
        yield server
        assert server.stop() == 0


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, pki):
    env = {"QUORUM_TLS_CERT": str(pki.server.cert), "QUORUM_TLS_KEY": str(pki.server.key)}
    yield from _start(tmp_path_factory, "tls", env, _tls(pki))


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, pki):
    env = {"QUORUM_TLS_CERT": str(pki.server.cert), "QUORUM_TLS_KEY": str(pki.server.key),
           "QUORUM_TLS_CLIENT_CA": str(pki.ca.cert)}
    yield from _start(tmp_path_factory, "mtls", env, _tls(pki, client=True))


@pytest.fixture(scope="module", params=["env", "file"])
def token_server(request, tmp_path_factory, grpc_engine):
    if request.param == "env":
        env = {"QUORUM_AUTH_TOKEN": TOKEN}
    else:
        path = tmp_path_factory.mktemp("secret") / "token"
        path.write_text(TOKEN + "\n")  # as a mounted Kubernetes secret often ends
        env = {"QUORUM_AUTH_TOKEN_FILE": str(path), "QUORUM_AUTH_TOKEN": "not-this-one"}
    yield from _start(tmp_path_factory, f"token-{request.param}", env)


# -- TLS ---------------------------------------------------------------------------------------
def test_tls_client_with_the_ca_infers(tls_server: RunningServer, pki, test_split):
    x, y = test_split
    with grpc.secure_channel(tls_server.address, _tls(pki)) as channel:
        labels = _predict(channel, x[:8])
    assert np.mean([a == str(b) for a, b in zip(labels, y[:8])]) >= 0.75
    assert "gRPC on port" in tls_server.output() and "(TLS)" in tls_server.output()


def test_tls_by_hostname_and_with_tf_serving_stub(tls_server: RunningServer, pki, test_split):
    x, _ = test_split
    with grpc.secure_channel(f"localhost:{tls_server.grpc_port}", _tls(pki)) as channel:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "digits"
        request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(x[:2]))
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
    assert tf.make_ndarray(response.outputs["class_index"]).shape == (2,)


def test_tls_tritonclient(tls_server: RunningServer, pki, test_split):
    x, _ = test_split
    client = grpcclient.InferenceServerClient(tls_server.address, ssl=True, root_certificates=str(pki.ca.cert))
    try:
        assert client.is_server_ready()
        pixels = grpcclient.InferInput("pixels", [2, 64], "FP32")
        pixels.set_data_from_numpy(x[:2])
        assert client.infer("digits", [pixels]).as_numpy("class_index").shape == (2,)
    finally:
        client.close()


def test_tls_refuses_plaintext_and_unknown_ca(tls_server: RunningServer, pki, test_split):
    x, _ = test_split
    with grpc.insecure_channel(tls_server.address) as channel, pytest.raises(grpc.RpcError) as plain:
        _predict(channel, x[:1])
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    # A client that trusts only another CA does not accept the server's certificate.
    other = grpc.ssl_channel_credentials(pki.stranger.cert.read_bytes())
    with grpc.secure_channel(tls_server.address, other) as channel, pytest.raises(grpc.RpcError) as untrusted:
        _predict(channel, x[:1])
    assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE


# -- mutual TLS --------------------------------------------------------------------------------
def test_mtls_accepts_a_client_certificate_signed_by_the_ca(mtls_server: RunningServer, pki, test_split):
    x, _ = test_split
    with grpc.secure_channel(mtls_server.address, _tls(pki, client=True)) as channel:
        assert len(_predict(channel, x[:3])) == 3


def test_mtls_rejects_clients_without_a_trusted_certificate(mtls_server: RunningServer, pki, test_split):
    x, _ = test_split
    for credentials in (_tls(pki), _tls(pki, stranger=True)):
        with grpc.secure_channel(mtls_server.address, credentials) as channel, \
                pytest.raises(grpc.RpcError) as refused:
            _predict(channel, x[:1])
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(mtls_server.address) as channel, pytest.raises(grpc.RpcError) as plain:
        _predict(channel, x[:1])
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_tritonclient(mtls_server: RunningServer, pki, test_split):
    x, _ = test_split
    client = grpcclient.InferenceServerClient(
        mtls_server.address, ssl=True, root_certificates=str(pki.ca.cert),
        private_key=str(pki.client.key), certificate_chain=str(pki.client.cert))
    try:
        pixels = grpcclient.InferInput("pixels", [1, 64], "FP32")
        pixels.set_data_from_numpy(x[:1])
        assert client.infer("digits", [pixels]).as_numpy("label").shape == (1,)
    finally:
        client.close()
    anonymous = grpcclient.InferenceServerClient(mtls_server.address, ssl=True,
                                                 root_certificates=str(pki.ca.cert))
    try:
        with pytest.raises(InferenceServerException):
            anonymous.is_server_ready()
    finally:
        anonymous.close()


# -- bearer tokens -----------------------------------------------------------------------------
@pytest.mark.parametrize("metadata", [None, [("authorization", "Bearer wrong")],
                                      [("authorization", TOKEN)], [("authorization", f"Basic {TOKEN}")]],
                         ids=["none", "wrong-token", "no-scheme", "basic"])
def test_token_required(token_server: RunningServer, test_split, metadata):
    x, _ = test_split
    with grpc.insecure_channel(token_server.address) as channel, pytest.raises(grpc.RpcError) as denied:
        _predict(channel, x[:1], metadata=metadata)
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert denied.value.details() == "missing or invalid bearer token in 'authorization' metadata"


def test_token_accepted_by_every_protocol(token_server: RunningServer, test_split):
    x, _ = test_split
    bearer = [("authorization", f"Bearer {TOKEN}")]
    with grpc.insecure_channel(token_server.address) as channel:
        assert len(_predict(channel, x[:2], metadata=bearer)) == 2
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "digits"
        request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(x[:2]))
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=10, metadata=bearer)
        assert tf.make_ndarray(response.outputs["label"]).shape == (2,)
        with pytest.raises(grpc.RpcError) as denied:
            stub.Predict(request, timeout=10)
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    client = grpcclient.InferenceServerClient(token_server.address)
    try:
        headers = {"authorization": f"Bearer {TOKEN}"}
        assert client.is_server_ready(headers=headers)
        pixels = grpcclient.InferInput("pixels", [2, 64], "FP32")
        pixels.set_data_from_numpy(x[:2])
        assert client.infer("digits", [pixels], headers=headers).as_numpy("label").shape == (2,)
        with pytest.raises(InferenceServerException, match="bearer token"):
            client.infer("digits", [pixels])
    finally:
        client.close()


def test_health_and_reflection_need_no_token(token_server: RunningServer):
    assert token_server.health() == SERVING
    assert token_server.health("quorum.v1.EnsembleService") == SERVING
    with grpc.insecure_channel(token_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"quorum.v1.EnsembleService", "inference.GRPCInferenceService",
            "tensorflow.serving.PredictionService", "grpc.health.v1.Health"} <= names


# -- `quorum predict` with TLS, mTLS and a token -----------------------------------------------
def _quorum_predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", "predict", "--digits-index", "7", "--json", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_predict_cli_over_mtls(mtls_server: RunningServer, pki):
    address = f"localhost:{mtls_server.grpc_port}"
    done = _quorum_predict("--address", address, "--ca", str(pki.ca.cert),
                           "--cert", str(pki.client.cert), "--key", str(pki.client.key))
    assert done.returncode == 0, done.stderr
    assert [v["member"] for v in json.loads(done.stdout)["member_votes"]] == Reference().ensemble_config()["members"]
    refused = _quorum_predict("--address", address, "--ca", str(pki.ca.cert))
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr


def test_predict_cli_with_token(token_server: RunningServer):
    done = _quorum_predict("--address", token_server.address, "--token", TOKEN)
    assert done.returncode == 0, done.stderr
    refused = _quorum_predict("--address", token_server.address)
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("quorum predict: UNAUTHENTICATED: "
                                      "missing or invalid bearer token in 'authorization' metadata")


# -- fail closed: settings that would weaken security refuse to start --------------------------
def _serve_refused(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in __import__("os").environ.items() if not k.startswith("QUORUM_")}
    return subprocess.run([sys.executable, "-m", "service.cli", "serve", "--grpc-port", "0", "--metrics-port", "0"],
                          cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["empty-token", "blank-token", "empty-token-file", "missing-token-file",
                                  "cert-without-key", "key-without-cert", "client-ca-without-cert",
                                  "explicit-control-without-token"])
def test_weakening_settings_refuse_to_start(tmp_path, pki, case):
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    env, setting = {
        "empty-token": ({"QUORUM_AUTH_TOKEN": ""}, "auth_token"),
        "blank-token": ({"QUORUM_AUTH_TOKEN": "  "}, "auth_token"),
        "empty-token-file": ({"QUORUM_AUTH_TOKEN_FILE": str(empty)}, "auth_token_file"),
        "missing-token-file": ({"QUORUM_AUTH_TOKEN_FILE": str(tmp_path / "absent")}, "auth_token_file"),
        "cert-without-key": ({"QUORUM_TLS_CERT": str(pki.server.cert)}, "tls_cert"),
        "key-without-cert": ({"QUORUM_TLS_KEY": str(pki.server.key)}, "tls_key"),
        "client-ca-without-cert": ({"QUORUM_TLS_CLIENT_CA": str(pki.ca.cert)}, "tls_client_ca"),
        "explicit-control-without-token": ({"QUORUM_MODEL_CONTROL": "explicit"}, "model_control"),
    }[case]
    done = _serve_refused(env)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = [ln for ln in done.stderr.splitlines() if ln.startswith("quorum serve:")]
    assert setting in line, line
    assert "gRPC on port" not in done.stderr + done.stdout  # it never served


# -- the bearer scheme is case-insensitive; several authorization entries are refused ------------
@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_bearer_scheme_any_case(token_server: RunningServer, test_split, scheme):
    x, _ = test_split
    with grpc.insecure_channel(token_server.address) as channel:
        assert len(_predict(channel, x[:1], metadata=[("authorization", f"{scheme} {TOKEN}")])) == 1


def test_several_authorization_entries_refused(token_server: RunningServer, test_split):
    x, _ = test_split
    with grpc.insecure_channel(token_server.address) as channel:
        for entries in ([("authorization", "Bearer wrong"), ("authorization", f"Bearer {TOKEN}")],
                        [("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")]):
            with pytest.raises(grpc.RpcError) as denied:
                _predict(channel, x[:1], metadata=entries)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
