"""The shipped Prometheus configuration, rules and rule unit tests, checked by promtool."""

from __future__ import annotations

import subprocess

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
