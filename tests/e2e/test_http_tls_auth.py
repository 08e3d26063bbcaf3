"""The HTTP port under the gRPC port's security settings: the same certificate and key (TLS),
the same client CA (mTLS), the same bearer token (scheme in any case), health left open."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.certs import Pki, make_pki
from tests.e2e.fixtures import ENSEMBLE
from tests.server import running_server, wait_serving

TOKEN = "s3cret-http-token"
GRPCIO_ONLY = True  # TLS servers: grpcio serves TLS whatever the engine (tests/e2e/conftest.py)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, pki, grpc_engine):
    import grpc

    env = {"QUORUM_TLS_CERT": str(pki.server.cert), "QUORUM_TLS_KEY": str(pki.server.key),
           "QUORUM_TLS_CLIENT_CA": str(pki.ca.cert), "QUORUM_AUTH_TOKEN": TOKEN}
    key, chain = pki.client.read()
    credentials = grpc.ssl_channel_credentials(pki.ca.cert.read_bytes(), private_key=key, certificate_chain=chain)
    with running_server(tmp_path_factory.mktemp("http-tls"), env=env, wait=False) as s:
        wait_serving(s, channel_factory=lambda: grpc.secure_channel(s.address, credentials))
        yield s
        assert s.stop() == 0


@pytest.fixture(scope="module")
def grpc_labels(server, pki, test_split) -> list[str]:
    """What the gRPC port answers for the rows the HTTP tests send."""
    import tritonclient.grpc as grpcclient

    pixels = test_split[0][:2].astype(np.float32)
    client = grpcclient.InferenceServerClient(
        f"localhost:{server.grpc_port}", ssl=True, root_certificates=str(pki.ca.cert),
        private_key=str(pki.client.key), certificate_chain=str(pki.client.cert))
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    labels = client.infer(ENSEMBLE, [tensor], headers={"authorization": f"Bearer {TOKEN}"}).as_numpy("label")
    client.close()
    return [v.decode() for v in labels]


def _url(server, path: str) -> str:
    return f"https://localhost:{server.http_port}{path}"


def _body(pixels: np.ndarray) -> dict:
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(pixels.shape),
                        "data": pixels.ravel().tolist()}]}


def test_plaintext_and_unknown_clients_are_refused(server, pki):
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://localhost:{server.http_port}/v2/health/live", timeout=10)
    with pytest.raises((requests.exceptions.SSLError, requests.ConnectionError)):  # no client certificate
        requests.get(_url(server, "/v2/health/live"), verify=str(pki.ca.cert), timeout=10)
    with pytest.raises((requests.exceptions.SSLError, requests.ConnectionError)):  # signed by another CA
        requests.get(_url(server, "/v2/health/live"), verify=str(pki.ca.cert),
                     cert=(str(pki.stranger.cert), str(pki.stranger.key)), timeout=10)


def test_token_rules_are_the_grpc_ones(server, pki, test_split, grpc_labels):
    # verify= per call: requests lets REQUESTS_CA_BUNDLE win over a Session's verify.
    tls = {"verify": str(pki.ca.cert), "cert": (str(pki.client.cert), str(pki.client.key)), "timeout": 30}
    assert requests.get(_url(server, "/v2/health/ready"), **tls).json() == {"ready": True}  # open
    body = _body(test_split[0][:2].astype(np.float32))
    infer = _url(server, f"/v2/models/{ENSEMBLE}/infer")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        refused = requests.post(infer, json=body, headers=headers, **tls)
        assert refused.status_code == 401, refused.text
        assert refused.headers["WWW-Authenticate"] == "Bearer" and "bearer token" in refused.json()["error"]
    for scheme in ("Bearer", "bearer", "BEARER"):
        answer = requests.post(infer, json=body, headers={"Authorization": f"{scheme} {TOKEN}"}, **tls)
        assert answer.status_code == 200, answer.text
        assert [o["data"] for o in answer.json()["outputs"] if o["name"] == "label"] == [grpc_labels]
    tf = requests.post(_url(server, f"/v1/models/{ENSEMBLE}:predict"),
                      json={"instances": [body["inputs"][0]["data"][:64]]}, **tls)
    assert tf.status_code == 401


def test_tritonclient_http_over_mtls_with_the_token(server, pki, test_split, grpc_labels):
    pixels = test_split[0][:2].astype(np.float32)
    client = httpclient.InferenceServerClient(
        f"localhost:{server.http_port}", ssl=True,
        ssl_options={"ca_certs": str(pki.ca.cert), "certfile": str(pki.client.cert), "keyfile": str(pki.client.key)})
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    with pytest.raises(InferenceServerException, match="bearer token"):
        client.infer(ENSEMBLE, [tensor])
    result = client.infer(ENSEMBLE, [tensor], headers={"authorization": f"Bearer {TOKEN}"})
    assert [v.decode() for v in result.as_numpy("label")] == grpc_labels
    client.close()
