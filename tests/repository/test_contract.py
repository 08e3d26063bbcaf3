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
    assert err.value.problems == (
        "member 'b' predicts labels that 'a' does not: ['c0' at 0, 'c1' at 1, 'c2' at 2, 'c3' at 3, 'c4' at 4, "
        "'c5' at 5, 'c6' at 6, 'c7' at 7, 'c8' at 8, 'c9' at 9] and lacks labels that 'a' predicts: ['0' at 0, "
        "'1' at 1, '2' at 2, '3' at 3, '4' at 4, '5' at 5, '6' at 6, '7' at 7, '8' at 8, '9' at 9]",)


def test_one_label_that_differs_is_named_with_its_index_not_hidden_in_a_cut_list():
    a = manifest("digits_mlp_a")  # labels "0" .. "9"
    b = a.model_copy(update={"labels": ("0", "1", "2", "3", "4", "5", "6", "7", "8", "nine")})
    c = a.model_copy(update={"labels": ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10")})
    with pytest.raises(EnsembleContractError) as err:
        check_ensemble("e", {"a": a, "b": b, "c": c})
    assert err.value.problems == (
        "member 'b' predicts labels that 'a' does not: ['nine' at 9] and lacks labels that 'a' predicts: ['9' at 9]",
        "member 'c' predicts labels that 'a' does not: ['10' at 10]")


def test_huge_label_sets_list_twenty_differences_then_count_the_rest():
    a = manifest("digits_mlp_a").model_copy(update={"labels": tuple(f"a{i}" for i in range(5000))})
    b = a.model_copy(update={"labels": tuple(f"a{i}" for i in range(4000)) + tuple(f"b{i}" for i in range(1000))})
    c = a.model_copy(update={"labels": tuple(f"a{i}" for i in range(4997)) + ("x", "y", "z")})
    with pytest.raises(EnsembleContractError) as err:
        check_ensemble("e", {"a": a, "b": b, "c": c})
    b_problem, c_problem = err.value.problems
    assert b_problem == (
        "member 'b' predicts labels that 'a' does not: ["
        + ", ".join(f"'b{i}' at {4000 + i}" for i in range(10)) + ", and 990 more] and lacks labels that 'a' "
        "predicts: [" + ", ".join(f"'a{i}' at {i}" for i in range(4000, 4010)) + ", and 990 more]")
    assert c_problem == ("member 'c' predicts labels that 'a' does not: ['x' at 4997, 'y' at 4998, 'z' at 4999] "
                         "and lacks labels that 'a' predicts: ['a4997' at 4997, 'a4998' at 4998, 'a4999' at 4999]")
    lopsided = a.model_copy(update={"labels": tuple(f"a{i}" for i in range(10)) + ("q",)})
    with pytest.raises(EnsembleContractError) as err:
        check_ensemble("e", {"small": lopsided, "a": a})
    assert err.value.problems == (
        "member 'a' predicts labels that 'small' does not: ["
        + ", ".join(f"'a{i}' at {i}" for i in range(10, 29)) + ", and 4971 more] "
        "and lacks labels that 'small' predicts: ['q' at 10]",)
    assert len(str(err.value)) < 1000


def test_repeated_labels_are_named_with_where_they_repeat():
    a = manifest("digits_mlp_a")
    b = a.model_copy(update={"labels": ("0", "1", "0", "2", "1", "0", "3", "4", "5", "6", "7", "8", "9", "0", "0", "0")})
    with pytest.raises(EnsembleContractError) as err:
        check_ensemble("e", {"a": a, "b": b})
    assert err.value.problems == ("member 'b' repeats labels: ['0' at [0, 2, 5, 13, 14, and 1 more], '1' at [1, 4]]",)


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
