"""Every example of docs/clients.md, run as the page shows it against real servers (one
plain, one with TLS and the token `my-token` for the TLS section), with only the port
numbers replaced; the output must be what the page shows.

Python blocks run with this checkout first on the path; console blocks run in bash with
the venv's tools (`grpcurl`, `quorum`) on PATH, `ca.pem` in the working directory. Output
lines compare with whitespace normalised, numbers to 4 significant digits (batching can
move the last float digits), and a line `...` standing for any number of lines.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.e2e.certs import make_pki
from tests.helpers import MODELS, ROOT
from tests.server import running_server, wait_serving

DOC = ROOT / "docs" / "clients.md"
TOKEN = "my-token"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
_NUMBER = re.compile(r"-?\d+\.\d+(?:[eE][-+]?\d+)?|-?\d+[eE][-+]?\d+")


@dataclass(frozen=True)
class Example:
    line: int
    tls: bool
    kind: str  # "python" or "console"
    code: str
    expected: str

    @property
    def id(self) -> str:
        first = self.code.strip().splitlines()[-1 if self.kind == "python" else 0][:50]
        return f"L{self.line}-{self.kind}-{first}"


def examples() -> list[Example]:
    text = DOC.read_text()
    tls_from = text.index("## TLS")
    found, blocks = [], list(_FENCE.finditer(text))
    for i, block in enumerate(blocks):
        lang, body = block.group(1), block.group(2)
        line, tls = text.count("\n", 0, block.start()) + 1, block.start() > tls_from
        if lang == "python":
            output = blocks[i + 1]
            assert output.group(1) == "" and text[block.end():output.start()].strip() == "", \
                f"docs/clients.md line {line}: a python example must be followed by its output block"
            found.append(Example(line, tls, "python", body, output.group(2)))
        elif lang == "console":
            for command, expected in re.findall(r"^\$ (.*)\n((?:(?!\$ ).*\n)*)", body, re.MULTILINE):
                found.append(Example(line, tls, "console", command, expected))
    return found


def _same_line(expected: str, actual: str) -> bool:
    e, a = " ".join(expected.split()), " ".join(actual.split())
    if _NUMBER.sub("#", e) != _NUMBER.sub("#", a):
        return False
    return all(math.isclose(float(x), float(y), rel_tol=1e-4, abs_tol=1e-6)
               for x, y in zip(_NUMBER.findall(e), _NUMBER.findall(a)))


def matches(expected: list[str], actual: list[str]) -> bool:
    """`expected` lines against `actual`, a line '...' matching any run of lines."""
    if not expected:
        return not actual
    if expected[0].strip() == "...":
        return any(matches(expected[1:], actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and _same_line(expected[0], actual[0]) and matches(expected[1:], actual[1:])


@pytest.fixture(scope="module")
def plain(tmp_path_factory, grpc_engine):
    with running_server(tmp_path_factory.mktemp("docs"), MODELS) as server:  # the page shows the bundled models
        yield server
        server.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("docs-pki"))


@pytest.fixture(scope="module")
def secure(tmp_path_factory, pki, grpc_engine):
    env = {"QUORUM_TLS_CERT": str(pki.server.cert), "QUORUM_TLS_KEY": str(pki.server.key),
           "QUORUM_AUTH_TOKEN": TOKEN}
    credentials = grpc.ssl_channel_credentials(pki.ca.cert.read_bytes())
    with running_server(tmp_path_factory.mktemp("docs-tls"), MODELS, env=env, wait=False) as server:
        wait_serving(server, channel_factory=lambda: grpc.secure_channel(f"localhost:{server.grpc_port}", credentials))
        yield server
        server.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, pki) -> Path:
    folder = tmp_path_factory.mktemp("docs-cwd")
    shutil.copy(pki.ca.cert, folder / "ca.pem")
    return folder


@pytest.mark.parametrize("example", examples(), ids=lambda e: e.id)
def test_doc_example(example: Example, request, workdir):
    server = request.getfixturevalue("secure" if example.tls else "plain")
    code = example.code.replace("localhost:8500", f"localhost:{server.grpc_port}").replace(
        "localhost:8501", f"localhost:{server.http_port}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-c", code] if example.kind == "python" else ["bash", "-c", code]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    actual = (done.stdout + (done.stderr if example.kind == "console" else "")).splitlines()
    if example.kind == "python":
        assert done.returncode == 0, done.stderr[-3000:]
    assert matches(example.expected.splitlines(), actual), (
        f"docs/clients.md line {example.line}: output differs; got:\n" + "\n".join(actual))


def test_the_page_has_an_example_of_every_client():
    kinds = {(e.kind, word) for e in examples() for word in ("tritonclient.grpc", "tritonclient.http",
                                                              "tensorflow_serving", "requests", "curl",
                                                              "grpcurl", "quorum predict") if word in e.code}
    assert {word for _, word in kinds} == {"tritonclient.grpc", "tritonclient.http", "tensorflow_serving",
                                           "requests", "curl", "grpcurl", "quorum predict"}
    assert "18500" not in DOC.read_text()


@pytest.mark.parametrize("expected, actual, same", [
    (["a 1.00001", "..."], ["a 1.0", "b", "c"], True),
    (["a 1.1"], ["a 1.0"], False),
    (["x", "...", "z"], ["x", "z"], True),
    (["x"], ["x", "y"], False),
])
def test_output_matching(expected, actual, same):
    assert matches(expected, actual) is same
