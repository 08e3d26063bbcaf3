"""The documented commands no page of their own runs: README's native-engine `quorum serve` and
docs/repository.md's `quorum validate`, run as written in a new shell without the virtual
environment on its PATH, from the repository root (tests/docs/commands.py)."""

from __future__ import annotations

from pathlib import Path

from tests.docs.commands import Command, checkout, commands, run, serving
from tests.helpers import ROOT, VARIANTS


def native_serve() -> Command:
    (found,) = [c for c in commands(ROOT / "README.md") if "--grpc-engine native" in c.text]
    return found


def validate() -> Command:
    (found,) = [c for c in commands(ROOT / "docs" / "repository.md") if "quorum validate" in c.text]
    return found


def documented() -> list[Command]:
    """The documented commands this module runs (tests/docs/test_every_command.py)."""
    return [native_serve(), validate()]


def test_readme_native_engine_line_serves_on_the_native_engine(tmp_path: Path) -> None:
    with serving(native_serve().text, checkout(tmp_path / "root"), tmp_path / "server.log") as server:
        assert "plaintext), native engine" in server.output(), server.output()
        assert server.stop() == 0


def test_repository_md_validate_line_checks_the_bundled_repository(tmp_path: Path) -> None:
    done = run(validate().text, checkout(tmp_path / "root"))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert sorted(line.split()[1] for line in lines[:-1]) == sorted([*VARIANTS, "digits", "digits_slo"]), lines
    assert all(line.split()[0] == "ok" for line in lines[:-1]), lines
    assert lines[-1] == f"{len(VARIANTS) + 2} models, 0 with something the server would refuse"
