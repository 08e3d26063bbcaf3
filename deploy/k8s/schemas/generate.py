"""Regenerate the committed CRD schemas (ServiceMonitor, PrometheusRule, InferenceService).

Not run by the tests: they read the committed JSON. Run it by hand in a scratch virtualenv
(Python 3.11) when bumping the Prometheus Operator or KServe version:

    python3.11 -m venv /tmp/crd && /tmp/crd/bin/pip install \
        cloudcoil-models-prometheus-operator==0.80.1.0
    /tmp/crd/bin/pip download --no-deps -d /tmp/crd/whl kserve==0.21.0
    /tmp/crd/bin/python deploy/k8s/schemas/generate.py /tmp/crd/whl/kserve-0.21.0-py3-none-any.whl

Sources, both from PyPI: the Prometheus Operator CRDs come from the pydantic models in
`cloudcoil-models-prometheus-operator` (generated from the operator's published CRDs), the
InferenceService from the OpenAPI models of the `kserve` SDK (read as source text, so that
kserve's own dependencies need not be installed). Every object type gets
`additionalProperties: false`, so a misspelt field fails. Kubernetes core types (Container,
ObjectMeta, ...) are left as `$ref`s into kubernetes-validate's `_definitions.json`, which
the tests register, so the committed files stay small.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
K8S = "/api/_definitions.json#/$defs/"
OBJECT_META = K8S + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
SCHEMA = "https://json-schema.org/draft/2020-12/schema"


def _tighten(node: object) -> object:
    """Drop pydantic's Optional wrappers and titles; forbid unknown fields."""
    if isinstance(node, list):
        return [_tighten(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _tighten(v) for k, v in node.items() if k not in ("title", "default")}
    any_of = node.get("anyOf")
    if isinstance(any_of, list):
        rest = [s for s in any_of if s != {"type": "null"}]
        if len(rest) == 1:
            node.pop("anyOf")
            node.update(rest[0])
    if node.get("type") == "object" and "properties" in node:
        node.setdefault("additionalProperties", False)
    return node


def prometheus_operator() -> None:
    from cloudcoil.models.prometheus_operator import v1

    for model, name in ((v1.ServiceMonitor, "servicemonitor"), (v1.PrometheusRule, "prometheusrule")):
        schema = _tighten(model.model_json_schema(by_alias=True))
        schema["$defs"].pop("ObjectMeta", None)
        schema["properties"]["metadata"] = {"$ref": OBJECT_META}
        schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
        _write(f"{name}-monitoring-v1.json", schema)


_K8S_GROUPS = ("io.k8s.api.core.v1.", "io.k8s.apimachinery.pkg.apis.meta.v1.", "io.k8s.api.apps.v1.",
               "io.k8s.api.autoscaling.v2.")
_K8S_SPECIAL = {
    "ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
    "K8sIoApiAppsV1DeploymentStrategy": "io.k8s.api.apps.v1.DeploymentStrategy",
    "KnativeURL": None, "KnativeCondition": None, "KnativeAddressable": None, "KnativeVolatileTime": None,
}


def _kserve_models(wheel: Path) -> dict[str, tuple[dict[str, str], dict[str, str], list[str]]]:
    """class name -> (python attr -> type string, python attr -> json name, required json names)."""
    models = {}
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if not re.fullmatch(r"kserve/models/v1beta1_\w+\.py", info.filename):
                continue
            src = zf.read(info).decode()
            for node in ast.parse(src).body:
                if not isinstance(node, ast.ClassDef):
                    continue
                tables = {t.targets[0].id: ast.literal_eval(t.value) for t in node.body
                          if isinstance(t, ast.Assign) and isinstance(t.targets[0], ast.Name)
                          and t.targets[0].id in ("openapi_types", "attribute_map")}
                required = re.findall(r"Invalid value for `(\w+)`, must not be `None`", src)
                amap = tables.get("attribute_map", {})
                models[node.name] = (tables.get("openapi_types", {}), amap,
                                     sorted({amap.get(r, r) for r in required}))
    return models


def _k8s_ref(name: str, k8s_defs: dict) -> dict:
    if name in _K8S_SPECIAL:
        target = _K8S_SPECIAL[name]
        return {"$ref": K8S + target} if target else {}
    short = re.sub(r"^V\d+(alpha\d+|beta\d+)?", "", name)
    for group in _K8S_GROUPS:
        if group + short in k8s_defs:
            return {"$ref": K8S + group + short}
    return {}  # unknown upstream type: accept anything rather than guess


def kserve(wheel: Path) -> None:
    import kubernetes_validate

    k8s_defs = json.loads((Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
                           / "v1.37.0-local-strict" / "_definitions.json").read_text())["$defs"]
    models = _kserve_models(wheel)
    defs: dict[str, dict] = {}

    def type_schema(t: str) -> dict:
        if m := re.fullmatch(r"list\[(.+)\]", t):
            return {"type": "array", "items": type_schema(m.group(1))}
        if m := re.fullmatch(r"dict\(str, (.+)\)", t):
            return {"type": "object", "additionalProperties": type_schema(m.group(1))}
        scalars = {"str": {"type": "string"}, "int": {"type": "integer"}, "bool": {"type": "boolean"},
                   "float": {"type": "number"}, "object": {}, "datetime": {"type": "string"}}
        if t in scalars:
            return scalars[t]
        if t in models:
            if t not in defs:
                defs[t] = {}
                types, amap, required = models[t]
                defs[t] = {"type": "object", "additionalProperties": False,
                           "properties": {amap[a]: type_schema(ts) for a, ts in types.items()}}
                if required:
                    defs[t]["required"] = required
            return {"$ref": f"#/$defs/{t}"}
        return _k8s_ref(t, k8s_defs)

    root = type_schema("V1beta1InferenceService")["$ref"].rsplit("/", 1)[1]
    schema = {"$schema": SCHEMA, "$id": "https://kubernetes.io/api/crd/inferenceservice-serving-v1beta1.json",
              **defs.pop(root), "$defs": defs}
    schema["properties"]["apiVersion"] = {"const": "serving.kserve.io/v1beta1"}
    schema["properties"]["kind"] = {"const": "InferenceService"}
    schema["properties"]["metadata"] = {"$ref": OBJECT_META}
    schema["properties"].pop("status", None)
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    _write("inferenceservice-serving-v1beta1.json", schema)


def _write(name: str, schema: dict) -> None:
    schema.setdefault("$schema", SCHEMA)
    schema.setdefault("$id", f"https://kubernetes.io/api/crd/{name}")
    (HERE / name).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    print(f"wrote {name} ({(HERE / name).stat().st_size} bytes)")


if __name__ == "__main__":
    prometheus_operator()
    kserve(Path(sys.argv[1]))
