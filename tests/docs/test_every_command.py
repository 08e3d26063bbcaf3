"""Every command the documentation shows (tests/docs/commands.py: the fenced shell and console
blocks of README.md, models/README.md and docs/*.md) runs as written from a new shell after
the README's two set-up commands, `make serve` and `make test`: each is run so by a doc test
(RUNNERS: each module's `documented()` lists the commands it runs, from the same pages, and
runs them in tests/docs/commands.py's fresh shell, without the virtual environment on PATH),
or it is in NOT_RUN with the reason no test here can run it.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from tests.docs.commands import DOCS, blocks, commands, documented_commands, normalise
from tests.helpers import ROOT

RUNNERS = ("tests.e2e.test_docs_clients", "tests.export.test_walkthrough", "tests.docs.test_commands")

CLUSTER = "needs a Kubernetes cluster; tests/deploy renders and validates every overlay offline"
IMAGE = ("builds the container image with podman as root (about 19 minutes from nothing, 1 GB of "
         "downloads: a release step, docs/deploy.md 'Not in CI')")
NOT_RUN: dict[tuple[str, str], str] = {
    ("README.md", "make serve"): "the set-up every other command assumes; it serves on the fixed ports 8500-8502, "
                                 "which a shared test machine cannot promise (the doc tests start the same "
                                 "`quorum serve` on free ports)",
    ("README.md", "make test"): "the set-up every other command assumes, and the suite this test is part of",
    ("README.md", "make image && kubectl apply -k deploy/k8s/overlays/cpu"): f"{IMAGE}; then {CLUSTER}",
    ("docs/deploy.md", "make image"): IMAGE,
    ("docs/deploy.md", "make image-gpu"): IMAGE + "; CUDA 13 wheels",
    ("docs/deploy.md", "make image-test"): IMAGE + "; then mounts and chroots into it",
    ("docs/deploy.md", "kubectl apply -k deploy/k8s/overlays/cpu"): CLUSTER,
    ("docs/deploy.md", "kubectl -n quorum rollout status deploy/quorum"): CLUSTER,
    ("docs/deploy.md", "kubectl -n quorum port-forward svc/quorum 8500:8500 8501:8501 8502:8502"): CLUSTER,
    ("docs/deploy.md", ".venv/bin/grpcurl -plaintext localhost:8500 grpc.health.v1.Health/Check"):
        "through the cluster's port-forward above; the same call on a local server is clients.md's, which runs",
    ("docs/deploy.md", "kubectl -n quorum create secret generic quorum-auth --from-file=token=./token"):
        CLUSTER + "; tests/deploy/test_documented_secrets.py runs it as a client-side dry run",
    ("docs/deploy.md", "kubectl -n quorum create secret generic quorum-tls --from-file=tls.crt --from-file=tls.key "
                       "--from-file=ca.crt"):
        CLUSTER + "; tests/deploy/test_documented_secrets.py runs it as a client-side dry run",
    ("docs/deploy.md", "kubectl -n quorum create secret generic quorum-redis --from-file=password=./redis-password"):
        CLUSTER + "; tests/deploy/test_documented_secrets.py runs it as a client-side dry run",
    ("docs/deploy.md", "kubectl -n quorum create secret generic quorum-state --from-file=url=./state-url"):
        CLUSTER + "; tests/deploy/test_documented_secrets.py runs it as a client-side dry run",
    ("docs/deploy.md", "kubectl apply -k deploy/k8s/overlays/cpu-shared-state"): CLUSTER,
    ("docs/deploy.md", "kubectl apply -k deploy/k8s/overlays/cpu-external-state"): CLUSTER,
    ("docs/deploy.md", "kubectl apply -k deploy/k8s/overlays/cpu-remote-members"): CLUSTER,
    ("docs/performance.md", ".venv/bin/python bench/foreign_member.py --requests 100"):
        "needs MLServer in bench/.venv-mlserver (bench/setup_mlserver.sh, from PyPI), which make test does not "
        "install; the remote member it checks is tested with Quorum endpoints by tests/e2e/test_remote_members.py",
    ("docs/performance.md", ".venv/bin/python bench/remote_members.py --concurrency 64 --duration 8 --rounds 3"):
        "about 2 minutes of load on every core from four servers; tests/bench/test_remote_members.py runs the same "
        "script for half a second",
    ("docs/performance.md", ".venv/bin/python bench/feedback_bench.py --seconds 6 --rounds 3 --fill 25000 "
                            "--concurrency 8"):
        "about 5 minutes of load on every core (four servers and a redis-server); the store it measures is "
        "tested by tests/objectives/test_redis_store.py and tests/e2e/test_shared_feedback.py",
    ("docs/performance.md", "make bench"): "about 10 minutes of load on every core, and installs MLServer from PyPI "
                                           "into bench/.venv-mlserver; tests/bench runs each benchmark briefly",
    ("docs/performance.md", ".venv/bin/pip install -e '.[bench]'"): "installs packages from PyPI into the shared venv",
    ("docs/performance.md", ".venv/bin/py-spy record -o profile.svg --pid <server pid> --duration 10"):
        "needs a server's pid under load, and ptrace rights",
    ("docs/performance.md", ".venv/bin/py-spy record --pid <pid> --threads --native --format raw -o prof.txt"):
        "needs a server's pid under load, and ptrace rights",
    ("docs/performance.md", ".venv/bin/py-spy dump --pid <pid>"): "needs a server's pid, and ptrace rights",
    ("docs/performance.md", ".venv/bin/python bench/engines.py --duration 10 --rounds 2"):
        "minutes of load on every core; tests/bench/test_engines.py runs the same script for half a second",
    ("models/README.md", ".venv/bin/python models/make_digits.py"):
        "trains five models (about 80 s of both cores) and rewrites the bundled repository the other tests serve; "
        "tests/docs/test_make_models.py checks what it writes besides the weights",
    ("models/README.md", ".venv/bin/python models/make_digits.py --out DIR"):
        "the same training (about 80 s of both cores), into a folder of the reader's choice",
    ("models/README.md", ".venv/bin/quorum export --model my_model.keras --data splits.npz --repository models "
                         "--name my_model --format onnx"):
        "the reader's own model and data; docs/walkthrough.md's exports of three models run",
}
"""(page, command as written) -> why no test runs it. Each entry must still be on its page."""
_NOT_RUN = {(doc, normalise(command)) for doc, command in NOT_RUN}

_PROGRAM = re.compile(r"^(make|quorum|grpcurl|curl|kubectl|python3?|pip|openssl|podman|source|mkdir|cd|"
                      r"\.venv/bin/\S+|bench/\S+|scripts/\S+|models/\S+\.py)(\s|$)")


def run_by_tests() -> set[tuple[str, str]]:
    return {command.key for runner in RUNNERS for command in importlib.import_module(runner).documented()}


def test_every_documented_command_is_run_by_a_doc_test_or_says_why_not():
    run = run_by_tests()
    missing = [f"{c}" for c in documented_commands() if c.key not in run and c.key not in _NOT_RUN]
    assert not missing, "documented commands no doc test runs (run them, or add to NOT_RUN with a reason):\n" + \
        "\n".join(missing)


def test_every_command_not_run_is_still_documented_and_says_why():
    documented = {c.key for c in documented_commands()}
    stale = [key for key in NOT_RUN if (key[0], normalise(key[1])) not in documented]
    assert not stale, f"NOT_RUN names commands no page shows any more: {stale}"
    assert all(len(reason) > 20 for reason in NOT_RUN.values())
    assert not _NOT_RUN & run_by_tests(), "run by a test: not NOT_RUN"


def test_the_runners_run_what_is_documented():
    """A runner's `documented()` holds only commands that are on the pages as written."""
    documented = {c.key for c in documented_commands()}
    assert run_by_tests() <= documented, sorted(run_by_tests() - documented)


def _venv_programs() -> set[str]:
    """The programs the venv puts on a PATH that has it: a fresh shell has none of them, or
    another one of the same name (a system pip installs elsewhere). Python itself is left
    out: a page's `python3 -c` with the standard library alone is the system's."""
    return {p.name for p in (ROOT / ".venv" / "bin").iterdir()
            if not p.name.startswith(("python", "activate", "Activate")) and p.name not in OPERATORS_OWN}


OPERATORS_OWN = {"kubectl": "the operator's, configured for their cluster (the venv's copy is for the offline tests)"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_a_venv_program_is_named_by_its_path(doc: Path):
    """`quorum`, `grpcurl` and the rest of the venv's programs are not on a fresh shell's PATH:
    a command names them `.venv/bin/...`, unless its page activates the venv first (a command
    NOT_RUN included)."""
    venv_only = _venv_programs()
    assert {"quorum", "grpcurl", "pip"} <= venv_only, venv_only
    activated = False
    for command in commands(doc):
        activated = activated or normalise(command.text) == "source .venv/bin/activate"
        words = shlex.split(command.text, comments=True)
        while words and re.match(r"[A-Za-z_]\w*=", words[0]):  # VAR=value before the program
            words.pop(0)
        assert activated or not words or words[0] not in venv_only, (
            f"{command}: needs .venv/bin on PATH: write .venv/bin/{words[0]}")


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_a_block_of_commands_says_it_is_one(doc: Path):
    """An untagged block is not collected as commands: one that holds a command is tagged."""
    for lang, line, body in blocks(doc):
        if lang == "":
            commands = [text for text in body.splitlines() if _PROGRAM.match(text)]
            assert not commands, f"{doc.relative_to(ROOT)}:{line}: tag this block ```bash: {commands}"
