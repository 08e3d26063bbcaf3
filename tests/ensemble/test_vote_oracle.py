"""The vectorised vote and the end-to-end tests' row-by-row oracle (tests/e2e/oracle.py),
written apart, agree on random members, ties and all-zero weights included."""

from __future__ import annotations

import numpy as np
import pytest

from service.ensemble.voting import vote
from tests.e2e.oracle import expected_vote

POLICIES = ["majority", "soft", "confidence", "confidence_entropy", "accuracy", "stacked"]


def _members(rng, m: int, n: int, c: int, sharp: float) -> list[np.ndarray]:
    logits = rng.normal(size=(m, n, c)) * sharp
    return [np.exp(z) / np.exp(z).sum(axis=1, keepdims=True) for z in logits]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("m", [1, 2, 4, 5])
def test_vote_matches_the_oracle(policy, m):
    rng = np.random.default_rng(m)
    probs = _members(rng, m, 200, 10, sharp=3.0)
    accuracy = list(rng.uniform(0.3, 0.99, size=m))  # some below 0.5: zero weight
    given = list(rng.uniform(0, 1, size=m))
    got = vote(policy, probs, [f"m{i}" for i in range(m)], validation_accuracy=accuracy, member_weights=given)
    want = expected_vote(policy, probs, accuracy, given)
    np.testing.assert_array_equal(got.label_index, want.label_index)
    np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-12)
    np.testing.assert_allclose(got.member_weights, want.member_weights, atol=1e-12)
    np.testing.assert_allclose(got.agreement, want.agreement)
    np.testing.assert_array_equal(got.member_labels, want.member_labels)


@pytest.mark.parametrize("policy", ["confidence_entropy", "accuracy"])
def test_all_zero_weights_fall_back_to_equal_weights_in_both(policy):
    uniform = [np.full((3, 4), 0.25), np.full((3, 4), 0.25)]
    got = vote(policy, uniform, ["a", "b"], validation_accuracy=[0.4, 0.2])
    want = expected_vote(policy, uniform, [0.4, 0.2])
    np.testing.assert_allclose(got.member_weights, 0.5)
    np.testing.assert_allclose(want.member_weights, 0.5)
