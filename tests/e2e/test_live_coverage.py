"""Live coverage and live risk from ground truth, on a real server: the answers' prediction sets
and abstentions are kept with the predictions, the labels fed back count them (Prometheus
counters, GetStatus), and the shipped rules and alerts judge them. In-distribution traffic
(the digits test split) keeps the promise; the drift scenario (inverted images) breaks it, and
QuorumLiveCoverageBelowTarget fires in a promtool rule test fed with the counters the server
exported for each scenario. The expected counts come from the sets the clients received and
the true labels, not from the server's counting."""

from __future__ import annotations

import subprocess
import urllib.request

import grpc
import numpy as np
import pytest
import yaml

from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from tests.e2e.fixtures import ENSEMBLE, module_server
from tests.monitoring.tools import DEPLOY, binary

COVERAGE, RISK = 0.9, 0.05
NAMES = ("labelled_rows", "covered_rows", "coverage_asked", "coverage_variance")
RISK_NAMES = ("answered_rows", "errors", "risk_asked", "risk_variance")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with module_server(tmp_path_factory, "live-coverage") as s:
        yield s


def _counters(server) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith(("quorum_conformal_", "quorum_selective_")) and "_total{" in line:
            name, rest = line.split("_total{", 1)
            model = rest.split('model="', 1)[1].split('"', 1)[0]
            found[name.split("_", 2)[2], model] = float(line.rsplit(" ", 1)[1])
    return found


def _predict_and_label(server, x: np.ndarray, y: np.ndarray, request_id: str) -> pb.PredictResponse:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EnsembleServiceStub(channel)
        response = stub.Predict(pb.PredictRequest(
            model=ENSEMBLE, request_id=request_id, coverage=COVERAGE, max_risk=RISK,
            inputs=pb.Tensor(dtype="FP32", shape=list(x.shape), content=np.ascontiguousarray(x).tobytes())),
            timeout=30)
        reply = stub.Feedback(pb.FeedbackRequest(labels=[
            pb.FeedbackRequest.Label(request_id=request_id, row=i, label=str(label)) for i, label in enumerate(y)]),
            timeout=30)
    assert reply.accepted == len(y)
    return response


def _expected(response: pb.PredictResponse, y: np.ndarray) -> dict[str, float]:
    """What the counters must have added, from what the client received and the truth."""
    covered = sum(str(label) in p.prediction_set for p, label in zip(response.predictions, y))
    answered = [(p.label != str(label)) for p, label in zip(response.predictions, y) if not p.abstained]
    return {"labelled_rows": len(y), "covered_rows": covered, "coverage_asked": COVERAGE * len(y),
            "coverage_variance": COVERAGE * (1 - COVERAGE) * len(y), "answered_rows": len(answered),
            "errors": sum(answered), "risk_asked": RISK * len(answered),
            "risk_variance": RISK * (1 - RISK) * len(answered)}


def _promtool_fires(counts: dict[str, float], tmp_path) -> bool:
    """Whether QuorumLiveCoverageBelowTarget fires on a pod that labels this scenario's mix of
    rows every minute for two hours (the shipped recording and alerting rules, through promtool)."""
    series = [{"series": f'quorum_conformal_{name}_total{{model="digits",instance="quorum-0:8502",job="quorum"}}',
               "values": f"0+{counts[name]}x120"} for name in NAMES]
    test = {"rule_files": [str(DEPLOY / "rules" / "recording.yml"), str(DEPLOY / "rules" / "alerts.yml")],
            "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": [
                {"eval_time": "90m", "alertname": "QuorumLiveCoverageBelowTarget", "exp_alerts": []}]}]}
    path = tmp_path / "live_coverage_test.yml"
    path.write_text(yaml.safe_dump(test))
    done = subprocess.run([binary("promtool"), "test", "rules", str(path)], capture_output=True, text=True,
                          timeout=60)
    if done.returncode == 0:
        return False  # matched "no alert"
    assert "QuorumLiveCoverageBelowTarget" in done.stdout + done.stderr, done.stdout + done.stderr
    return True


def test_in_distribution_rows_keep_the_promise_and_inverted_ones_break_it(server, test_split, tmp_path):
    x, y = test_split
    before = _counters(server)
    in_distribution = _predict_and_label(server, x, y, "live-in-distribution")
    after_in = _counters(server)
    inverted = _predict_and_label(server, 16 - x, y, "live-inverted")
    after_inverted = _counters(server)
    for scenario, (start, end, response) in {"in-distribution": (before, after_in, in_distribution),
                                            "inverted": (after_in, after_inverted, inverted)}.items():
        added = {name: end.get((name, ENSEMBLE), 0) - start.get((name, ENSEMBLE), 0) for name in NAMES + RISK_NAMES}
        expected = _expected(response, y)
        assert added == pytest.approx(expected), scenario
    held = {n: after_in[n, ENSEMBLE] - before.get((n, ENSEMBLE), 0) for n in NAMES}
    broken = {n: after_inverted[n, ENSEMBLE] - after_in[n, ENSEMBLE] for n in NAMES}
    assert held["covered_rows"] / held["labelled_rows"] >= 0.85  # the promise, on rows like the validation rows
    assert broken["covered_rows"] / broken["labelled_rows"] < 0.6  # inverted digits: far from it
    print(f"coverage asked {COVERAGE}: in-distribution {held['covered_rows'] / held['labelled_rows']:.3f}, "
          f"inverted {broken['covered_rows'] / broken['labelled_rows']:.3f}")
    assert not _promtool_fires(held, tmp_path)
    assert _promtool_fires(broken, tmp_path)


def test_get_status_shows_the_live_coverage_and_risk(server, test_split):
    x, y = test_split
    response = _predict_and_label(server, x[:100], y[:100], "live-status")
    with grpc.insecure_channel(server.address) as channel:
        status = pb_grpc.EnsembleServiceStub(channel).GetStatus(pb.GetStatusRequest(model=ENSEMBLE),
                                                                  timeout=30).models[0].uncertainty
    assert status.HasField("live_coverage") and status.HasField("live_risk")
    # the window holds every labelled row of this module's tests (fewer than its 1,000)
    assert status.live_set_rows >= 100 and 0 <= status.live_coverage <= 1
    expected = _expected(response, y[:100])
    assert status.live_answered_rows >= expected["answered_rows"]
