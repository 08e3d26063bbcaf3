"""The shipped Prometheus configuration, rules and rule unit tests, checked by promtool."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.helpers import ROOT
from tests.monitoring.tools import DEPLOY, binary


def promtool(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([binary("promtool"), *args], cwd=DEPLOY, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_config_is_valid():
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml").stdout


def test_rules_are_valid():
    out = promtool("check", "rules", "rules/recording.yml", "rules/alerts.yml").stdout
    assert out.count("SUCCESS") == 2


def test_alert_unit_tests_pass():
    assert "SUCCESS" in promtool("test", "rules", "tests/alerts_test.yml").stdout


def _alerts() -> list[dict]:
    groups = yaml.safe_load((DEPLOY / "rules" / "alerts.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


RUNBOOK = ROOT / "docs" / "runbook.md"
ANCHORS = {_slug(line[3:]) for line in RUNBOOK.read_text().splitlines() if line.startswith("## ")}


@pytest.mark.parametrize("rule", _alerts(), ids=lambda r: r["alert"])
def test_every_alert_says_what_fired_and_where_its_runbook_is(rule):
    notes = rule["annotations"]
    assert notes["summary"] and "$labels" in notes["summary"]
    assert "$value" in notes["description"], "the description quotes the value that fired it"
    page, _, anchor = notes["runbook_url"].partition("#")
    assert page == "docs/runbook.md" and anchor in ANCHORS, notes["runbook_url"]
    assert rule["labels"]["severity"] in ("page", "ticket")


def _minutes(duration: str) -> float:
    """A promtool eval_time such as 90m or 7h, in minutes."""
    number, unit = re.fullmatch(r"(\d+)([smh])", duration).groups()
    return int(number) * {"s": 1 / 60, "m": 1, "h": 60}[unit]


def test_every_alert_is_unit_tested_firing_and_resolving():
    cases = [c for t in yaml.safe_load((DEPLOY / "tests" / "alerts_test.yml").read_text())["tests"]
             for c in t.get("alert_rule_test", [])]
    for rule in _alerts():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        fired = [c for c in mine if c["exp_alerts"]]
        assert fired, f"{rule['alert']}: no test where it fires"
        assert any(not c["exp_alerts"] and _minutes(c["eval_time"]) > _minutes(fired[0]["eval_time"])
                   for c in mine), \
            f"{rule['alert']}: no test where it resolves after firing"
        assert all(set(a["exp_annotations"]) == {"summary", "description", "runbook_url"}
                   for c in fired for a in c["exp_alerts"])
