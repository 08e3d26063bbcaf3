"""Fixtures shared by the protocol test modules: one real server per module (a module that
needs another repository overrides `server`), and clients on it.

Which gRPC engine a module runs on depends on its subject:
- Modules whose subject is the transport run on every engine (`--grpc-engines grpcio,native`,
  the default: both). They say `BOTH_ENGINES = True`: the engines themselves
  (test_grpc_engine), bad and hostile bytes on the wire (test_bad_input), shutdown and its
  drain (test_shutdown), workers sharing a port (test_workers), health and reflection, which
  each engine registers its own way (test_health_reflection). What a bug in an engine would
  break is there.
- Every other module's subject (a protocol's messages, reload, feedback, calibration, the
  ensemble contract, HTTP, tracing...) sits above the engine: it runs once, on the default
  engine (grpcio, or the first of `--grpc-engines`).
- TLS servers are grpcio whatever the engine (pygrpc-native has no TLS): a module of TLS
  servers says GRPCIO_ONLY.
`grpc_engine` is a module-scoped parameter, so a module of BOTH_ENGINES runs all its tests on
grpcio, then all on native, with one server per engine. A module-scoped fixture that starts a
server must take `grpc_engine` (so that it is started again for the next engine); `_same_engine`
fails a test whose server runs another engine than its id says.
"""

from __future__ import annotations

import grpc
import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.fixtures import module_server
from tests.server import RunningServer

ENGINES = ("grpcio", "native")  # as in tests/conftest.py
TLS_FIXTURES = {"tls_server", "mtls_server"}


def pytest_generate_tests(metafunc):
    if "grpc_engine" not in metafunc.fixturenames:
        return
    engines = [e for e in metafunc.config.getoption("--grpc-engines").split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise pytest.UsageError(f"--grpc-engines: unknown {sorted(unknown)}; choose from {ENGINES}")
    if TLS_FIXTURES & set(metafunc.fixturenames) or getattr(metafunc.module, "GRPCIO_ONLY", False):
        engines = ["grpcio"]  # the engine of every TLS server (a module of TLS servers says GRPCIO_ONLY)
    elif not getattr(metafunc.module, "BOTH_ENGINES", False):
        engines = engines[:1]  # the subject is above the transport: once, on the default engine
    metafunc.parametrize("grpc_engine", engines, scope="module", indirect=True)


@pytest.fixture(scope="module", autouse=True)
def grpc_engine(request):
    """The engine every server started in this module's tests runs (QUORUM_TEST_GRPC_ENGINE)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QUORUM_TEST_GRPC_ENGINE", request.param)
        yield request.param


@pytest.fixture(autouse=True)
def _same_engine(request, grpc_engine):
    for name in request.fixturenames:
        if name not in ("request", "_same_engine"):
            value = request.getfixturevalue(name)
            if isinstance(value, RunningServer):
                assert value.engine == grpc_engine, (
                    f"fixture {name!r} runs {value.engine}, not {grpc_engine}: it must take grpc_engine")


@pytest.fixture(scope="module")
def server(tmp_path_factory, request, grpc_engine):
    """A module may set SERVER_ARGS (e.g. tests/server.py EXPLICIT_CONTROL) for its server, and
    SERVER_REPOSITORY (tests/helpers.py MODELS, say) to serve another than the default."""
    with module_server(tmp_path_factory, request.module.__name__.rpartition(".")[2],
                       repository=getattr(request.module, "SERVER_REPOSITORY", None),
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
