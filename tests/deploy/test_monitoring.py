"""The PrometheusRule and the dashboard ConfigMap are the files in deploy/prometheus/rules/
and deploy/grafana/, read at test time: after changing those, run
`.venv/bin/python deploy/k8s/sync_monitoring.py`."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from tests.deploy.manifests import DEPLOY, K8S, OVERLAYS, base_metric, find, metric_catalogue, render

SYNC = "run `.venv/bin/python deploy/k8s/sync_monitoring.py` and commit its output"


def _sync_module():
    spec = importlib.util.spec_from_file_location("sync_monitoring", K8S / "sync_monitoring.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_prometheus_rule_groups_equal_the_rule_files(overlay):
    sources = sorted((DEPLOY / "prometheus" / "rules").glob("*.y*ml"))
    expected = [g for p in sources for g in (yaml.safe_load(p.read_text()) or {}).get("groups") or []]
    rule = find(render(overlay), "PrometheusRule", "quorum")
    assert rule["spec"]["groups"] == expected, SYNC


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_dashboard_configmap_equals_the_dashboards(overlay):
    sources = {p.name: p.read_text() for p in sorted((DEPLOY / "grafana").glob("*.json"))}
    config_map = find(render(overlay), "ConfigMap", "quorum-dashboards")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map.get("data", {}) == sources, SYNC


def test_the_generated_files_are_current():
    sync = _sync_module()
    assert (K8S / "base" / "prometheusrule.yaml").read_text() == sync.prometheus_rule(), SYNC
    assert (K8S / "base" / "dashboards" / "kustomization.yaml").read_text() == sync.dashboards_kustomization(), SYNC


def test_service_monitor_scrapes_what_the_rules_and_dashboards_read():
    """Every quorum_* family the alerts use exists in the server's catalogue."""
    catalogue = metric_catalogue()
    assert catalogue, "no metric catalogue (service/monitoring/*.py, docs/metrics.md)"
    families = {base_metric(n) for n in catalogue}
    rule = find(render(OVERLAYS[0]), "PrometheusRule", "quorum")
    import re

    used = {base_metric(n) for g in rule["spec"]["groups"] for r in g["rules"]
            for n in re.findall(r"(?<![:\w])quorum_[a-z0-9_]+", r["expr"])}
    assert used <= families, f"alert expressions use metrics the server does not export: {used - families}"
