"""The ensemble contract, checked from real bundled manifests."""

from __future__ import annotations

import numpy as np
import pytest

from service.repository.contract import EnsembleContractError, check_ensemble
from service.repository.manifest import load_manifest
from tests.helpers import MODELS


def manifest(name: str):
    return load_manifest(MODELS / name / "1")


def test_same_labels_in_another_order_are_aligned_by_name():
    a = manifest("digits_mlp_a")
    flipped_labels = tuple(reversed(a.labels))
    b = manifest("digits_cnn_a").model_copy(update={"labels": flipped_labels})
    spec = check_ensemble("e", {"a": a, "b": b})
    assert spec.labels == a.labels
    assert spec.permutations["a"] is None
    probs_b = np.eye(len(a.labels))[None, 0]  # b says its first class: label flipped_labels[0]
    aligned = spec.align("b", probs_b)
    assert spec.labels[int(aligned.argmax())] == flipped_labels[0]
    assert spec.align_labels("b", np.array([0]))[0] == spec.labels.index(flipped_labels[0])


def test_different_label_sets_name_both_members_and_their_labels():
    a = manifest("digits_mlp_a")
    b = manifest("digits_cnn_a").model_copy(update={"labels": tuple(f"c{i}" for i in range(10))})
    with pytest.raises(EnsembleContractError) as err:
        check_ensemble("e", {"a": a, "b": b})
    text = str(err.value)
    assert "member 'b' predicts labels [c0, c1" in text and "'a' predicts [0, 1" in text


def test_unknown_and_failed_members_and_other_input_shapes_are_each_named():
    a = manifest("digits_mlp_a")
    spec = a.input.model_copy(update={"shape": (-1, 32)})
    c = manifest("digits_cnn_a").model_copy(update={"inputs": (spec,)})
    with pytest.raises(EnsembleContractError) as err:
        check_ensemble("e", {"a": a, "ghost": None, "broken": "variant.json is missing", "c": c})
    problems = err.value.problems
    assert "member 'ghost' is not in the repository" in problems
    assert any(p.startswith("member 'broken' has no loadable version") for p in problems)
    assert any(p.startswith("member 'c' takes input float32 [32]") for p in problems)
