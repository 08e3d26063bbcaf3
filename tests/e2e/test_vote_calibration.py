"""The vote's calibration through the real server and stock clients on the bundled digits
test split: the table of every policy (accuracy, ECE, NLL of the vote and of each member),
calibration that never makes the vote worse, and a default-policy vote at least as
accurate and as well calibrated as its best member.

ECE and NLL are computed here with plain numpy, independently of the server's code."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from service.ensemble.voting import vote
from tests.e2e.fixtures import Reference, module_server
from tests.e2e.oracle import stacked_weights
from tests.helpers import MODELS, VARIANTS, copy_variant

POLICIES = {"majority": pb.VOTING_POLICY_MAJORITY, "soft": pb.VOTING_POLICY_SOFT,
            "confidence": pb.VOTING_POLICY_CONFIDENCE, "confidence_entropy": pb.VOTING_POLICY_CONFIDENCE_ENTROPY,
            "accuracy": pb.VOTING_POLICY_ACCURACY, "stacked": pb.VOTING_POLICY_STACKED}
PAIR = ["digits_cnn_a", "digits_mlp_a"]  # the two strongest members on validation (ONNX both)


def ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    which = np.minimum((confidence * bins).astype(int), bins - 1)  # [k/15, (k+1)/15)
    total = 0.0
    for k in range(bins):
        rows = which == k
        if rows.any():
            total += rows.sum() / len(y) * abs(correct[rows].mean() - confidence[rows].mean())
    return float(total)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())


def scores(probs: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    return float((probs.argmax(axis=1) == y).mean()), ece(probs, y), nll(probs, y)


@pytest.fixture(scope="module")
def server(tmp_path_factory, grpc_engine):
    repo = tmp_path_factory.mktemp("calibration-repo")
    for name in VARIANTS:
        copy_variant(name, repo)
    (repo / "digits").mkdir()
    (repo / "digits" / "ensemble.yaml").write_text((MODELS / "digits" / "ensemble.yaml").read_text())
    (repo / "pair").mkdir()
    (repo / "pair" / "ensemble.yaml").write_text(f"members: [{', '.join(PAIR)}]\npolicy: confidence\n")
    with module_server(tmp_path_factory, "calibration", repository=repo) as s:
        yield s


def _triton(client, model: str, x: np.ndarray) -> np.ndarray:
    parts = []
    for start in range(0, len(x), 60):
        tensor = grpcclient.InferInput("pixels", [len(x[start:start + 60]), 64], "FP32")
        tensor.set_data_from_numpy(x[start:start + 60])
        parts.append(client.infer(model, [tensor]).as_numpy("probabilities"))
    return np.concatenate(parts).astype(np.float64)


def _quorum(stub, model: str, x: np.ndarray, policy: int) -> np.ndarray:
    parts = []
    for start in range(0, len(x), 60):
        chunk = x[start:start + 60]
        response = stub.Predict(pb.PredictRequest(model=model, policy=policy, inputs=pb.Tensor(
            dtype="FP32", shape=list(chunk.shape), content=chunk.tobytes())), timeout=60)
        parts.append([p.probabilities for p in response.predictions])
    return np.concatenate(parts).astype(np.float64)


def test_calibration_table_every_policy_on_the_test_split(server, client, channel, test_split, capsys):
    x, y = test_split
    stub = pb_grpc.EnsembleServiceStub(channel)
    members = Reference(MODELS).ensemble_config("digits")["members"]
    member_probs = {m: _triton(client, m, x) for m in members}
    accuracy = {m: Reference(MODELS).member(m).accuracy for m in members}
    [status] = stub.GetStatus(pb.GetStatusRequest(model="digits"), timeout=10).models
    weights = dict(status.stacked_weights)
    assert set(weights) == set(members) and sum(weights.values()) == pytest.approx(1.0)
    ours = stacked_weights([Reference(MODELS).member(m).manifest["validation"] for m in members])  # fitted here
    np.testing.assert_allclose([weights[m] for m in members], ours, atol=1e-9)
    lines = ["| policy | vote accuracy | vote ECE (uncalibrated) | vote NLL (uncalibrated) |", "|---|---|---|---|"]
    for policy, enum in POLICIES.items():
        calibrated = _quorum(stub, "digits", x, enum)
        raw = vote(policy, [member_probs[m] for m in members], members,
                   validation_accuracy=[accuracy[m] for m in members], member_weights=[weights[m] for m in members])
        np.testing.assert_array_equal(calibrated.argmax(axis=1), raw.label_index)  # the winner stays
        acc, ece_after, nll_after = scores(calibrated, y)
        _, ece_before, nll_before = scores(raw.probabilities, y)
        assert ece_after < ece_before and nll_after < nll_before, (policy, ece_before, ece_after, nll_before, nll_after)
        lines.append(f"| {policy} | {acc:.2%} | {ece_after:.4f} ({ece_before:.4f}) | {nll_after:.4f} ({nll_before:.4f}) |")
    default = _triton(client, "digits", x)  # the configured policy, through tritonclient
    np.testing.assert_allclose(default, _quorum(stub, "digits", x, pb.VOTING_POLICY_UNSPECIFIED), atol=1e-6)
    lines += ["", "| member | accuracy | ECE | NLL |", "|---|---|---|---|"]
    lines += [f"| {m} | {s[0]:.2%} | {s[1]:.4f} | {s[2]:.4f} |" for m in members
              for s in [scores(member_probs[m], y)]]
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_default_policy_vote_is_as_accurate_and_as_well_calibrated_as_its_best_member(server, client, test_split):
    x, y = test_split
    members = {m: scores(_triton(client, m, x), y) for m in PAIR}
    acc, ece_vote, nll_vote = scores(_triton(client, "pair", x), y)
    assert acc >= max(s[0] for s in members.values()), (acc, members)
    assert ece_vote <= min(s[1] for s in members.values()), (ece_vote, members)
    assert nll_vote <= min(s[2] for s in members.values()), (nll_vote, members)


def test_the_bundled_five_vote_as_accurately_and_as_well_calibrated_as_their_best(server, client, test_split):
    """The bundled 5-member digits ensemble under its default policy, `stacked` (weights
    and temperature fitted on the validation replay only), through tritonclient, against
    each of its members, on the test split."""
    x, y = test_split
    assert Reference(MODELS).ensemble_config("digits")["policy"] == "stacked"
    members = {m: scores(_triton(client, m, x), y) for m in Reference(MODELS).ensemble_config("digits")["members"]}
    acc, ece_vote, nll_vote = scores(_triton(client, "digits", x), y)
    assert acc >= max(s[0] for s in members.values()), (acc, members)
    assert ece_vote <= min(s[1] for s in members.values()), (ece_vote, members)
    assert nll_vote <= min(s[2] for s in members.values()), (nll_vote, members)


def test_vote_calibration_is_reported_in_get_status_and_metrics(server, channel):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    [status] = pb_grpc.EnsembleServiceStub(channel).GetStatus(pb.GetStatusRequest(model="digits"), timeout=10).models
    reported = {c.policy: c for c in status.vote_calibration}
    assert set(reported) == set(POLICIES.values())
    assert (status.quorum, status.serving_members) == (3, 5)
    for c in reported.values():
        assert c.validation_rows == 360 and c.temperature > 0
        assert c.ece_after <= c.ece_before and c.nll_after <= c.nll_before
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    for policy, enum in POLICIES.items():
        c = reported[enum]
        key = (("ensemble", "digits"), ("policy", policy))
        assert samples[("quorum_vote_calibration_temperature", key)] == pytest.approx(c.temperature)
        for stage in ("before", "after"):
            labels = tuple(sorted((*key, ("stage", stage))))
            assert samples[("quorum_vote_calibration_ece", labels)] == pytest.approx(getattr(c, f"ece_{stage}"))
            assert samples[("quorum_vote_calibration_nll", labels)] == pytest.approx(getattr(c, f"nll_{stage}"))
