"""Every overlay renders with kustomize, and every object it renders is valid offline:
built-in kinds against Kubernetes' own schemas (kubernetes-validate, strict: unknown fields
fail), CRDs against the committed schemas in deploy/k8s/schemas/."""

from __future__ import annotations

import pytest
import yaml

from tests.deploy.manifests import CRD_SCHEMAS, K8S, OVERLAYS, find, render, validate

RENDERED = [*OVERLAYS, K8S / "prometheus-adapter"]


def test_the_overlays_are_there():
    assert {p.name for p in OVERLAYS} >= {"cpu", "gpu", "gpu-pvc", "cpu-object-storage"}


@pytest.mark.parametrize("path", RENDERED, ids=lambda p: p.name)
def test_every_rendered_object_is_valid(path):
    objects = render(path)
    assert objects
    for obj in objects:
        validate(obj)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_has_the_whole_stack(overlay):
    objects = render(overlay)
    kinds = {o["kind"] for o in objects}
    assert kinds >= {"Namespace", "ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget",
                     "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"}
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"quorum"}


def test_kserve_inference_service_is_valid():
    docs = [d for d in yaml.safe_load_all((K8S / "kserve" / "inferenceservice.yaml").read_text()) if d]
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [("serving.kserve.io/v1beta1", "InferenceService")]
    validate(docs[0])


def test_crd_schemas_reject_what_the_api_server_would():
    """The committed schemas are strict enough to catch a misspelt field or a wrong type."""
    objects = render(OVERLAYS[0])
    monitor = find(objects, "ServiceMonitor", "quorum")
    bad = {**monitor, "spec": {**monitor["spec"], "endpoint": monitor["spec"]["endpoints"]}}
    with pytest.raises(Exception, match="endpoint"):
        validate(bad)
    rule = find(objects, "PrometheusRule", "quorum")
    with pytest.raises(Exception):
        validate({**rule, "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "for": 5}]}]}})
    assert {k for k, _ in CRD_SCHEMAS} == {"monitoring.coreos.com/v1", "serving.kserve.io/v1beta1"}


def test_pvc_and_object_storage_variants_mount_the_repository():
    for overlay, volume in (("gpu-pvc", "persistentVolumeClaim"), ("cpu-object-storage", "emptyDir")):
        objects = render(K8S / "overlays" / overlay)
        pod = find(objects, "Deployment", "quorum")["spec"]["template"]["spec"]
        models = next(v for v in pod["volumes"] if v["name"] == "models")
        assert volume in models
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "models")
        settings = next(o for o in objects if o["kind"] == "ConfigMap"
                        and o["metadata"]["name"].startswith("quorum-settings"))["data"]
        assert settings["QUORUM_MODEL_REPOSITORY"] == mount["mountPath"]
    init = find(render(K8S / "overlays" / "cpu-object-storage"), "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in init["initContainers"]] == ["fetch-models"]
