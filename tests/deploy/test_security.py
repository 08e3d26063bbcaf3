"""Every workload the manifests create (every overlay, and the KServe predictor): no
container runs as root or may become root, none has a writable root filesystem, and every
container, init containers included, asks for CPU and memory."""

from __future__ import annotations

import pytest
import yaml

from tests.deploy.manifests import K8S, OVERLAYS, render

POD_TEMPLATES = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


def _pods(objects) -> list[tuple[str, dict]]:
    pods = []
    for obj in objects:
        if obj["kind"] in POD_TEMPLATES:
            pods.append((f'{obj["kind"]}/{obj["metadata"]["name"]}', obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "CronJob":
            pods.append((f'CronJob/{obj["metadata"]["name"]}', obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        elif obj["kind"] == "InferenceService":
            pods.append((f'InferenceService/{obj["metadata"]["name"]}', obj["spec"]["predictor"]))
    return pods


def _workloads():
    kserve = tuple(d for d in yaml.safe_load_all((K8S / "kserve" / "inferenceservice.yaml").read_text()) if d)
    return [*((p.name, render(p)) for p in OVERLAYS), ("kserve", kserve)]


def _assert_hardened(where: str, pod: dict) -> None:
    pod_context = pod.get("securityContext", {})
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    assert containers, where
    for c in containers:
        name = f"{where} container {c['name']}"
        context = {**pod_context, **c.get("securityContext", {})}
        assert context.get("runAsNonRoot") is True, f"{name} may run as root"
        assert context.get("runAsUser", 0) != 0, f"{name} runs as UID 0"
        assert c.get("securityContext", {}).get("readOnlyRootFilesystem") is True, f"{name} has a writable root"
        assert c["securityContext"].get("allowPrivilegeEscalation") is False, f"{name} may escalate privileges"
        assert c["securityContext"].get("capabilities", {}).get("drop") == ["ALL"], f"{name} keeps capabilities"
        assert not c["securityContext"].get("privileged", False), name
        requests = c.get("resources", {}).get("requests", {})
        assert {"cpu", "memory"} <= set(requests), f"{name} lacks CPU/memory requests: {requests}"
        assert "memory" in c["resources"].get("limits", {}), f"{name} has no memory limit"


@pytest.mark.parametrize("name", [*(p.name for p in OVERLAYS), "kserve"])
def test_no_container_runs_as_root_writes_its_root_or_lacks_requests(name):
    objects = dict(_workloads())[name]
    pods = _pods(objects)
    assert pods, f"{name}: no workload rendered"
    for where, pod in pods:
        _assert_hardened(f"{name}: {where}", pod)
        assert pod_seccomp(pod) == "RuntimeDefault", where
    hostile = {"hostNetwork", "hostPID", "hostIPC"}
    assert not any(pod.get(k) for _, pod in pods for k in hostile)


def pod_seccomp(pod: dict) -> str | None:
    return pod.get("securityContext", {}).get("seccompProfile", {}).get("type")


def test_the_check_catches_what_it_is_for():
    """A root init container, a writable root or a missing request each fail the check."""
    pod = next(p for _, p in _pods(render(K8S / "overlays" / "cpu-object-storage")))
    init = pod["initContainers"][0]
    for broken in ({**init, "securityContext": {**init["securityContext"], "runAsUser": 0}},
                   {**init, "securityContext": {**init["securityContext"], "readOnlyRootFilesystem": False}},
                   {**init, "resources": {"limits": init["resources"]["limits"]}}):
        with pytest.raises(AssertionError):
            _assert_hardened("bad", {**pod, "initContainers": [broken]})
    _assert_hardened("good", pod)


@pytest.mark.parametrize("name", [name for name, _ in _workloads()])
def test_no_workload_serves_on_the_native_grpc_engine(name):
    """pygrpc-native buffers and inflates a whole request before the message limit applies
    (bench/engine_memory.py, docs/performance.md): no manifest may pick it, by flag, variable
    or settings ConfigMap."""
    objects = dict(_workloads())[name]
    chosen = []
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            chosen += [v for k, v in (obj.get("data") or {}).items() if k == "QUORUM_GRPC_ENGINE"]
    for _, pod in _pods(objects):
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            args = [*c.get("command", []), *c.get("args", [])]
            chosen += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--grpc-engine"]
            chosen += [a.split("=", 1)[1] for a in args if a.startswith("--grpc-engine=")]
            chosen += [e.get("value", "") for e in c.get("env", []) if e["name"] == "QUORUM_GRPC_ENGINE"]
    assert "native" not in chosen, f"{name} picks the native gRPC engine"
