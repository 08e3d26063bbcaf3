"""Fixtures shared by the protocol test modules: one real server per module (a module that
needs another repository overrides `server`), and clients on it."""

from __future__ import annotations

import grpc
import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.fixtures import module_server


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    """A module may set SERVER_ARGS (e.g. ["--model-control", "explicit"]) for its server."""
    with module_server(tmp_path_factory, request.module.__name__.rpartition(".")[2],
                       args=getattr(request.module, "SERVER_ARGS", [])) as s:
        yield s


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.address)
    yield c
    c.close()
