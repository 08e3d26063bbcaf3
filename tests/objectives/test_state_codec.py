"""A prediction and a labelled row survive the shared store's bytes (service/objectives/state_codec.py)
with the prediction sets and abstentions their answer carried, and without them."""

from __future__ import annotations

import numpy as np

from service.objectives.state_codec import StoredPrediction, decode_prediction, decode_row, encode_prediction, encode_row
from service.objectives.store import LiveRow, Uncertain, UncertainOutcome

LABELS = ("a", "b", "c")


def _prediction(uncertain: Uncertain | None) -> StoredPrediction:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=4).astype(np.float32)
    return StoredPrediction("m", 2, LABELS, np.array([0, 2, 1, 1]), {"x": (1, probs), "y": (3, probs[::-1].copy())},
                            uncertain)


def test_a_prediction_round_trips_with_each_kind_of_uncertainty():
    sets = np.array([[True, False, False], [False, True, True], [False, False, False], [True, True, True]])
    abstained = np.array([False, True, False, True])
    for uncertain in (None, Uncertain(0.9, sets, None, None), Uncertain(None, None, 0.05, abstained),
                      Uncertain(0.8, sets, 0.1, abstained)):
        stored = _prediction(uncertain)
        back = decode_prediction(encode_prediction(stored))
        assert (back.model, back.version, back.labels) == ("m", 2, LABELS)
        np.testing.assert_array_equal(back.predicted, stored.predicted)
        for name, (version, probs) in stored.members.items():
            assert back.members[name][0] == version
            np.testing.assert_array_equal(back.members[name][1], probs)
        if uncertain is None:
            assert back.uncertain is None
            continue
        assert back.uncertain is not None
        assert (back.uncertain.coverage, back.uncertain.max_risk) == (uncertain.coverage, uncertain.max_risk)
        for field in ("sets", "abstained"):
            want, got = getattr(uncertain, field), getattr(back.uncertain, field)
            assert (want is None and got is None) or np.array_equal(want, got)


def test_a_labelled_row_keeps_its_scored_set_and_an_older_row_has_none():
    probs = np.array([0.2, 0.5, 0.3], dtype=np.float32)
    outcome = UncertainOutcome(0.9, True, 0.05, True, False)
    row, correct, separate = decode_row(encode_row(LiveRow(1, {"x": (1, probs)}, outcome), True, False))
    assert (row.truth, correct, separate, row.uncertain) == (1, True, False, outcome)
    plain, _, _ = decode_row(encode_row(LiveRow(1, {"x": (1, probs)}), True, False))
    assert plain.uncertain is None


def test_an_outcome_is_scored_from_the_answers_set_and_abstention():
    sets = np.array([[True, False, False], [False, True, True]])
    uncertain = Uncertain(0.9, sets, 0.05, np.array([False, True]))
    assert uncertain.outcome(0, 0, 0) == UncertainOutcome(0.9, True, 0.05, True, False)
    assert uncertain.outcome(0, 1, 0) == UncertainOutcome(0.9, False, 0.05, True, True)
    assert uncertain.outcome(1, 2, 1) == UncertainOutcome(0.9, True, 0.05, False, False)  # abstained: not answered
    assert Uncertain().outcome(0, 0, 0) is None
