"""The commands the documentation shows, and the shell the doc tests run them in.

A documented command is a line of a fenced code block tagged `bash`, `sh` or `shell` in
README.md, models/README.md or docs/*.md (a line ending in `\\` goes on on the next), or a
line after `$ ` in a block tagged `console` (the lines after it, up to the next `$ `, are its
output). Inline code (`quorum validate PATH`) names or sketches a command; what a reader is
meant to paste is fenced. An untagged block is a layout, a tree or an output: one whose line
starts with a command is an error (tests/docs/test_every_command.py), so it gets tagged.

The doc tests run documented commands in a fresh shell after the README's two set-up
commands (`make serve`, `make test`): `fresh_shell()` is this process's environment without
the virtual environment (no `.venv/bin` on PATH, no VIRTUAL_ENV or PYTHONPATH) and without
QUORUM_* settings, and `checkout()` is the repository root as a command sees it, in a folder
of the test's own (so that what a command writes, certificates or a repository, stays
there and not in the shared checkout).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import ROOT, free_ports
from tests.server import RunningServer, wait_serving

DOCS = (ROOT / "README.md", ROOT / "models" / "README.md", *sorted((ROOT / "docs").glob("*.md")))
SHELL_LANGS = ("bash", "sh", "shell")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
_VENV_BIN = (ROOT / ".venv" / "bin").resolve()


@dataclass(frozen=True)
class Command:
    doc: str
    """The page, relative to the repository root."""
    line: int
    text: str
    """As written, continuation lines joined."""
    lang: str = "bash"
    output: str = ""
    """What a `console` block shows after the command."""

    @property
    def key(self) -> tuple[str, str]:
        return self.doc, normalise(self.text)

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def normalise(command: str) -> str:
    """The command's words, comments and spacing left out: what two mentions share."""
    return shlex.join(shlex.split(command, comments=True))


def blocks(doc: Path) -> Iterator[tuple[str, int, str]]:
    """(language, line of the body's first line, body) of each fenced block of a page."""
    text = doc.read_text()
    for match in _FENCE.finditer(text):
        yield match.group(1), text.count("\n", 0, match.start()) + 2, match.group(2)


def commands(doc: Path) -> list[Command]:
    name = str(doc.relative_to(ROOT))
    found: list[Command] = []
    for lang, first, body in blocks(doc):
        if lang == "console":
            for match in re.finditer(r"^\$ (.*)\n((?:(?!\$ ).*\n)*)", body, re.MULTILINE):
                line = first + body.count("\n", 0, match.start())
                found.append(Command(name, line, match.group(1), lang, match.group(2)))
        elif lang in SHELL_LANGS:
            for match in re.finditer(r"^(?:.*\\\n)*.*\S.*$", body, re.MULTILINE):
                line = first + body.count("\n", 0, match.start())
                text = match.group(0).replace("\\\n", " ")
                if not text.lstrip().startswith("#"):
                    found.append(Command(name, line, text, lang))
    return found


def documented_commands() -> list[Command]:
    return [command for doc in DOCS for command in commands(doc)]


def fresh_shell() -> dict[str, str]:
    """The environment of a new shell: no virtual environment active, no QUORUM_* settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP") and not k.startswith("QUORUM_")}
    venvs = {_VENV_BIN, Path(sys.executable).parent.resolve(), Path(sys.prefix).resolve() / "bin"}
    env["PATH"] = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() not in venvs)
    return env


def checkout(folder: Path) -> Path:
    """`folder` made into the repository root as commands see it after the README's set-up:
    a link to each top-level entry git tracks (`models`, `service`, `Makefile`...) and to
    `.venv`, what `make serve` and `make test` add (their generated protobuf modules are in
    `service/`). Nothing else of this checkout: no leftovers of an earlier run (a `tls/`
    folder), and a command that makes a folder makes it here, not in the shared checkout."""
    folder.mkdir(parents=True, exist_ok=True)
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in sorted({path.split(b"/")[0].decode() for path in tracked.split(b"\0") if path} | {".venv"}):
        if (ROOT / name).exists() and not (folder / name).exists():
            (folder / name).symlink_to(ROOT / name)
    return folder


def run(command: str, cwd: Path, *, timeout: float = 300, shell_env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess:
    """`command` as a user types it into bash in `cwd`."""
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=shell_env or fresh_shell(),
                          capture_output=True, text=True, timeout=timeout)


@contextmanager
def serving(command: str, cwd: Path, log: Path, *, ready_channel=None, engine: str | None = None,
            shell_env: dict[str, str] | None = None) -> Iterator[RunningServer]:
    """A documented `quorum serve` command, run as written in bash with only the ports
    changed (`--grpc-port`, `--http-port` and `--metrics-port` appended: 8500-8502 may be
    taken on a shared machine), until it is SERVING."""
    grpc_port, http_port, metrics_port = free_ports(3)
    words = shlex.split(command, comments=True)
    assert any(w.endswith("quorum") for w in words) and "serve" in words, command
    line = f"{shlex.join(words)} --grpc-port {grpc_port} --http-port {http_port} --metrics-port {metrics_port}"
    with open(log, "wb") as out:  # bash runs a lone command in its own process (exec): signals reach the server
        process = subprocess.Popen(["bash", "-c", line], cwd=cwd, env=shell_env or fresh_shell(),
                                   stdout=out, stderr=subprocess.STDOUT)
    server = RunningServer(process, grpc_port, metrics_port, log, engine=engine, http_port=http_port)
    try:
        wait_serving(server, channel_factory=ready_channel and (lambda: ready_channel(server)))
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
