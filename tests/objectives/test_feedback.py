"""The feedback store: bounded by count and bytes, labelled rows forgotten with their
prediction, each row scored once, unknown and forgotten ids reported as unknown."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from service.objectives.feedback import FeedbackStore

LABELS = tuple("0123456789")


def result(predicted: list[int], model: str = "m"):
    """What the data plane hands the store: one model answering `predicted` per row."""
    probabilities = np.eye(10, dtype=np.float32)[predicted][None]  # (1 member, n rows, 10)
    vote = SimpleNamespace(members=(model,), label_index=np.asarray(predicted))
    return SimpleNamespace(model=model, version=1, labels=LABELS, vote=vote, uncertain=None, members=(SimpleNamespace(name=model, version=1),),
                           member_probabilities=probabilities, shadow={})


def test_capacity_forgets_the_oldest_with_its_labels():
    store = FeedbackStore(capacity=3)
    for i in range(5):
        store.record(f"r{i}", result([i % 10]))
    assert len(store) == 3
    with pytest.raises(KeyError):
        store.add("r0", 0, "0", now=1.0)
    assert store.add("r4", 0, "4", now=1.0) is True
    assert store.add("r4", 0, "4", now=1.0) is False  # each row is scored once
    for i in range(5, 9):
        store.record(f"r{i}", result([0]))
    with pytest.raises(KeyError):
        store.add("r4", 0, "4", now=2.0)  # forgotten, and its labelled rows with it
    assert store.live("m") == (1.0, 1)


def test_bytes_bound_the_store_whatever_the_ids():
    store = FeedbackStore(capacity=1_000_000, max_bytes=100_000)
    for i in range(1000):
        store.record(f"{i:06d}" + "x" * 1000, result([1, 2]))
    assert store.bytes <= 100_000 and 0 < len(store) < 100
    assert store.bytes == sum(p.size for p in store._predictions.values())


def test_rows_and_labels_out_of_range_are_rejected():
    store = FeedbackStore()
    store.record("a", result([3, 4]))
    assert store.add("a", 2, "3", now=1.0) is False
    assert store.add("a", -1, "3", now=1.0) is False
    assert store.add("a", 0, "cat", now=1.0) is False
    assert store.add("a", 0, "3", now=1.0) is True and store.add("a", 1, "5", now=1.0) is True
    assert store.live("m") == (0.5, 2)


def test_an_id_recorded_again_counts_once():
    store = FeedbackStore(capacity=10)
    store.record("same", result([1]))
    store.record("same", result([2]))
    assert len(store) == 1 and store.bytes == next(iter(store._predictions.values())).size
    assert store.add("same", 0, "2", now=1.0) is True and store.live("m") == (1.0, 1)
