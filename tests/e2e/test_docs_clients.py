"""Every example of docs/clients.md, run as the page says against real servers: one plain
(`make serve`'s, on the bundled models) and, for the TLS section, the one the section starts
with the certificates its openssl commands make and the token `my-token`. Only the port
numbers are replaced; the output must be what the page shows. The README's `quorum predict`
lines and the runbook's grpcurl lines run here too, on the plain server (the runbook's `POD`
is its address, `MODEL` the digits ensemble).

Everything runs as a reader runs it: in a new shell without the virtual environment on its
PATH (tests/docs/commands.py fresh_shell), in the repository root as commands see it (a
folder of links to this checkout, so that the certificates land there); shell commands
through bash, Python examples saved as `example.py` and run with `.venv/bin/python
example.py`. Output lines compare with whitespace normalised, numbers to 4 significant
digits (batching can move the last float digits), and a line `...` standing for any number
of lines.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.docs.commands import Command, checkout, commands, run, serving
from tests.helpers import MODELS, ROOT
from tests.server import running_server

DOC = ROOT / "docs" / "clients.md"
README = ROOT / "README.md"
RUNBOOK = ROOT / "docs" / "runbook.md"
GRPCIO_ONLY = True  # the TLS section's server is grpcio, the default (pygrpc-native has no TLS)
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


def tls_setup() -> tuple[list[Command], Command]:
    """The TLS section's shell commands: making the certificates, then serving with them."""
    shell = [c for c in commands(DOC) if c.lang != "console"]
    serve = [c for c in shell if "quorum serve" in c.text]
    assert len(serve) == 1 and shell[-1] == serve[0], shell
    return shell[:-1], serve[0]


def readme_predicts() -> list[Command]:
    """README's quick start: `quorum predict` lines against `make serve`'s server."""
    found = [c for c in commands(README) if "quorum predict" in c.text]
    assert len(found) == 2, found
    return found


def runbook_commands() -> list[Command]:
    found = commands(RUNBOOK)
    assert found and all("POD:8500" in c.text for c in found), found
    return found


def documented() -> list[Command]:
    """The documented commands this module runs (tests/docs/test_every_command.py)."""
    certificates, serve = tls_setup()
    return [*(Command(str(DOC.relative_to(ROOT)), e.line, e.code, "console", e.expected)
              for e in examples() if e.kind == "console"),
            *certificates, serve, *readme_predicts(), *runbook_commands()]


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
def root(tmp_path_factory) -> Path:
    """The repository root where the reader runs the page's commands."""
    return checkout(tmp_path_factory.mktemp("docs-root"))


@pytest.fixture(scope="module")
def secure(tmp_path_factory, root, grpc_engine):
    """The TLS section as written: its openssl commands, then its `quorum serve` line."""
    certificates, serve = tls_setup()
    for command in certificates:
        done = run(command.text, root)
        assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
    ca = (root / "tls" / "ca.pem").read_bytes()

    def ready_channel(server):
        return grpc.secure_channel(f"localhost:{server.grpc_port}", grpc.ssl_channel_credentials(ca))

    with serving(serve.text, root, tmp_path_factory.mktemp("docs-tls") / "server.log",
                 ready_channel=ready_channel, engine=grpc_engine) as server:
        yield server
        server.stop()


def _ports(code: str, server) -> str:
    return code.replace("localhost:8500", f"localhost:{server.grpc_port}").replace(
        "localhost:8501", f"localhost:{server.http_port}")


@pytest.mark.parametrize("example", examples(), ids=lambda e: e.id)
def test_doc_example(example: Example, request, root):
    server = request.getfixturevalue("secure" if example.tls else "plain")
    code = _ports(example.code, server)
    if example.kind == "python":
        script = root / f"example_{example.line}.py"
        script.write_text(code)
        done = run(f".venv/bin/python {script.name}", root)
        assert done.returncode == 0, done.stderr[-3000:]
        actual = done.stdout.splitlines()
    else:
        done = run(code, root)
        actual = (done.stdout + done.stderr).splitlines()
    assert matches(example.expected.splitlines(), actual), (
        f"docs/clients.md line {example.line}: output differs; got:\n" + "\n".join(actual))


def test_the_tls_section_makes_the_certificates_it_serves_with(secure, root):
    """The certificate the TLS server presents is the one the section's openssl commands
    made, for localhost, signed by `tls/ca.pem` (the clients above trusted nothing else)."""
    import ssl

    pem = ssl.get_server_certificate(("localhost", secure.grpc_port), ca_certs=str(root / "tls" / "ca.pem"))
    assert pem.strip() == (root / "tls" / "server.pem").read_text().strip()


@pytest.mark.parametrize("command", readme_predicts(), ids=lambda c: c.text.split("#")[0][:40])
def test_readme_predict(command: Command, plain, root):
    """README's quick start, against `make serve`'s server (its address appended)."""
    done = run(f"{command.text.split('#')[0]} --address localhost:{plain.grpc_port}", root)
    assert done.returncode == 0, done.stderr
    vote, header, *members = [line for line in done.stdout.splitlines() if line.strip()]
    label = re.match(r"digits: (\S+)  confidence [\d.]+  agreement [\d.]+  policy stacked"
                     r"(?:  \(expected (\S+)\))?$", vote)
    assert label, done.stdout
    assert label.group(2) in (None, label.group(1)), vote  # --digits-index knows the true label
    assert header.split()[0] == "member" and len(members) == 5, done.stdout  # each member's vote
    if "--values" in command.text:
        assert vote.startswith("digits: 0 "), vote  # README: the row is a zero


@pytest.mark.parametrize("command", runbook_commands(), ids=lambda c: c.text[:60])
def test_runbook_command(command: Command, plain, root):
    done = run(command.text.replace("POD:8500", f"localhost:{plain.grpc_port}").replace("MODEL", "digits"), root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"status": "SERVING"' in done.stdout or '"name": "digits"' in done.stdout, done.stdout


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
