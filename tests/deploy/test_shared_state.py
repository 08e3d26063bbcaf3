"""The shared feedback store's components, rendered as an operator applies them: Redis run
beside Quorum (overlays/cpu-shared-state: a StatefulSet with a PVC, its password from a
Secret, reachable from Quorum's server pods only, the URL and password file wired into the
server's settings) and an external Redis whose URL comes from a Secret
(overlays/cpu-external-state). Every overlay's rendering, schemas and hardening are checked
by test_render, test_security and test_contract like any other."""

from __future__ import annotations

from urllib.parse import urlsplit

from service.objectives.state import describe_url
from tests.deploy.manifests import K8S, container, find, render, settings_data

SHARED = K8S / "overlays" / "cpu-shared-state"
EXTERNAL = K8S / "overlays" / "cpu-external-state"


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_the_redis_component_runs_redis_on_a_pvc_with_a_password_from_a_secret():
    objects = render(SHARED)
    redis = find(objects, "StatefulSet", "quorum-redis")["spec"]
    assert redis["replicas"] == 1 and redis["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    pod = redis["template"]["spec"]
    [c] = pod["containers"]
    assert c["image"].startswith("docker.io/library/redis:7.")
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    password = next(e for e in c["env"] if e["name"] == "REDIS_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"] == {"name": "quorum-redis", "key": "password"}
    args = c["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--maxmemory-policy") + 1] == "volatile-ttl"  # predictions go first, counters never
    assert args[args.index("--appendonly") + 1] == "yes"


def test_quorum_reaches_the_redis_service_with_the_password_file_from_the_same_secret():
    objects = render(SHARED)
    data = settings_data(objects)
    shown, problem = describe_url(data["QUORUM_STATE_URL"])
    assert problem is None, problem
    url = urlsplit(data["QUORUM_STATE_URL"])
    service = find(objects, "Service", "quorum-redis")
    assert url.hostname == service["metadata"]["name"] and url.port == service["spec"]["ports"][0]["port"]
    redis = find(objects, "StatefulSet", "quorum-redis")["spec"]
    assert _matches({"matchLabels": service["spec"]["selector"]}, redis["template"]["metadata"]["labels"])
    pod = find(objects, "Deployment", "quorum")["spec"]["template"]["spec"]
    path = data["QUORUM_STATE_PASSWORD_FILE"]
    [mount] = [m for m in container(objects)["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]
    assert volume["secretName"] == "quorum-redis"
    assert [i["path"] for i in volume["items"] if i["key"] == "password"] == [path.rsplit("/", 1)[1]]


def test_only_quorum_server_pods_reach_redis():
    objects = render(SHARED)
    policy = find(objects, "NetworkPolicy", "quorum-redis")["spec"]
    redis_labels = find(objects, "StatefulSet", "quorum-redis")["spec"]["template"]["metadata"]["labels"]
    server_labels = find(objects, "Deployment", "quorum")["spec"]["template"]["metadata"]["labels"]
    assert _matches(policy["podSelector"], redis_labels) and policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    [source] = rule["from"]
    assert list(source) == ["podSelector"] and _matches(source["podSelector"], server_labels)
    assert not _matches(source["podSelector"], redis_labels)
    assert [p["port"] for p in rule["ports"]] == ["redis"]
    for service in (o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] != "quorum-redis"):
        assert not all(redis_labels.get(k) == v for k, v in service["spec"]["selector"].items()), \
            f"Service {service['metadata']['name']} would send clients to Redis"


def test_an_external_redis_url_comes_from_a_secret_and_no_redis_runs():
    objects = render(EXTERNAL)
    env = next(e for e in container(objects)["env"] if e["name"] == "QUORUM_STATE_URL")
    assert env["valueFrom"]["secretKeyRef"] == {"name": "quorum-state", "key": "url"}
    assert "QUORUM_STATE_URL" not in settings_data(objects)  # never in a ConfigMap: it may hold a password
    assert not [o for o in objects if o["kind"] == "StatefulSet"]


def test_other_overlays_keep_the_in_process_store():
    for overlay in sorted(p for p in (K8S / "overlays").iterdir() if p not in (SHARED, EXTERNAL)):
        objects = render(overlay)
        assert not {k for k in settings_data(objects) if k.startswith("QUORUM_STATE")}, overlay.name
