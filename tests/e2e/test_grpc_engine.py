"""What the gRPC engine itself must get right, on each engine (`grpc_engine`, tests/e2e/conftest.py):
the deadline reaches the handler, oversized requests (compressed too) are refused, bytes that are
not gRPC leave the server serving, and TLS never silently runs on the native engine.

The rest of the contract (every protocol, health Watch, reflection, bearer tokens, garbage
protobuf, SIGTERM drain, SO_REUSEPORT workers) is the rest of tests/e2e, which runs on both."""

from __future__ import annotations

import contextlib
import shutil
import socket
import time

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc

from service.api.engine import EngineUnavailable, resolve_engine
from tests.e2e.certs import make_pki
from tests.e2e.fixtures import ENSEMBLE, MEMBER, module_server
from tests.helpers import copy_variant, onnx_models
from tests.server import running_server

BOTH_ENGINES = True  # the subject is the transport (tests/e2e/conftest.py)

LIMIT = 1 << 20  # the server's max message size here
SERVING = health_pb2.HealthCheckResponse.SERVING
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """The test repository, and an ensemble `slow` of two copies of a member whose batches
    wait a minute to fill: only a deadline the server knows about ends a request to it early."""
    root = tmp_path_factory.mktemp("engine-repo") / "models"
    shutil.copytree(onnx_models(), root)
    for name in ("slow_a", "slow_b"):
        copy_variant(MEMBER, root, as_name=name)
    (root / "slow").mkdir()
    (root / "slow" / "ensemble.yaml").write_text(yaml.safe_dump({
        "members": ["slow_a", "slow_b"], "policy": "soft",
        "batching": {"max_batch_size": 64, "max_queue_delay_us": 60_000_000},
        "deadline_margin_ms": 8000}))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, repository, grpc_engine):
    with module_server(tmp_path_factory, "engine", repository=repository,
                       env={"QUORUM_MAX_MESSAGE_BYTES": str(LIMIT)}) as s:
        yield s


@pytest.fixture(scope="module")
def v2(channel):
    return service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _infer(model: str, rows: np.ndarray) -> service_pb2.ModelInferRequest:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="pixels", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.tobytes())
    return request


def _still_serving(server, v2, test_split) -> None:
    assert server.health() == SERVING
    response = v2.ModelInfer(_infer(MEMBER, test_split[0][:2]), timeout=30)
    assert response.model_name == MEMBER and response.outputs


def test_server_runs_the_engine_under_test(server, grpc_engine):
    assert f"{grpc_engine} engine, asyncio event loop" in server.output()
    # native's memory is not bounded by the message limit: said where it is chosen, at start
    warned = "the native gRPC engine reads and inflates each request whole before the 1048576-byte message limit"
    assert (warned in server.output()) == (grpc_engine == "native")


def test_uvloop_event_loop(tmp_path, grpc_engine, test_split):
    with running_server(tmp_path, args=["--event-loop", "uvloop"]) as other, other.channel() as channel:
        assert f"{grpc_engine} engine, uvloop event loop" in other.output()
        _still_serving(other, service_pb2_grpc.GRPCInferenceServiceStub(channel), test_split)
        assert other.stop() == 0


def test_deadline_reaches_the_handler(v2, test_split):
    """The ensemble waits for its members until deadline - margin (here 10 s - 8 s): the
    answer is the server's DEADLINE_EXCEEDED naming the members left out, not the client's
    own timer's (which would fire at 10 s with grpc's "Deadline Exceeded")."""
    with pytest.raises(grpc.RpcError) as err:
        v2.ModelInfer(_infer("slow", test_split[0][:1]), timeout=10)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
    assert "slow_a" in err.value.details() and "slow_b" in err.value.details(), err.value.details()


@pytest.mark.parametrize("compression", [grpc.Compression.NoCompression, grpc.Compression.Gzip])
def test_oversized_request_refused(server, v2, test_split, compression):
    """2 MiB against a 1 MiB limit; gzip sends it as a few kB that decompress past the limit.
    Uncompressed, the message names the limit (gzip's is grpcio's own: "Decompressed message
    larger than max"); a request that fits the limit is answered."""
    rows = np.zeros((LIMIT // 128, 64), dtype=np.float32)
    with pytest.raises(grpc.RpcError) as err:
        v2.ModelInfer(_infer(MEMBER, rows), timeout=60, compression=compression)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
    if compression == grpc.Compression.NoCompression:
        assert str(LIMIT) in err.value.details(), err.value.details()
    fits = rows[: LIMIT // 512]  # 512 kB of pixels
    response = v2.ModelInfer(_infer(ENSEMBLE, fits), timeout=60, compression=compression)
    assert list(next(o for o in response.outputs if o.name == "class_index").shape) == [len(fits)]
    _still_serving(server, v2, test_split)


@pytest.mark.parametrize("payload", [
    b"GET /v2/health/ready HTTP/1.1\r\nHost: quorum\r\n\r\n",
    np.random.default_rng(7).bytes(8192),
    PREFACE + b"\xff" * 64,  # the preface, then no valid frame
    PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # empty SETTINGS, then a HEADERS frame
    + b"\x00\x00\x08\x01\x05\x00\x00\x00\x01" + b"\xff" * 8,  # whose HPACK block is garbage
    PREFACE + b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x04\xff\xff\xff\xff",  # window > 2^31-1
], ids=["http1", "random", "preface-junk", "bad-hpack", "bad-settings"])
def test_bytes_that_are_not_grpc_leave_the_server_serving(server, v2, test_split, payload):
    # Whatever it answers, until it closes the connection (which it may do before reading it all).
    with socket.create_connection(("127.0.0.1", server.grpc_port), timeout=10) as raw, \
            contextlib.suppress(OSError):
        raw.sendall(payload)
        raw.shutdown(socket.SHUT_WR)
        while raw.recv(4096):
            pass
    _still_serving(server, v2, test_split)


def test_half_open_connections_do_not_block_others(server, v2, test_split):
    """Connections that send half a preface and then nothing do not hold the server up."""
    idle = [socket.create_connection(("127.0.0.1", server.grpc_port), timeout=10) for _ in range(50)]
    try:
        for s in idle:
            s.sendall(PREFACE[:10])
        _still_serving(server, v2, test_split)
    finally:
        for s in idle:
            s.close()


def test_native_engine_with_tls_refuses_to_start(tmp_path):
    pki = make_pki(tmp_path / "pki")
    env = {"QUORUM_TLS_CERT": str(pki.server.cert), "QUORUM_TLS_KEY": str(pki.server.key)}
    with running_server(tmp_path, env=env, wait=False, args=["--grpc-engine", "native"]) as server:
        end = time.monotonic() + 120
        while server.process.poll() is None and time.monotonic() < end:
            time.sleep(0.2)
        assert server.process.returncode not in (None, 0), server.output()[-2000:]
        assert "--grpc-engine native has no TLS" in server.output()
        assert "gRPC on port" not in server.output()


@pytest.mark.parametrize(("requested", "tls", "engine"), [
    (None, False, "grpcio"), ("grpcio", False, "grpcio"), ("native", False, "native"),
    (None, True, "grpcio"), ("grpcio", True, "grpcio")])
def test_resolve_engine(requested, tls, engine):
    assert resolve_engine(requested, tls) == engine


def test_resolve_engine_native_with_tls():
    with pytest.raises(EngineUnavailable, match="QUORUM_TLS_CERT"):
        resolve_engine("native", tls=True)
