"""yamllint over the deployment YAML (.yamllint at the repo root) and hadolint over the
Dockerfile (.hadolint.yaml), both from the test extra; no network."""

from __future__ import annotations

import subprocess

from tests.deploy.manifests import K8S, ROOT, tool


def test_yamllint_deploy_k8s():
    # relative path from the repo root: .yamllint's ignore patterns are written that way
    out = subprocess.run([tool("yamllint"), "--strict", "-c", ".yamllint", str(K8S.relative_to(ROOT))],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_dockerfile():
    out = subprocess.run([tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), "--no-color",
                          str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
