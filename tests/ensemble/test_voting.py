import math

import numpy as np
import pytest

from service.ensemble.voting import ACCURACY_EPS, Policy, Vote, calibrate, vote

NAMES3 = ("a", "b", "c")


def p(*rows):
    return np.array(rows, dtype=np.float64)


# -- calibration ---------------------------------------------------------------------------
def test_calibrate_is_softmax_of_scaled_logits():
    np.testing.assert_allclose(calibrate(p([0.0, math.log(3)]), 1.0), p([0.25, 0.75]))
    np.testing.assert_allclose(calibrate(p([0.0, 2 * math.log(3)]), 2.0), p([0.25, 0.75]))


def test_calibrate_is_numerically_stable():
    probs = calibrate(p([1000.0, 1000.0 + math.log(3)], [-1000.0, -1000.0]), 1.0)
    np.testing.assert_allclose(probs, p([0.25, 0.75], [0.5, 0.5]))
    sharp = calibrate(np.array([[80.0, 0.0]], dtype=np.float32), 0.01)  # exp(8000) overflows
    np.testing.assert_allclose(sharp, p([1.0, 0.0]))


def test_temperature_scaling_preserves_argmax_and_sums_to_one():
    logits = np.random.default_rng(0).normal(scale=4, size=(500, 10)).astype(np.float32)
    for temperature in (0.3, 1.0, 2.5):
        probs = calibrate(logits, temperature)
        np.testing.assert_array_equal(probs.argmax(axis=1), logits.argmax(axis=1))
        np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    # Higher temperature, flatter distribution.
    assert (calibrate(logits, 3.0).max(axis=1) <= calibrate(logits, 1.0).max(axis=1) + 1e-12).all()


def test_calibrate_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        calibrate(p([0.0, 1.0]), 0.0)


# -- hand-computed examples ----------------------------------------------------------------
A, B, C = p([0.6, 0.4]), p([0.1, 0.9]), p([0.7, 0.3])


def test_soft_is_the_mean_probability():
    v = vote("soft", [A, B, C], NAMES3)
    np.testing.assert_allclose(v.probabilities, p([1.4 / 3, 1.6 / 3]))
    assert v.label_index.tolist() == [1]
    np.testing.assert_allclose(v.confidence, [1.6 / 3])
    np.testing.assert_allclose(v.agreement, [1 / 3])
    np.testing.assert_allclose(v.member_weights, np.full((3, 1), 1 / 3))
    assert v.member_labels.tolist() == [[0], [1], [0]]
    assert v.members == NAMES3
    assert v.policy is Policy.SOFT


def test_majority_counts_hard_votes():
    v = vote(Policy.MAJORITY, [A, B, C], NAMES3)  # same inputs, soft says 1, hard says 0
    assert v.label_index.tolist() == [0]
    np.testing.assert_allclose(v.probabilities, p([2 / 3, 1 / 3]))
    np.testing.assert_allclose(v.confidence, [2 / 3])
    np.testing.assert_allclose(v.agreement, [2 / 3])
    np.testing.assert_allclose(v.member_weights, np.full((3, 1), 1 / 3))


def test_majority_tie_goes_to_the_tied_class_with_most_summed_probability():
    v = vote("majority", [p([0.6, 0.4, 0.0]), p([0.1, 0.0, 0.9])], ["a", "b"])
    assert v.label_index.tolist() == [2]  # 1 vote each; summed probability 0.7 vs 0.9
    np.testing.assert_allclose(v.probabilities, p([0.5, 0.0, 0.5]))
    np.testing.assert_allclose(v.agreement, [0.5])


def test_majority_tie_break_only_considers_tied_classes():
    members = [p([0.5, 0.1, 0.4]), p([0.5, 0.1, 0.4]), p([0.0, 0.6, 0.4]), p([0.0, 0.6, 0.4])]
    v = vote("majority", members, ["a", "b", "c", "d"])
    # Classes 0 and 1 tie on 2 votes (sums 1.0 and 1.4); class 2 sums 1.6 but has no vote.
    assert v.label_index.tolist() == [1]


def test_confidence_weights_each_member_by_its_max_probability():
    v = vote("confidence", [p([0.9, 0.1]), p([0.4, 0.6])], ["a", "b"])
    np.testing.assert_allclose(v.member_weights, p([0.6], [0.4]))
    np.testing.assert_allclose(v.probabilities, p([0.7, 0.3]))
    assert v.label_index.tolist() == [0]
    np.testing.assert_allclose(v.agreement, [0.5])


def test_confidence_weights_vary_per_row():
    a = p([0.9, 0.1], [0.5, 0.5])
    b = p([0.4, 0.6], [0.2, 0.8])
    v = vote("confidence", [a, b], ["a", "b"])
    np.testing.assert_allclose(v.member_weights, p([0.6, 0.5 / 1.3], [0.4, 0.8 / 1.3]))


def test_confidence_entropy_ignores_a_uniform_member():
    v = vote("confidence_entropy", [p([1.0, 0.0]), p([0.5, 0.5])], ["sure", "unsure"])
    np.testing.assert_allclose(v.member_weights, p([1.0], [0.0]))
    np.testing.assert_allclose(v.probabilities, p([1.0, 0.0]))
    # 1 - H/log C for p = [0.9, 0.1]
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    v = vote("confidence_entropy", [p([0.9, 0.1]), p([1.0, 0.0])], ["a", "b"])
    conf = 1 - h / math.log(2)
    np.testing.assert_allclose(v.member_weights, p([conf / (conf + 1)], [1 / (conf + 1)]))


def test_confidence_entropy_all_uniform_falls_back_to_equal_weights():
    v = vote("confidence_entropy", [p([0.5, 0.5]), p([0.5, 0.5])], ["a", "b"])
    np.testing.assert_allclose(v.member_weights, p([0.5], [0.5]))
    np.testing.assert_allclose(v.probabilities, p([0.5, 0.5]))


def test_accuracy_uses_validation_log_odds():
    # log(0.9/0.1) = 2 log 3, log(0.5/0.5) = 0, log(0.75/0.25) = log 3 -> 2/3, 0, 1/3.
    v = vote("accuracy", [A, B, C], NAMES3, validation_accuracy=[0.9, 0.5, 0.75])
    np.testing.assert_allclose(v.member_weights, np.array([[2 / 3], [0.0], [1 / 3]]))
    np.testing.assert_allclose(v.probabilities, 2 / 3 * A + 1 / 3 * C)
    assert v.label_index.tolist() == [0]


def test_accuracy_clips_weights_and_accuracies():
    v = vote("accuracy", [A, B], ["a", "b"], validation_accuracy=[0.3, 0.4])
    np.testing.assert_allclose(v.member_weights, p([0.5], [0.5]))  # all below chance: equal
    v = vote("accuracy", [A, B], ["a", "b"], validation_accuracy=[1.0, 0.9])
    perfect = math.log((1 - ACCURACY_EPS) / ACCURACY_EPS)
    np.testing.assert_allclose(v.member_weights[:, 0],
                               np.array([perfect, math.log(9)]) / (perfect + math.log(9)))


def test_vote_result_is_frozen():
    v = vote("soft", [A], ["a"])
    assert isinstance(v, Vote)
    with pytest.raises(AttributeError):
        v.label_index = np.array([1])  # type: ignore[misc]


def test_vote_rejects_inconsistent_arguments():
    with pytest.raises(ValueError, match="at least one"):
        vote("soft", [], [])
    with pytest.raises(ValueError, match="names"):
        vote("soft", [A, B], ["a"])
    with pytest.raises(ValueError, match="differ in shape"):
        vote("soft", [A, p([0.2, 0.3, 0.5])], ["a", "b"])
    with pytest.raises(ValueError, match="validation accuracy"):
        vote("accuracy", [A, B], ["a", "b"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vote("accuracy", [A, B], ["a", "b"], validation_accuracy=[0.9, 1.2])
    with pytest.raises(ValueError):
        vote("plurality", [A], ["a"])


# -- vectorised == naive per-row reference -------------------------------------------------
def naive(policy: str, members: list[np.ndarray], accuracy: list[float], given: list[float]) -> tuple:
    m, n, c = len(members), members[0].shape[0], members[0].shape[1]
    labels, probs, weights = [], [], []
    for i in range(n):
        rows = [member[i] for member in members]
        if policy == "majority":
            counts = [0] * c
            for r in rows:
                counts[int(np.argmax(r))] += 1
            top = max(counts)
            sums = [sum(r[k] for r in rows) for k in range(c)]
            label = max((k for k in range(c) if counts[k] == top), key=lambda k: (sums[k], -k))
            w = [1 / m] * m
            dist = [counts[k] / m for k in range(c)]
        else:
            if policy == "soft":
                raw = [1.0] * m
            elif policy == "confidence":
                raw = [max(r) for r in rows]
            elif policy == "confidence_entropy":
                raw = [1 - (-sum(x * math.log(x) for x in r if x > 0)) / math.log(c) for r in rows]
            elif policy == "stacked":
                raw = list(given)
            else:
                raw = []
                for acc in accuracy:
                    acc = min(max(acc, ACCURACY_EPS), 1 - ACCURACY_EPS)
                    raw.append(max(math.log(acc / (1 - acc)), 0.0))
            total = sum(raw)
            w = [x / total for x in raw] if total > 0 else [1 / m] * m
            dist = [sum(w[j] * rows[j][k] for j in range(m)) for k in range(c)]
            label = int(np.argmax(dist))
        labels.append(label)
        probs.append(dist)
        weights.append(w)
    return np.array(labels), np.array(probs), np.array(weights).T


@pytest.mark.parametrize("policy", [p.value for p in Policy])
def test_vectorised_vote_matches_a_naive_per_row_reference(policy):
    rng = np.random.default_rng(7)
    n_members, n_rows, n_classes = 5, 300, 4
    temperatures = rng.uniform(0.5, 2.0, n_members)
    members = [calibrate(rng.normal(scale=2, size=(n_rows, n_classes)), t) for t in temperatures]
    # Few classes and a few duplicated members make majority ties frequent.
    members[3] = members[0].copy()
    accuracy = [0.95, 0.8, 0.55, 0.95, 0.4]
    names = [f"m{i}" for i in range(n_members)]
    given = [0.5, 0.0, 0.2, 0.3, 0.0]  # the stacked policy's fitted weights, some zero
    v = vote(policy, members, names, validation_accuracy=accuracy, member_weights=given)
    labels, probs, weights = naive(policy, members, accuracy, given)
    np.testing.assert_array_equal(v.label_index, labels)
    np.testing.assert_allclose(v.probabilities, probs, atol=1e-12)
    np.testing.assert_allclose(v.member_weights, weights, atol=1e-12)
    np.testing.assert_allclose(v.probabilities.sum(axis=1), 1.0)
    np.testing.assert_allclose(v.member_weights.sum(axis=0), 1.0)
    np.testing.assert_allclose(v.confidence, v.probabilities.max(axis=1))
    member_labels = np.stack([m.argmax(axis=1) for m in members])
    np.testing.assert_array_equal(v.member_labels, member_labels)
    np.testing.assert_allclose(v.agreement, (member_labels == labels).mean(axis=0))
    assert v.label_index.shape == v.confidence.shape == v.agreement.shape == (n_rows,)
    assert v.member_labels.shape == v.member_weights.shape == (n_members, n_rows)
