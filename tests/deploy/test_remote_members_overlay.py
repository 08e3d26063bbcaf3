"""The split-ensemble overlay (cpu-remote-members, issue 39): the front serves the bundled digits
ensemble from a ConfigMap's ensemble.yaml whose members name the member Deployments' headless
Services; each member is served by the pool its endpoint names, the CNNs on GPU nodes; the
members take gRPC from the front's pods. (Every overlay's generic checks apply to it too.)"""

from __future__ import annotations

import re

import yaml

from service.repository.config import load_ensemble_config
from tests.deploy.manifests import K8S, container, find, render, settings_data
from tests.helpers import MODELS

OVERLAY = K8S / "overlays" / "cpu-remote-members"
ENDPOINT = re.compile(r"^dns:///(?P<service>[a-z0-9-]+)\.(?P<namespace>[a-z0-9-]+)\.svc\.cluster\.local:(?P<port>\d+)$")


def _front_ensemble(objects, tmp_path):
    """The front's ensemble.yaml, read as the server reads it, and the folder it is mounted as."""
    pod = find(objects, "Deployment", "quorum")["spec"]["template"]["spec"]
    mount = next(m for m in container(objects)["volumeMounts"] if m["name"] == "front-models")
    volume = next(v for v in pod["volumes"] if v["name"] == "front-models")
    config_map = find(objects, "ConfigMap", volume["configMap"]["name"])
    folder = tmp_path / "digits"
    folder.mkdir()
    (folder / "ensemble.yaml").write_text(config_map["data"]["ensemble.yaml"])
    return load_ensemble_config(folder), mount["mountPath"]


def _matches(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def test_the_front_serves_the_bundled_ensemble_with_every_member_elsewhere(tmp_path):
    objects = render(OVERLAY)
    config, mounted = _front_ensemble(objects, tmp_path)
    assert mounted == f"{settings_data(objects)['QUORUM_MODEL_REPOSITORY']}/digits"
    bundled = yaml.safe_load((MODELS / "digits" / "ensemble.yaml").read_text())
    assert list(config.members) == bundled["members"] and config.policy == bundled["policy"]
    assert {m.name for m in config.remote} == set(config.members)  # every member is remote


def test_each_member_is_served_by_the_deployment_its_endpoint_names(tmp_path):
    objects = render(OVERLAY)
    config, _ = _front_ensemble(objects, tmp_path)
    served: dict[str, set[str]] = {}
    for member in config.remote:
        where = ENDPOINT.match(member.endpoint)
        assert where, member.endpoint
        service = find(objects, "Service", where["service"])
        assert where["namespace"] == service["metadata"]["namespace"] == "quorum"
        assert service["spec"]["clusterIP"] == "None"  # dns:/// resolves every pod: round_robin over them
        grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert int(where["port"]) == grpc_port["port"]
        [deployment] = [o for o in objects if o["kind"] == "Deployment" and _matches(
            service["spec"]["selector"], o["spec"]["template"]["metadata"]["labels"])]
        served.setdefault(deployment["metadata"]["name"], set()).add(member.name)
    assert served == {"quorum-members-cpu": {"digits_mlp_a", "digits_mlp_b", "digits_logreg"},
                      "quorum-members-gpu": {"digits_cnn_a", "digits_cnn_b"}}
    for name, members in served.items():
        pod = find(objects, "Deployment", name)["spec"]["template"]["spec"]
        [pick] = pod["initContainers"]
        copied = {p.rsplit("/", 1)[1] for p in pick["command"][2:-1]}
        assert copied == members and all((MODELS / m).is_dir() for m in copied)
        server = next(c for c in pod["containers"] if c["name"] == "quorum")
        env = {e["name"]: e.get("value") for e in server["env"]}
        assert env["QUORUM_MODEL_REPOSITORY"] == pick["command"][-1].rstrip("/")


def test_the_large_members_run_on_gpu_nodes_and_the_small_ones_on_cpu():
    objects = render(OVERLAY)
    gpu = find(objects, "Deployment", "quorum-members-gpu")["spec"]["template"]["spec"]
    server = next(c for c in gpu["containers"] if c["name"] == "quorum")
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1 and server["image"].endswith("-gpu")
    assert {"name": "QUORUM_DEVICE", "value": "gpu"} in server["env"]
    assert gpu["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    cpu = find(objects, "Deployment", "quorum-members-cpu")["spec"]["template"]["spec"]
    assert "nodeSelector" not in cpu and not cpu["containers"][0]["image"].endswith("-gpu")
    assert not container(objects)["image"].endswith("-gpu")  # the front votes on the CPU


def test_the_members_answer_the_front_only():
    objects = render(OVERLAY)
    policy = find(objects, "NetworkPolicy", "quorum-members")["spec"]
    front = find(objects, "Deployment", "quorum")["spec"]["template"]["metadata"]["labels"]
    for name in ("quorum-members-cpu", "quorum-members-gpu"):
        labels = find(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert _matches(policy["podSelector"]["matchLabels"], labels)
    grpc_rule = next(r for r in policy["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"])
    [source] = grpc_rule["from"]
    assert _matches(source["podSelector"]["matchLabels"], front)
    clients = find(objects, "NetworkPolicy", "quorum")["spec"]["podSelector"]["matchLabels"]
    for name in ("quorum-members-cpu", "quorum-members-gpu"):  # the clients' policy is the front's alone
        assert not _matches(clients, find(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"])
