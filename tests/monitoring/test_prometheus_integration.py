"""The real server scraped by a real Prometheus: every PromQL expression of the Grafana
dashboard and of the rule files must parse and return data.

Expressions that stay empty by design in this setting are listed in EMPTY_HERE and only
have to parse: GPU series (absent without NVML, by design: absent, not zero).
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from service._proto.quorum.v1 import ensemble_pb2, ensemble_pb2_grpc
from service.runtimes.devices import gpu_count
from tests.helpers import free_port
from tests.monitoring.tools import DASHBOARD, DEPLOY, binary
from tests.server import running_server

EMPTY_HERE = ("quorum_gpu_",) if gpu_count() == 0 else ()  # GPU series need a GPU
# A static scrape has no namespace/pod labels; ".*" also matches a missing label, as the
# dashboard's "All" does.
SUBSTITUTIONS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m",
                 "$model": "digits|digits_slo|digits_mlp_a", "$variant": "digits_mlp_a",
                 "$namespace": ".*", "$pod": ".*"}
COMPARISON = re.compile(r" (>=|<=|==|!=|>|<) (?!bool )")


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:  # label_values(series, label) -> its series
        if var["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((\w+(?:\{[^}]*\})?), (\w+)\)", var["query"])
        assert match, f"variable {var['name']}: unexpected query {var['query']!r}"
        exprs.append(f"count by ({match[2]}) ({match[1]})")
    return exprs


def rule_queries() -> list[str]:
    exprs = []
    for name in ("recording.yml", "alerts.yml"):
        for group in yaml.safe_load((DEPLOY / "rules" / name).read_text())["groups"]:
            for rule in group["rules"]:
                expr = rule["expr"].strip()
                if "alert" in rule:  # the condition as 0/1 for every series, firing or not
                    expr = COMPARISON.sub(r" \1 bool ", expr)
                exprs.append(expr)
    return exprs


def substitute(expr: str) -> str:
    for key in sorted(SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(key, SUBSTITUTIONS[key])
    return expr


def query(port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def start_prometheus(tmp_path: Path, metrics_port: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "rules" / "recording.yml"), str(DEPLOY / "rules" / "alerts.yml")],
        "scrape_configs": [{"job_name": "quorum", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "wb")
    process = subprocess.Popen(
        [binary("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2)
            return process, port
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise TimeoutError((tmp_path / "prometheus.log").read_text()[-3000:])


def send_traffic(address: str, stop: threading.Event, problems: list[str]) -> None:
    """Well-formed and bad requests until `stop`; anything unexpected lands in `problems`
    (an assertion in this thread would only end the thread, never fail the test)."""
    try:
        _traffic(address, stop)
    except Exception as exc:  # reported by the test's own thread
        problems.append(f"{type(exc).__name__}: {exc}")


def _traffic(address: str, stop: threading.Event) -> None:
    import grpc
    import tritonclient.grpc as triton
    from sklearn.datasets import load_digits
    from tritonclient.utils import InferenceServerException

    x = load_digits().data.astype(np.float32)
    client = triton.InferenceServerClient(address)
    channel = grpc.insecure_channel(address)
    quorum = ensemble_pb2_grpc.EnsembleServiceStub(channel)
    rng = np.random.default_rng(0)
    while not stop.is_set():
        for model in ("digits", "digits_mlp_a"):
            rows = x[rng.choice(len(x), 8)]
            tensor = triton.InferInput("pixels", list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows)
            client.infer(model, [tensor])
        for bad, code in (("no_such_model", "NOT_FOUND"), ("digits", "INVALID_ARGUMENT")):  # FP64 input
            tensor = triton.InferInput("pixels", [1, 64], "FP64")
            tensor.set_data_from_numpy(np.zeros((1, 64)))
            try:
                client.infer(bad, [tensor])
            except InferenceServerException as exc:
                if code not in str(exc.status()):
                    raise AssertionError(f"{bad}: expected {code}, got {exc.status()}: {exc}") from exc
            else:
                raise AssertionError(f"{bad}: an FP64 request was answered")
        rows = x[rng.choice(len(x), 4)]
        answer = quorum.Predict(ensemble_pb2.PredictRequest(  # sets and abstentions: live coverage and risk
            model="digits", inputs=ensemble_pb2.Tensor(dtype="FP32", shape=list(rows.shape), content=rows.tobytes()),
            coverage=0.9, max_risk=0.05))
        quorum.Feedback(ensemble_pb2.FeedbackRequest(labels=[
            ensemble_pb2.FeedbackRequest.Label(request_id=answer.request_id, row=i, label=p.label)
            for i, p in enumerate(answer.predictions)]))
        stop.wait(0.2)
    channel.close()


@pytest.mark.timeout(300)
def test_every_dashboard_and_rule_query_returns_data(tmp_path):
    env = {"QUORUM_DRIFT_INTERVAL": "1", "QUORUM_DRIFT_MIN_ROWS": "20", "QUORUM_DRIFT_WINDOW": "200"}
    with running_server(tmp_path, env=env) as server:
        prometheus, port = start_prometheus(tmp_path, server.metrics_port)
        stop, problems = threading.Event(), []
        traffic = threading.Thread(target=send_traffic, args=(server.address, stop, problems), daemon=True)
        traffic.start()
        try:
            exprs = [substitute(e) for e in dashboard_queries() + rule_queries()]
            assert len(exprs) > 60
            pending = {e: None for e in exprs}
            end = time.monotonic() + 120  # a bound for a stuck scrape; queries pass once their data is in
            while pending and time.monotonic() < end:
                assert not problems, f"traffic failed: {problems}"
                for expr in list(pending):
                    answer = query(port, expr)
                    assert answer["status"] == "success", (expr, answer)
                    if answer["data"]["result"] or expr.startswith(EMPTY_HERE) or any(
                            f"{p}" in expr for p in EMPTY_HERE):
                        del pending[expr]
                    else:
                        pending[expr] = answer
                time.sleep(1)
            assert not pending, "queries without data:\n" + "\n".join(pending)
            assert not problems and traffic.is_alive(), f"traffic failed: {problems}"
            target = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets").read())
            assert target["data"]["activeTargets"][0]["health"] == "up"
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
            # GPU series: absent (not zero) on a host without one, there on a GPU host
            assert ("quorum_gpu_memory_total_bytes" in metrics) == (gpu_count() > 0)
            assert 'quorum_requests_total{api="kserve_v2",code="NOT_FOUND",method="ModelInfer",model="unknown"}' in metrics
        finally:
            stop.set()
            traffic.join(timeout=10)
            prometheus.terminate()
            prometheus.wait(timeout=30)
