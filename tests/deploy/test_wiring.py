"""What an operator edits or relies on when applying the overlays as they are: the image
reference, Secrets for the token and TLS, the NetworkPolicy, the label kube-prometheus-stack
selects on, and where each overlay's models come from."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
import tomllib

import pytest

from tests.deploy.manifests import K8S, OVERLAYS, ROOT, container, find, render, settings_data, validate

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
BUILD = (ROOT / "scripts" / "image_build.sh").read_text()


def _own_overlay(tmp_path: Path, kustomization: str) -> Path:
    """deploy/k8s/overlays/mine in a copy of deploy/k8s (kustomize resolves relative paths only)."""
    shutil.copytree(K8S, tmp_path / "k8s")
    mine = tmp_path / "k8s" / "overlays" / "mine"
    mine.mkdir()
    (mine / "kustomization.yaml").write_text(kustomization)
    return mine


def _pod(objects) -> dict:
    return find(objects, "Deployment", "quorum")["spec"]["template"]["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_image_is_the_one_make_image_tags(overlay):
    objects = render(overlay)
    images = {c["image"] for c in [*_pod(objects).get("initContainers", []), *_pod(objects)["containers"]]
              if c["name"] != "fetch-models"}
    suffix = "-gpu" if "gpu" in overlay.name else ""
    assert images == {f"localhost/quorum:{VERSION}{suffix}"}
    assert 'IMAGE:-localhost/quorum:$VERSION$SUFFIX' in BUILD and "SUFFIX=-gpu" in BUILD
    kustomization = (overlay / "kustomization.yaml").read_text()
    assert "example" not in kustomization


def test_documented_image_override_takes_effect(tmp_path):
    """docs/deploy.md: an overlay of your own sets newName/newTag for the image `quorum`."""
    docs = (ROOT / "docs" / "deploy.md").read_text()
    own = re.search(r"```yaml\n(# your image\n.*?)```", docs, re.S).group(1)
    objects = render(_own_overlay(tmp_path, own))
    assert container(objects)["image"] == "registry.internal/ml/quorum:0.1.0-rc1"


def _secret_mount(pod: dict, c: dict, path: str) -> str:
    """The Secret a file path of the container lies in."""
    mounts = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1 and mounts[0].get("readOnly") is True, (path, mounts)
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
    return volume["secret"]["secretName"]


def test_token_and_tls_come_from_mounted_secrets():
    objects = render(K8S / "overlays" / "cpu-secured")
    data, pod, c = settings_data(objects), _pod(objects), container(objects)
    assert _secret_mount(pod, c, data["QUORUM_AUTH_TOKEN_FILE"]) == "quorum-auth"
    for key in ("QUORUM_TLS_CERT", "QUORUM_TLS_KEY", "QUORUM_TLS_CLIENT_CA"):
        assert _secret_mount(pod, c, data[key]) == "quorum-tls", key
    env = {e["name"]: e["value"] for e in c["env"]}
    assert _secret_mount(pod, c, env["HEALTHCHECK_CA"]) == "quorum-tls"
    assert "QUORUM_AUTH_TOKEN" not in data  # the token itself never sits in a ConfigMap
    for overlay in OVERLAYS:
        if overlay.name != "cpu-secured":
            assert not {k for k in settings_data(render(overlay)) if "TLS" in k or "AUTH" in k}, overlay.name


def test_network_policy_admits_clients_and_prometheus_only():
    objects = render(K8S / "overlays" / "cpu")
    policy = find(objects, "NetworkPolicy", "quorum")["spec"]
    deployment = find(objects, "Deployment", "quorum")
    assert policy["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress"]
    ports = {p["name"] for p in container(objects)["ports"]}
    rules = {(tuple(sorted(f)), tuple(p["port"] for p in r["ports"]))
             for r in policy["ingress"] for f in (list(x) for x in r["from"])}
    assert rules == {(("podSelector",), ("grpc", "http")), (("namespaceSelector",), ("metrics",))}
    assert {p for r in policy["ingress"] for p in (q["port"] for q in r["ports"])} <= ports
    clients = next(r for r in policy["ingress"] if "podSelector" in r["from"][0])
    assert clients["from"] == [{"podSelector": {}}]  # every pod of the namespace, nothing else
    monitoring = next(r for r in policy["ingress"] if "namespaceSelector" in r["from"][0])
    assert monitoring["from"][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_monitoring_objects_carry_the_kube_prometheus_stack_release_label(overlay):
    objects = render(overlay)
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert find(objects, kind, "quorum")["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_documented_release_label_patch_takes_effect(tmp_path):
    docs = (ROOT / "docs" / "deploy.md").read_text()
    patch = re.search(r"```yaml\n(# release label\n.*?)```", docs, re.S).group(1)
    objects = render(_own_overlay(tmp_path, patch))
    for kind in ("ServiceMonitor", "PrometheusRule"):
        obj = find(objects, kind, "quorum")
        assert obj["metadata"]["labels"]["release"] == "prometheus"
        validate(obj)


def test_model_sources_and_model_control_per_overlay():
    expected = {"cpu": ("/opt/quorum/models", None), "gpu": ("/opt/quorum/models", None),
                "cpu-secured": ("/opt/quorum/models", None),
                "cpu-shared-state": ("/opt/quorum/models", None), "cpu-external-state": ("/opt/quorum/models", None),
                "gpu-pvc": ("/models", "poll"),  # versions are written into the volume: picked up by polling
                "cpu-object-storage": ("/models", None),  # copied once at start: a restart brings new ones
                "cpu-remote-members": ("/opt/quorum/front-models", None)}  # ensemble.yaml alone: its members elsewhere
    assert set(expected) == {p.name for p in OVERLAYS}
    for overlay in OVERLAYS:
        data = settings_data(render(overlay))
        assert (data["QUORUM_MODEL_REPOSITORY"], data.get("QUORUM_MODEL_CONTROL")) == expected[overlay.name]


def test_pvc_has_a_storage_class_and_is_seeded_from_the_image():
    objects = render(K8S / "overlays" / "gpu-pvc")
    pvc = find(objects, "PersistentVolumeClaim", "quorum-models")["spec"]
    assert pvc["storageClassName"] and pvc["accessModes"] == ["ReadWriteMany"]
    pod = _pod(objects)
    seed = next(c for c in pod["initContainers"] if c["name"] == "seed-models")
    assert seed["image"] == container(objects)["image"]
    models = next(m for m in container(objects)["volumeMounts"] if m["name"] == "models")
    assert models["readOnly"] is True
    assert "/opt/quorum/models/" in seed["command"][-1]  # the Dockerfile's models path


def test_seed_command_copies_only_into_an_empty_volume(tmp_path):
    command = next(c for c in _pod(render(K8S / "overlays" / "gpu-pvc"))["initContainers"]
                   if c["name"] == "seed-models")["command"]
    image_models, volume = tmp_path / "image", tmp_path / "volume"
    (image_models / "digits_a" / "1").mkdir(parents=True)
    (image_models / "digits_a" / "1" / "model.onnx").write_text("bundled")
    volume.mkdir()
    script = command[-1].replace("/opt/quorum/models/", f"{image_models}/").replace("/models", str(volume))
    subprocess.run([*command[:-1], script], check=True)
    assert (volume / "digits_a" / "1" / "model.onnx").read_text() == "bundled"
    (volume / "digits_a" / "1" / "model.onnx").write_text("newer")
    (image_models / "digits_b").mkdir()
    subprocess.run([*command[:-1], script], check=True)
    assert (volume / "digits_a" / "1" / "model.onnx").read_text() == "newer" and not (volume / "digits_b").exists()


def test_object_storage_init_container_is_pinned():
    pod = _pod(render(K8S / "overlays" / "cpu-object-storage"))
    fetch = next(c for c in pod["initContainers"] if c["name"] == "fetch-models")
    assert re.fullmatch(r"rclone/rclone:\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", fetch["image"])
    env = {e["name"]: e.get("value") for e in fetch["env"]}
    assert "$(MODEL_SOURCE)" in fetch["args"] and env["MODEL_SOURCE"]
    assert fetch["envFrom"] == [{"secretRef": {"name": "quorum-model-store"}}]

