"""Ground truth that finds its prediction on any replica (issue 38): two real `quorum serve`
processes sharing a real redis-server (--state-url), called with stock clients.

Predict on A (quorum.v1, and KServe v2 with a request id through tritonclient), Feedback on B:
accepted, and both servers' GetStatus and /metrics agree on the fleet's live accuracy; the
per-pod counters summed over both equal the rows labelled. A server restarted between Predict
and Feedback still accepts the label. Redis stopped under mixed traffic: no inference error,
Feedback UNAVAILABLE naming the store, the unstored-prediction counter rising; Redis back:
Feedback works again without restarting Quorum. A label after --state-ttl is unknown. Each
test labels its own model, so that the module's shared counters stay each test's own."""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from tests.redis_server import running_redis
from tests.server import running_server

REFRESH = ["--state-refresh", "0.2"]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def pair(tmp_path_factory, redis_server, grpc_engine):
    folder = tmp_path_factory.mktemp("replicas")
    args = ["--state-url", redis_server.url, *REFRESH]
    with running_server(folder, args=args) as a, running_server(folder, args=args) as b:
        yield a, b


def stub(server) -> pb_grpc.EnsembleServiceStub:
    return pb_grpc.EnsembleServiceStub(grpc.insecure_channel(server.address))


def until(condition, what: str, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < end, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def predict(server, model: str, rows: np.ndarray, request_id: str) -> pb.PredictResponse:
    return stub(server).Predict(pb.PredictRequest(
        model=model, request_id=request_id, return_member_votes=True,
        inputs=pb.Tensor(dtype="FP32", shape=list(rows.shape), content=rows.tobytes())), timeout=10)


def metric(server, name: str, **labels: str) -> float:
    """The sum of a series' samples whose labels include `labels` (0 when absent)."""
    return metric_at(server.metrics_port, name, **labels)


def metric_at(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = 0.0
    for match in re.finditer(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def stored(redis_server, *ids: str) -> bool:
    client = redis_server.client()
    return all(client.exists(f"quorum:p:{i}") for i in ids)


def test_predict_on_one_replica_feedback_on_the_other(pair, redis_server, test_split):
    a, b = pair
    x, y = test_split
    answers, labels, ids = [], [], []
    for i in range(0, 40, 4):  # quorum.v1 on A, four rows a request
        response = predict(a, "digits", x[i:i + 4], f"v1-{i}")
        answers += [(p.class_index, {v.member: v.class_index for v in p.member_votes}) for p in response.predictions]
        labels += [pb.FeedbackRequest.Label(request_id=f"v1-{i}", row=r, label=str(y[i + r])) for r in range(4)]
        ids.append(f"v1-{i}")
    client = grpcclient.InferenceServerClient(a.address)  # KServe v2 with a request id, on A too
    tensor = grpcclient.InferInput("pixels", [4, 64], "FP32")
    tensor.set_data_from_numpy(x[40:44])
    result = client.infer("digits", [tensor], request_id="v2-40")
    answers += [(int(c), None) for c in result.as_numpy("class_index")]
    labels += [pb.FeedbackRequest.Label(request_id="v2-40", row=r, label=str(y[40 + r])) for r in range(4)]
    until(lambda: stored(redis_server, *ids, "v2-40"), "the predictions are in Redis")

    bad = [pb.FeedbackRequest.Label(request_id="v1-0", row=4, label="1"),  # no such row
           pb.FeedbackRequest.Label(request_id="v1-0", row=0, label="cat"),  # no such label
           pb.FeedbackRequest.Label(request_id="never-sent", row=0, label="1")]
    reply = stub(b).Feedback(pb.FeedbackRequest(labels=labels + bad), timeout=10)
    assert (reply.accepted, reply.rejected, list(reply.unknown_ids)) == (44, 2, ["never-sent"])
    again = stub(a).Feedback(pb.FeedbackRequest(labels=labels[:3]), timeout=10)  # each row counts once, fleet-wide
    assert (again.accepted, again.rejected) == (0, 3)

    truth = np.asarray(y[:44])
    expected = float(np.mean([c for c, _ in answers] == truth))

    def status(server):
        [s] = stub(server).GetStatus(pb.GetStatusRequest(model="digits"), timeout=10).models
        return s if s.live_samples == 44 else None
    statuses = [until(lambda s=s: status(s), "both replicas see the 44 labels") for s in (a, b)]
    for s in statuses:
        assert s.live_accuracy == pytest.approx(expected)
        assert {m.member: (m.live_samples, round(m.live_accuracy, 6)) for m in s.member_stats} == \
               {m.member: (m.live_samples, round(m.live_accuracy, 6)) for m in statuses[0].member_stats}
    for member in statuses[0].member_stats:  # the members' own votes, on the 40 quorum.v1 rows and the v2 rows
        assert member.live_samples == 44
    for server in (a, b):
        until(lambda server=server: metric(server, "quorum_live_accuracy_samples", model="digits", member="") == 44,
              "/metrics shows the fleet's window")
        assert metric(server, "quorum_live_accuracy", model="digits", member="") == pytest.approx(expected)
    labelled = sum(metric(s, "quorum_feedback_labelled_rows_total", model="digits", member="") for s in (a, b))
    correct = sum(metric(s, "quorum_feedback_correct_rows_total", model="digits", member="") for s in (a, b))
    assert (labelled, correct) == (44, round(expected * 44))
    assert metric(b, "quorum_feedback_labelled_rows_total", model="digits", member="") == 44  # B accepted them
    fleet = redis_server.client().hgetall("quorum:c:digits")
    assert int(fleet[b"labelled||1"]) == 44 and int(fleet[b"correct||1"]) == round(expected * 44)


def test_a_server_restarted_between_predict_and_feedback_still_accepts_the_label(tmp_path, redis_server, test_split):
    x, y = test_split
    args = ["--state-url", redis_server.url, *REFRESH]
    with running_server(tmp_path, args=args) as first:
        predict(first, "digits_mlp_a", x[:2], "before-restart")
        assert first.stop() == 0  # SIGTERM: what was recorded is written before it exits
    assert stored(redis_server, "before-restart")
    with running_server(tmp_path, args=args) as again:
        labels = [pb.FeedbackRequest.Label(request_id="before-restart", row=r, label=str(y[r])) for r in range(2)]
        reply = stub(again).Feedback(pb.FeedbackRequest(labels=labels), timeout=10)
        assert reply.accepted == 2 and not reply.unknown_ids


def test_workers_of_one_pod_share_the_store(tmp_path, redis_server, test_split):
    """--workers 2: each connection lands on one worker; with the shared store a label sent
    over any connection finds its prediction, whichever worker answered it."""
    x, y = test_split
    with running_server(tmp_path, args=["--workers", "2", "--state-url", redis_server.url, *REFRESH]) as server:
        until(lambda: server.output().count("feedback store: redis://") == 2, "both workers use the store")
        ids = []
        for i in range(24):  # a new connection each time: the kernel spreads them over the workers
            with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                pb_grpc.EnsembleServiceStub(ch).Predict(pb.PredictRequest(
                    model="digits_logreg", request_id=f"worker-{i}", inputs=pb.Tensor(
                        dtype="FP32", shape=[1, 64], content=x[i:i + 1].tobytes())), timeout=10)
                ids.append(f"worker-{i}")
        served = [metric_at(server.metrics_port + w, "quorum_requests_total", method="Predict", code="OK")
                  for w in range(2)]
        assert sum(served) == 24 and min(served) > 0, served  # both workers answered some
        until(lambda: stored(redis_server, *ids), "every prediction stored")
        labels = [pb.FeedbackRequest.Label(request_id=i, row=0, label=str(y[n])) for n, i in enumerate(ids)]
        for worker_channel in range(2):  # two connections: likely each worker, either way all accepted once
            with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                reply = pb_grpc.EnsembleServiceStub(ch).Feedback(pb.FeedbackRequest(labels=labels), timeout=10)
            assert (reply.accepted, reply.rejected) == ((24, 0) if worker_channel == 0 else (0, 24))


def test_a_label_for_an_expired_prediction_is_unknown(tmp_path, redis_server, test_split):
    x, y = test_split
    with running_server(tmp_path, args=["--state-url", redis_server.url, "--state-ttl", "1"]) as server:
        predict(server, "digits_cnn_a", x[:1], "expires")
        until(lambda: stored(redis_server, "expires"), "the prediction is stored")
        assert 0 < redis_server.client().pttl("quorum:p:expires") <= 1000
        until(lambda: not stored(redis_server, "expires"), "Redis expires it after --state-ttl")
        reply = stub(server).Feedback(pb.FeedbackRequest(labels=[
            pb.FeedbackRequest.Label(request_id="expires", row=0, label=str(y[0]))]), timeout=10)
        assert reply.accepted == 0 and list(reply.unknown_ids) == ["expires"]


def test_redis_down_under_mixed_traffic_then_back(pair, redis_server, test_split):
    a, b = pair
    x, y = test_split
    errors: list[BaseException] = []
    answered = [0]
    stop = threading.Event()

    def traffic(server, n: int):
        client = grpcclient.InferenceServerClient(server.address)
        tensor = grpcclient.InferInput("pixels", [1, 64], "FP32")
        tensor.set_data_from_numpy(x[:1])
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if i % 2:
                    predict(server, "digits_logreg", x[:1], f"mixed-{n}-{i}")
                else:
                    client.infer("digits_logreg", [tensor], request_id=f"mixed-v2-{n}-{i}")
                answered[0] += 1
            except Exception as exc:  # any inference error fails the test
                errors.append(exc)

    threads = [threading.Thread(target=traffic, args=(s, n), daemon=True) for n, s in enumerate((a, b))]
    for t in threads:
        t.start()
    try:
        predict(a, "digits_logreg", x[:1], "outage-before")
        until(lambda: stored(redis_server, "outage-before"), "a prediction stored before the outage")
        redis_server.stop()
        label = pb.FeedbackRequest.Label(request_id="outage-before", row=0, label=str(y[0]))
        with pytest.raises(grpc.RpcError) as err:
            stub(b).Feedback(pb.FeedbackRequest(labels=[label]), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"the feedback store {redis_server.url} is unavailable" in err.value.details()
        first = until(lambda: metric(a, "quorum_feedback_unstored_predictions_total"), "A counts unstored predictions")
        until(lambda: metric(a, "quorum_feedback_unstored_predictions_total") > first, "the count rising")
        until(lambda: metric(b, "quorum_feedback_unstored_predictions_total") > 0, "B counts them too")
        assert metric(a, "quorum_feedback_store_up", store=redis_server.url) == 0
        redis_server.start()  # the same port, empty: what it held is gone, new predictions are kept

        def accepted_again():
            predict(a, "digits_logreg", x[:1], "outage-after")
            if not stored(redis_server, "outage-after"):
                return False
            return stub(b).Feedback(pb.FeedbackRequest(labels=[
                pb.FeedbackRequest.Label(request_id="outage-after", row=0, label=str(y[0]))]), timeout=10).accepted
        assert until(accepted_again, "Feedback accepted once Redis is back") == 1
        until(lambda: metric(a, "quorum_feedback_store_up", store=redis_server.url) == 1, "the store up again")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[:3]
    assert answered[0] > 0
    assert "predictions are not being stored" in a.output()


def test_a_frozen_redis_never_holds_a_request(pair, redis_server, test_split):
    """Redis that stops answering without closing its connections (SIGSTOP: a stall, a full
    disk, a failover in progress): Predict answers as before, Feedback gives up with
    UNAVAILABLE, and both recover when Redis answers again, with what it held."""
    a, b = pair
    x, y = test_split
    predict(a, "digits_mlp_a", x[:1], "frozen-before")
    until(lambda: stored(redis_server, "frozen-before"), "stored before the stall")
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        slowest = 0.0
        for i in range(40):  # about a second of requests at least, the writer's timeout
            start = time.monotonic()
            predict(a if i % 2 else b, "digits_mlp_a", x[:1], f"frozen-{i}")
            slowest = max(slowest, time.monotonic() - start)
        until(lambda: metric(a, "quorum_feedback_unstored_predictions_total") > 0
              and metric(b, "quorum_feedback_unstored_predictions_total") > 0, "both count unstored predictions")
        with pytest.raises(grpc.RpcError) as err:
            stub(b).Feedback(pb.FeedbackRequest(labels=[
                pb.FeedbackRequest.Label(request_id="frozen-before", row=0, label=str(y[0]))]), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"the feedback store {redis_server.url} is unavailable" in err.value.details()
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert slowest < 1.0, f"a Predict took {slowest:.2f} s while Redis was frozen"  # the writer waits 1 s; no request does

    def labelled_again():
        return stub(b).Feedback(pb.FeedbackRequest(labels=[
            pb.FeedbackRequest.Label(request_id="frozen-before", row=0, label=str(y[0]))]), timeout=10).accepted
    assert until(labelled_again, "the label accepted once Redis answers") == 1


def test_a_feedback_call_beyond_the_label_limit_is_refused_naming_it(pair):
    a, _ = pair
    labels = [pb.FeedbackRequest.Label(request_id="x" * 8, row=0, label="1")] * 500_000  # ~10 MB
    with pytest.raises(grpc.RpcError) as err:
        stub(a).Feedback(pb.FeedbackRequest(labels=labels), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "500000 labels, more than the limit of 100000" in err.value.details()
    assert "--max-feedback-labels" in err.value.details()
    assert a.health() == 1  # SERVING


@pytest.mark.parametrize("url, why", [("http://cache:6379/0", "malformed"), ("redis://127.0.0.1:{closed}/0",
                                                                            "unreachable")])
def test_a_bad_state_url_at_start_is_one_line_then_serving_or_refused(tmp_path, url, why):
    from tests.helpers import free_port
    url = url.format(closed=free_port())
    with running_server(tmp_path, args=["--state-url", url]) as server:
        lines = [line for line in server.output().splitlines() if "feedback store" in line]
        assert len(lines) == 1 and why in lines[0] and "--state-url" in lines[0], lines
        with pytest.raises(grpc.RpcError) as err:
            stub(server).Feedback(pb.FeedbackRequest(labels=[
                pb.FeedbackRequest.Label(request_id="r", row=0, label="1")]), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "feedback store" in err.value.details()
    with running_server(tmp_path, args=["--state-url", url, "--state-required"], wait=False) as refused:
        # a URL that can never work is a setting to fix (2), checked before any port; an
        # unreachable store is a failure to start (1)
        assert refused.process.wait(timeout=60) == (2 if why == "malformed" else 1)
        out = refused.output()
        assert why in out and "--state-required" in out and "Traceback" not in out, out[-2000:]
        if why == "malformed":
            assert out.strip().splitlines() == [
                f"quorum serve: feedback store {url} (--state-url, QUORUM_STATE_URL): malformed: the scheme must be "
                "redis:// or rediss:// (TLS), not 'http' (--state-required)"]
