"""The manifests and the image agree with the server: ports, probes, env names (against
service.settings.Settings), the user, and the metric names the autoscaler depends on."""

from __future__ import annotations

import json
import re
import tomllib

import pytest
import yaml

from service.setting_names import env_name
from service.settings import Settings
from tests.deploy.manifests import (K8S, OVERLAYS, ROOT, base_metric, container, find, metric_catalogue, render,
                                    settings_data)

DEFAULTS = Settings()
# QUORUM_MODEL_CONTROL: the setting the lead fixed for the operability work (GUIDE shared
# interfaces), which the PVC variant turns to `poll`; a Settings field once that is merged.
ENV_NAMES = {env_name(name) for name in Settings.model_fields} | {"QUORUM_MODEL_CONTROL"}  # current names only
HTTP_PORT = 8501  # QUORUM_HTTP_PORT's default (the HTTP work; shared interface)
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
HEALTHCHECK = ["python", "/opt/quorum/healthcheck.py"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _port(ports: list[dict], name: str) -> dict:
    return next(p for p in ports if p["name"] == name)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_settings_configmap_names_settings_fields_and_parses(overlay, monkeypatch, tmp_path):
    data = settings_data(render(overlay))
    assert set(data) <= ENV_NAMES, f"not Settings fields: {set(data) - ENV_NAMES}"
    for key in [k for k in __import__("os").environ if k.startswith("QUORUM_")]:
        monkeypatch.delenv(key)
    for key, value in data.items():
        if key in SECRET_FILES:  # a mounted Secret: the file exists in the pod, so here too
            value = str(_mounted(tmp_path, value, SECRET_FILES[key]))
        monkeypatch.setenv(key, value)
    settings = Settings()  # the pod's settings parse
    assert settings.grpc_port == DEFAULTS.grpc_port == 8500
    assert settings.metrics_port == DEFAULTS.metrics_port == 8502
    expected = "gpu" if "gpu" in overlay.name else "cpu"
    assert settings.device == expected


SECRET_FILES = {"QUORUM_AUTH_TOKEN_FILE": "token", "QUORUM_TLS_CERT": "cert", "QUORUM_TLS_KEY": "key",
                "QUORUM_TLS_CLIENT_CA": "ca"}


def _mounted(root, path: str, kind: str):
    """The file a Secret mount would hold at `path`, under `root`: a token or real PEMs
    (one PKI per test, so that the certificate and the key are a pair)."""
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if kind == "token":
        target.write_text("a-token\n")
        return target
    from tests.e2e.certs import make_pki

    pki_dir = root / "pki"
    if not pki_dir.exists():
        _PKI[root] = make_pki(pki_dir)
    pki = _PKI[root]
    target.write_bytes({"cert": pki.server.cert, "key": pki.server.key, "ca": pki.ca.cert}[kind].read_bytes())
    return target


_PKI: dict = {}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_ports_and_probes_match_the_server(overlay):
    objects = render(overlay)
    data = settings_data(objects)
    grpc_port, metrics_port = int(data["QUORUM_GRPC_PORT"]), int(data["QUORUM_METRICS_PORT"])
    c = container(objects)
    assert _port(c["ports"], "grpc")["containerPort"] == grpc_port
    assert _port(c["ports"], "metrics")["containerPort"] == metrics_port
    assert _port(c["ports"], "http")["containerPort"] == HTTP_PORT
    # readiness (and startup): health service ""; liveness: health service "liveness"
    for probe, service in (("startupProbe", ""), ("readinessProbe", ""), ("livenessProbe", "liveness")):
        if "QUORUM_TLS_CERT" in data:  # the kubelet's gRPC probes cannot speak TLS
            assert "grpc" not in c[probe] and c[probe]["exec"]["command"] == [*HEALTHCHECK, service], probe
        else:
            assert c[probe]["grpc"] == {"port": grpc_port, "service": service}, probe
    service = find(objects, "Service", "quorum")["spec"]["ports"]
    assert _port(service, "grpc") == {"name": "grpc", "port": grpc_port, "targetPort": "grpc",
                                      "protocol": "TCP", "appProtocol": "grpc"}
    assert _port(service, "http") == {"name": "http", "port": HTTP_PORT, "targetPort": "http",
                                      "protocol": "TCP", "appProtocol": "http"}
    assert _port(service, "metrics")["port"] == metrics_port
    headless = find(objects, "Service", "quorum-headless")["spec"]
    assert headless["clusterIP"] == "None" and _port(headless["ports"], "grpc")["port"] == grpc_port
    monitor = find(objects, "ServiceMonitor", "quorum")["spec"]
    assert [e["port"] for e in monitor["endpoints"]] == ["metrics"]
    labels = find(objects, "Service", "quorum")["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_pod_hardening_and_shutdown(overlay):
    objects = render(overlay)
    pod = find(objects, "Deployment", "quorum")["spec"]["template"]["spec"]
    c = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(re.search(r"^USER (\d+)", DOCKERFILE, re.M).group(1))
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert "emptyDir" in tmp and {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    grace = float(settings_data(objects)["QUORUM_GRACE_PERIOD"])
    assert pod["terminationGracePeriodSeconds"] > grace + c["lifecycle"]["preStop"]["sleep"]["seconds"]
    hpa = find(objects, "HorizontalPodAutoscaler", "quorum")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "quorum" and hpa["minReplicas"] >= 2
    assert "replicas" not in find(objects, "Deployment", "quorum")["spec"]  # the HPA owns it


def test_gpu_overlay_asks_for_a_gpu():
    objects = render(K8S / "overlays" / "gpu")
    c = container(objects)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith("-gpu")
    pod = find(objects, "Deployment", "quorum")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert not container(render(K8S / "overlays" / "cpu"))["image"].endswith("-gpu")


def test_autoscaler_metrics_are_served_by_the_adapter_and_exported_by_the_server():
    hpa = find(render(K8S / "overlays" / "cpu"), "HorizontalPodAutoscaler")["spec"]
    wanted = {m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"}
    assert wanted == {"quorum_inflight_requests", "quorum_queue_depth"}
    config = yaml.safe_load(find(render(K8S / "prometheus-adapter"), "ConfigMap")["data"]["config.yaml"])
    served = {r["name"]["as"] for r in config["rules"]}
    assert wanted <= served
    series = {re.match(r"(\w+)\{", r["seriesQuery"]).group(1) for r in config["rules"]}
    for rule in config["rules"]:
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
    catalogue = metric_catalogue()
    assert catalogue, "no metric catalogue (service/monitoring/*.py, docs/metrics.md)"
    families = {base_metric(n) for n in catalogue}
    assert series <= families, f"not in the metric catalogue: {series - families}"


def test_kserve_predictor_runs_the_same_server():
    isvc = yaml.safe_load((K8S / "kserve" / "inferenceservice.yaml").read_text())
    c = isvc["spec"]["predictor"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert set(env) <= ENV_NAMES
    assert c["ports"] == [{"name": "h2c", "containerPort": int(env["QUORUM_GRPC_PORT"]), "protocol": "TCP"}]
    assert c["readinessProbe"]["grpc"]["port"] == DEFAULTS.grpc_port


def test_dockerfile_matches_the_server():
    assert re.findall(r"^EXPOSE (\d+) (\d+) (\d+)$", DOCKERFILE, re.M) == [
        (str(DEFAULTS.grpc_port), str(HTTP_PORT), str(DEFAULTS.metrics_port))] * 2
    assert DOCKERFILE.count(f'CMD {json.dumps(HEALTHCHECK)}') == 2
    assert "COPY --chown=root:root scripts/healthcheck.py /opt/quorum/healthcheck.py" in DOCKERFILE
    assert DOCKERFILE.count('ENTRYPOINT ["quorum", "serve"]') == 2  # cpu and gpu targets
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["quorum"] == "service.cli:main"
    env = set(re.findall(r"\b(QUORUM_[A-Z_]+)=", DOCKERFILE))
    assert env and env <= ENV_NAMES, env - ENV_NAMES
    stages = re.findall(r"^FROM (\S+) AS (\S+)$", DOCKERFILE, re.M)
    assert [s for _, s in stages] == ["cpu-builder", "cpu", "gpu-builder", "gpu"]  # gpu is the default
    cuda = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+$", DOCKERFILE, re.M)
    assert cuda and cuda.group(1) == "13"  # onnxruntime-gpu 1.31 is built for CUDA 13 / cuDNN 9
    assert "python scripts/gen_protos.py" in DOCKERFILE
    # the model path baked into the image is the one the ConfigMap points at
    image_models = re.search(r"QUORUM_MODEL_REPOSITORY=(\S+)", DOCKERFILE).group(1)
    assert settings_data(render(K8S / "overlays" / "cpu"))["QUORUM_MODEL_REPOSITORY"] == image_models
    assert f"COPY --chown=root:root models {image_models}" in DOCKERFILE


def test_dockerignore_keeps_what_the_build_needs():
    rules = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert rules[0] == "*"
    copied = re.findall(r"^COPY (?:--chown=\S+ )?(.+) \S+$", DOCKERFILE, re.M)
    sources = {src for line in copied if "--from" not in line for src in line.split()}
    assert {"scripts/image_slim.sh", "scripts/healthcheck.py", "scripts/image_requirements.py"} <= sources
    for needed in ("!pyproject.toml", "!service/", "!protos/", "!models/", *(f"!{p}" for p in sources if "/" in p
                                                                             and p.startswith("scripts/"))):
        assert needed in rules
    assert "service/_proto/" in rules
