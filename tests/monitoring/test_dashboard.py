"""The Grafana dashboard as a reader meets it: every panel explained, with units, thresholds,
value mappings and the scales it promises, filterable per namespace, pod and model; a valid
Grafana model (a round trip through Grafana's own SDK keeps it unchanged). Whether each query
returns data is checked against a real Prometheus in test_prometheus_integration.py."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard

from tests.monitoring.tools import DASHBOARD

BOARD = json.loads(DASHBOARD.read_text())
PANELS = [p for p in BOARD["panels"] if p["type"] != "row"]
ROWS = [p["title"] for p in BOARD["panels"] if p["type"] == "row"]


def _generator():
    path = DASHBOARD.parent / "build_dashboard.py"
    spec = importlib.util.spec_from_file_location("build_dashboard", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_file_is_what_the_generator_writes():
    assert DASHBOARD.read_text() == _generator().render(), \
        "run `.venv/bin/python deploy/grafana/build_dashboard.py` and commit its output"


def test_a_round_trip_through_grafanas_dashboard_model_changes_nothing():
    """Fields Grafana's model does not know would be dropped (or mistyped ones rejected)."""
    again = json.loads(JSONEncoder(sort_keys=True).encode(Dashboard.from_json(BOARD)))
    assert again == BOARD


def test_rows_come_in_the_order_an_on_call_engineer_reads():
    assert ROWS[:2] == ["Errors and saturation", "Latency by stage"]
    assert ROWS.index("Objective and live accuracy") < ROWS.index("Drift")


@pytest.mark.parametrize("panel", PANELS, ids=lambda p: p["title"])
def test_every_panel_explains_itself_and_has_a_unit(panel):
    assert len(panel.get("description", "")) >= 60, "a description of what it shows and what to do"
    assert panel["fieldConfig"]["defaults"].get("unit"), "a unit"
    assert panel["targets"], "at least one query"


@pytest.mark.parametrize("panel", [p for p in PANELS if p["type"] == "stat"], ids=lambda p: p["title"])
def test_stat_panels_have_thresholds_and_binary_ones_value_mappings(panel):
    defaults = panel["fieldConfig"]["defaults"]
    assert len(defaults["thresholds"]["steps"]) >= 2
    if defaults["unit"] == "none":  # a 0/1 state: each value gets a word and a colour
        options = defaults["mappings"][0]["options"]
        assert {"0", "1"} <= set(options) and options["0"]["color"] != options["1"]["color"]
        assert all(o["text"] for o in options.values())


@pytest.mark.parametrize("panel", PANELS, ids=lambda p: p["title"])
def test_promised_log_scales_and_threshold_lines_are_there(panel):
    custom = panel["fieldConfig"]["defaults"].get("custom") or {}
    text = panel["description"].lower()
    if "log scale" in text:
        assert custom.get("scaleDistribution", {}).get("type") == "log"
    if re.search(r"\bline at\b|\blines? mark\b|\(red line\)|red line\)", text):
        assert custom.get("thresholdsStyle", {}).get("mode") == "line"
        assert len(panel["fieldConfig"]["defaults"]["thresholds"]["steps"]) >= 2


def test_cores_and_bytes_never_share_an_axis():
    for panel in PANELS:
        exprs = " ".join(t["expr"] for t in panel["targets"])
        assert not ("process_cpu_seconds_total" in exprs and "memory" in exprs), panel["title"]


def test_template_variables_select_namespace_pod_and_model():
    names = [v["name"] for v in BOARD["templating"]["list"]]
    assert {"datasource", "namespace", "pod", "model"} <= set(names)


@pytest.mark.parametrize("panel", PANELS, ids=lambda p: p["title"])
def test_every_query_can_be_narrowed_to_one_pod(panel):
    for target in panel["targets"]:
        assert 'namespace=~"$namespace"' in target["expr"] and 'pod=~"$pod"' in target["expr"], target["expr"]
        assert target["datasource"]["uid"] == "${datasource}"


def test_some_panels_break_down_by_pod():
    by_pod = [p["title"] for p in PANELS if any("by (pod" in t["expr"] or "{{pod}}" in t.get("legendFormat", "")
                                                 for t in p["targets"])]
    assert len(by_pod) >= 5, by_pod


def test_panels_fit_the_grid_without_overlapping():
    ids = [p["id"] for p in BOARD["panels"]]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for p in BOARD["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, p["title"]
        taken |= cells
