"""Quorum's own quorum.v1.EnsembleService, with its generated stubs, against a real server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from tests.e2e.fixtures import ENSEMBLE, MEMBER, Reference, repository_models, vote_temperatures

MEMBERS = Reference().ensemble_config(ENSEMBLE)["members"]  # in ensemble.yaml's order


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.EnsembleServiceStub(channel)


@pytest.fixture(scope="module")
def reference(server):
    return Reference(vote_temperatures=vote_temperatures(server))


@pytest.fixture(scope="module")
def data(test_split):
    x, y = test_split
    return x[:20], y[:20]


def _request(model: str, pixels: np.ndarray, **fields) -> pb.PredictRequest:
    tensor = pb.Tensor(dtype="FP32", shape=list(pixels.shape),
                       content=np.ascontiguousarray(pixels, dtype="<f4").tobytes())
    return pb.PredictRequest(model=model, inputs=tensor, **fields)


def test_predict_with_member_votes(stub, reference, data):
    pixels, _ = data
    response = stub.Predict(_request(ENSEMBLE, pixels, return_member_votes=True, request_id="q-1"), timeout=30)
    assert response.request_id == "q-1" and response.model == ENSEMBLE
    assert response.policy == pb.VOTING_POLICY_STACKED  # the ensemble.yaml policy
    assert not response.members_left_out
    expected = reference.vote(ENSEMBLE, pixels)
    labels = reference.labels(ENSEMBLE)
    assert len(response.predictions) == pixels.shape[0]
    for row, prediction in enumerate(response.predictions):
        np.testing.assert_allclose(prediction.probabilities, expected.probabilities[row], atol=1e-6)
        assert prediction.class_index == expected.label_index[row]
        assert prediction.label == labels[prediction.class_index]
        assert prediction.confidence == pytest.approx(max(prediction.probabilities), abs=1e-6)
        votes = prediction.member_votes
        assert [v.member for v in votes] == MEMBERS
        assert all(v.in_time and v.version == 1 and v.latency_ms > 0 for v in votes)
        assert sum(v.weight for v in votes) == pytest.approx(1.0, abs=1e-6)
        for m, v in enumerate(votes):
            member_probs = reference.member(v.member).probabilities(pixels[row:row + 1])[0]
            assert v.class_index == int(np.argmax(member_probs)) == expected.member_labels[m, row]
            assert v.label == labels[v.class_index]
            assert v.confidence == pytest.approx(member_probs.max(), abs=1e-6)
            assert v.weight == pytest.approx(expected.member_weights[m, row], abs=1e-6)
        agreeing = [v.class_index == prediction.class_index for v in votes]
        assert prediction.agreement == pytest.approx(np.mean(agreeing), abs=1e-6)


@pytest.mark.parametrize("policy, name", [(pb.VOTING_POLICY_MAJORITY, "majority"),
                                          (pb.VOTING_POLICY_SOFT, "soft"),
                                          (pb.VOTING_POLICY_ACCURACY, "accuracy")])
def test_predict_policy_override(stub, reference, data, policy, name):
    pixels, _ = data
    response = stub.Predict(_request(ENSEMBLE, pixels, policy=policy, return_member_votes=True), timeout=30)
    assert response.policy == policy
    assert response.request_id  # the server made one up
    expected = reference.vote(ENSEMBLE, pixels, policy=name)
    got = np.array([p.probabilities for p in response.predictions])
    np.testing.assert_allclose(got, expected.probabilities, atol=1e-6)
    np.testing.assert_array_equal([p.class_index for p in response.predictions], expected.label_index)
    if name == "majority":
        for prediction in response.predictions:  # equal weights
            assert [v.weight for v in prediction.member_votes] == pytest.approx([1 / len(MEMBERS)] * len(MEMBERS))
            # the calibrated vote ranks classes by their vote shares
            shares = np.bincount([v.class_index for v in prediction.member_votes], minlength=10)
            order = np.argsort(-shares, kind="stable")
            probs = np.array(prediction.probabilities)
            assert all(probs[a] >= probs[b] - 1e-7 for a, b in zip(order, order[1:]) if shares[a] > shares[b])


def test_predict_single_model(stub, reference, data):
    pixels, _ = data
    response = stub.Predict(_request(MEMBER, pixels, version=1, return_member_votes=True), timeout=30)
    assert response.model == MEMBER and response.version == 1
    expected = reference.vote(MEMBER, pixels)
    for row, prediction in enumerate(response.predictions):
        np.testing.assert_allclose(prediction.probabilities, expected.probabilities[row], atol=1e-6)
        [only] = prediction.member_votes
        assert only.member == MEMBER and only.weight == pytest.approx(1.0)
        assert prediction.agreement == pytest.approx(1.0)


def test_feedback_accepts_known_ids_and_reports_unknown(stub, data):
    pixels, truth = data
    first = stub.Predict(_request(ENSEMBLE, pixels[:10]), timeout=30)
    second = stub.Predict(_request(ENSEMBLE, pixels[10:], request_id="fb-second"), timeout=30)
    assert second.request_id == "fb-second"
    labels = [pb.FeedbackRequest.Label(request_id=first.request_id, row=i, label=str(truth[i]))
              for i in range(10)]
    labels += [pb.FeedbackRequest.Label(request_id="fb-second", row=i, label=str(truth[10 + i]))
               for i in range(10)]
    labels += [pb.FeedbackRequest.Label(request_id="never-sent", row=0, label="3")]
    labels += [pb.FeedbackRequest.Label(request_id="fb-second", row=0, label="3"),  # already labelled
               pb.FeedbackRequest.Label(request_id="fb-second", row=99, label="3"),  # no such row
               pb.FeedbackRequest.Label(request_id="fb-second", row=1, label="cat")]  # no such class
    response = stub.Feedback(pb.FeedbackRequest(labels=labels), timeout=10)
    assert response.accepted == 20
    assert response.rejected == 3
    assert list(response.unknown_ids) == ["never-sent"]
    # The labels feed the members' live accuracy.
    [status] = stub.GetStatus(pb.GetStatusRequest(model=ENSEMBLE), timeout=10).models
    for member in status.member_stats:
        assert member.live_samples >= 20
        assert member.HasField("live_accuracy") and 0.5 <= member.live_accuracy <= 1.0


def test_get_status_all_models(stub, reference):
    response = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    names = [m.name for m in response.models]
    assert names == sorted(repository_models())
    assert {ENSEMBLE, *MEMBERS} <= set(names)
    by_name = {m.name: m for m in response.models}
    ensemble = by_name[ENSEMBLE]
    assert ensemble.ensemble
    assert list(ensemble.members) == MEMBERS
    assert ensemble.policy == pb.VOTING_POLICY_STACKED
    assert list(ensemble.class_labels) == [str(i) for i in range(10)]
    assert [s.member for s in ensemble.member_stats] == MEMBERS
    assert all(0.8 < s.validation_accuracy <= 1.0 and s.version == 1 for s in ensemble.member_stats)
    assert [v.state for v in ensemble.versions] == [pb.VERSION_STATE_READY]
    frameworks = {name: reference.member(name).manifest["framework"] for name in MEMBERS}
    for name in MEMBERS:
        model = by_name[name]
        assert not model.ensemble
        [version] = model.versions
        assert (version.version, version.state, version.serving) == (1, pb.VERSION_STATE_READY, True)
        assert version.device == "cpu" and version.framework == frameworks[name]
        assert model.batching.enabled and model.batching.max_batch_size == 64
        assert model.batching.max_queue_size > 0 and not model.batching.strict
        assert list(model.class_labels) == [str(i) for i in range(10)]


def test_get_status_unknown_model(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.GetStatus(pb.GetStatusRequest(model="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()
