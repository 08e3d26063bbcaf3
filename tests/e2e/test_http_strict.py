"""The HTTP front is as strict as the gRPC one, on a real server with a bearer token and
short HTTP timeouts (set through their QUORUM_* variables), while a gRPC client beside it
sees nothing but right answers:
- JSON nested deeper than 400 levels is a 400 naming the limit, on KServe v2 infer and TF
  Serving's predict and classify (not a 500 RecursionError);
- several `Authorization` headers are a 401 naming the problem, as gRPC refuses several
  `authorization` entries;
- a connection that never finishes its request line and headers is closed, and a body that
  never finishes arriving is answered 408 and its connection closed.
Requests are sent with `requests`, `http.client` (two headers of one name) and raw sockets
(half a request)."""

from __future__ import annotations

import http.client
import json
import socket

import numpy as np
import pytest
import requests

from tests.e2e.fixtures import ENSEMBLE, MEMBER, Reference, module_server
from tests.e2e.traffic import GoodClient

TOKEN = "strict-http-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT_S = 1  # the server's header and body timeouts here (seconds)
WAIT_S = 60  # how long a socket read may block before the test gives up: a failure, not a timing


@pytest.fixture(scope="module")
def server(tmp_path_factory, grpc_engine):
    env = {"QUORUM_AUTH_TOKEN": TOKEN, "QUORUM_HTTP_HEADER_TIMEOUT": str(TIMEOUT_S),
           "QUORUM_HTTP_BODY_TIMEOUT": str(TIMEOUT_S)}
    with module_server(tmp_path_factory, "http-strict", env=env) as s:
        yield s


@pytest.fixture(scope="module")
def pixels(test_split):
    return np.ascontiguousarray(test_split[0][:8])


@pytest.fixture(scope="module")
def good_client(server, pixels):
    thread = GoodClient(server.address, pixels, Reference().vote(ENSEMBLE, pixels).label_index, token=TOKEN)
    thread.start()
    yield thread
    thread.finish()


@pytest.fixture(autouse=True)
def _beside_good_client(good_client):
    """Every test here runs while the good gRPC client is sending requests."""
    assert good_client.is_alive()
    yield
    assert good_client.failures == []


def _v2_infer(server, body: bytes | str, model: str = ENSEMBLE) -> requests.Response:
    return requests.post(f"{server.http_url}/v2/models/{model}/infer", data=body, timeout=WAIT_S,
                         headers={**AUTH, "Content-Type": "application/json"})


def _tf(server, verb: str, body: bytes | str, model: str = ENSEMBLE) -> requests.Response:
    return requests.post(f"{server.http_url}/v1/models/{model}:{verb}", data=body, timeout=WAIT_S,
                         headers={**AUTH, "Content-Type": "application/json"})


def _nested(levels: int) -> str:
    """`levels` arrays, one inside the other."""
    return "[" * levels + "]" * levels


# -- nesting depth -----------------------------------------------------------------------------
DEEP_BODIES = {
    # (route, body): the body nests 401 levels (the object counts as one), or 100,000
    "v2-infer-401": ("v2", '{"inputs": ' + _nested(400) + "}"),
    "v2-infer-100000": ("v2", '{"inputs": ' + _nested(100_000) + "}"),
    "v2-infer-in-a-tensor": ("v2", '{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1], '
                                   '"data": ' + _nested(399) + "}]}"),
    "tf-predict-401": ("predict", '{"instances": ' + _nested(400) + "}"),
    "tf-predict-100000": ("predict", '{"instances": ' + _nested(100_000) + "}"),
    "tf-classify-100000": ("classify", '{"examples": ' + _nested(100_000) + "}"),
}


@pytest.mark.parametrize("case", sorted(DEEP_BODIES))
def test_json_nested_deeper_than_400_levels_is_a_400_naming_the_limit(server, case):
    route, body = DEEP_BODIES[case]
    answer = _v2_infer(server, body) if route == "v2" else _tf(server, route, body)
    assert answer.status_code == 400, answer.text[:500]
    assert answer.json()["error"] == "request body nests arrays and objects deeper than the limit of 400 levels"


@pytest.mark.parametrize("route, field", [("v2", "inputs"), ("predict", "instances"), ("predict", "inputs"),
                                          ("classify", "examples"), ("classify", "context"), ("regress", "examples")])
def test_json_nested_400_levels_is_parsed_and_refused_for_its_content_not_its_depth(server, route, field):
    body = '{"' + field + '": ' + _nested(399) + "}"  # exactly 400 levels
    answer = _v2_infer(server, body) if route == "v2" else _tf(server, route, body)
    assert answer.status_code == 400, answer.text[:500]
    assert "400 levels" not in answer.json()["error"] and "internal" not in answer.json()["error"].lower()


def test_brackets_inside_strings_are_not_nesting(server, pixels):
    request_id = "[" * 5000 + '\\"{' * 5000 + "]"  # echoed back by v2 infer, brackets and escaped quotes
    body = json.dumps({"id": request_id, "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 64],
                                                     "data": pixels[:2].ravel().tolist()}]})
    answer = _v2_infer(server, body, model=MEMBER)
    assert answer.status_code == 200, answer.text[:500]
    assert answer.json()["id"] == request_id


def test_a_well_formed_request_still_answers_beside_the_refusals(server, pixels):
    body = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 64],
                                   "data": pixels[:2].ravel().tolist()}]})
    answer = _v2_infer(server, body, model=MEMBER)
    assert answer.status_code == 200, answer.text[:500]
    assert [o["name"] for o in answer.json()["outputs"]]


# -- several Authorization headers -------------------------------------------------------------
def _with_headers(server, headers: list[tuple[str, str]]) -> tuple[int, dict, dict[str, str]]:
    """GET the model's metadata sending exactly these headers (several of one name allowed)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=WAIT_S)
    try:
        connection.putrequest("GET", f"/v2/models/{MEMBER}")
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read()), dict(response.getheaders())
    finally:
        connection.close()


@pytest.mark.parametrize("values", [[f"Bearer {TOKEN}", f"Bearer {TOKEN}"], ["Bearer wrong", f"Bearer {TOKEN}"],
                                    [f"Bearer {TOKEN}", "Bearer wrong"], [f"Bearer {TOKEN}"] * 3],
                         ids=["same-twice", "wrong-first", "wrong-last", "three"])
def test_several_authorization_headers_are_refused(server, values):
    status, body, headers = _with_headers(server, [("Authorization", v) for v in values])
    assert status == 401
    assert body["error"] == f"{len(values)} 'Authorization' headers: send exactly one bearer token"
    assert body["code"] == "UNAUTHENTICATED" and headers["WWW-Authenticate"] == "Bearer"


def test_one_authorization_header_is_accepted_and_none_is_refused(server):
    status, body, _ = _with_headers(server, [("Authorization", f"Bearer {TOKEN}")])
    assert status == 200 and body["name"] == MEMBER
    status, body, _ = _with_headers(server, [])
    assert status == 401 and body["error"] == "missing or invalid bearer token in the 'Authorization' header"


# -- header and body timeouts ------------------------------------------------------------------
def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=WAIT_S)
    sock.settimeout(WAIT_S)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


HALF_SENT = {
    "nothing": b"",
    "half-a-request-line": b"POST /v2/models/digits/inf",
    "request-line-only": b"POST /v2/models/digits/infer HTTP/1.1\r\n",
    "half-the-headers": b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bea",
}


@pytest.mark.parametrize("case", sorted(HALF_SENT))
def test_a_request_whose_headers_never_finish_is_closed(server, case):
    sock = _connect(server)
    try:
        sock.sendall(HALF_SENT[case])
        assert _read_until_closed(sock) == b""  # closed, without an answer
    finally:
        sock.close()


def test_many_half_sent_requests_are_all_closed_and_others_still_served(server):
    socks = [_connect(server) for _ in range(50)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(HALF_SENT["half-the-headers"] if i % 2 else HALF_SENT["request-line-only"])
        assert [_read_until_closed(sock) for sock in socks] == [b""] * len(socks)
    finally:
        for sock in socks:
            sock.close()
    status, body, _ = _with_headers(server, [("Authorization", f"Bearer {TOKEN}")])
    assert status == 200 and body["name"] == MEMBER


def _response(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_that_never_finishes_is_answered_408_and_closed(server, framing):
    sock = _connect(server)
    try:
        head = (f"POST /v2/models/{ENSEMBLE}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n")
        if framing == "content-length":
            sock.sendall((head + "Content-Length: 1000\r\n\r\n").encode() + b'{"inputs": [')
        else:
            sock.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b'c\r\n{"inputs": [\r\n')
        status, headers, body = _response(_read_until_closed(sock))
    finally:
        sock.close()
    assert status == 408
    assert body["error"] == f"request body not received in full within {TIMEOUT_S} s (http_body_timeout_s)"
    assert headers["connection"] == "close"
