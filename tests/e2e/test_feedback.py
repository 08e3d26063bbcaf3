"""Feedback through quorum.v1 against a real server: live accuracy equals the accuracy
computed offline on the same answered requests, for the ensemble and for each member."""

from __future__ import annotations

import grpc
import numpy as np

from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from tests.server import running_server


def test_live_accuracy_from_feedback_equals_offline_accuracy(tmp_path, test_split):
    x, y = test_split
    with running_server(tmp_path) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EnsembleServiceStub(channel)
        answers, labels = [], []
        for i in range(len(x)):
            response = stub.Predict(pb.PredictRequest(
                model="digits", request_id=f"test-{i}", return_member_votes=True,
                inputs=pb.Tensor(dtype="FP32", shape=[1, 64], content=x[i:i + 1].tobytes())), timeout=10)
            answers.append(response.predictions[0])
            labels.append(pb.FeedbackRequest.Label(request_id=f"test-{i}", row=0, label=str(y[i])))
        reply = stub.Feedback(pb.FeedbackRequest(labels=labels), timeout=10)
        assert reply.accepted == len(x) and not reply.unknown_ids
        again = stub.Feedback(pb.FeedbackRequest(labels=[
            pb.FeedbackRequest.Label(request_id="never-sent", row=0, label="3")]), timeout=10)
        assert again.accepted == 0 and list(again.unknown_ids) == ["never-sent"]
        [status] = stub.GetStatus(pb.GetStatusRequest(model="digits"), timeout=10).models

    truth = np.asarray(y)
    ensemble = np.mean([a.class_index for a in answers] == truth)
    assert status.live_samples == len(x)
    assert status.live_accuracy == ensemble
    for stats in status.member_stats:
        said = np.array([next(v.class_index for v in a.member_votes if v.member == stats.member) for a in answers])
        assert stats.live_samples == len(x)
        assert stats.live_accuracy == np.mean(said == truth), stats.member
    print(f"ensemble live accuracy {status.live_accuracy:.4f};",
          {s.member: round(s.live_accuracy, 4) for s in status.member_stats})
