import numpy as np
import pytest

from service.batching.requests import merge, split


def test_merge_concatenates_blocks_and_counts_rows():
    blocks = [np.full((n, 3), i, dtype=np.float32) for i, n in enumerate([1, 3, 2])]
    batch, counts = merge(blocks)
    assert counts == [1, 3, 2]
    assert batch.shape == (6, 3)
    np.testing.assert_array_equal(batch[:, 0], [0, 1, 1, 1, 2, 2])


def test_merge_passes_a_lone_block_through_without_copy():
    block = np.ones((4, 2))
    batch, counts = merge([block])
    assert batch is block
    assert counts == [4]


def test_split_returns_each_requests_rows():
    blocks = [np.arange(n * 2).reshape(n, 2) + 100 * i for i, n in enumerate([2, 1, 4])]
    batch, counts = merge(blocks)
    parts = split(batch * 10, counts)
    assert len(parts) == 3
    for block, part in zip(blocks, parts):
        np.testing.assert_array_equal(part, block * 10)


def test_split_allows_a_different_output_width():
    _, counts = merge([np.zeros((3, 784)), np.zeros((1, 784))])
    logits = np.arange(40).reshape(4, 10)
    first, second = split(logits, counts)
    assert first.shape == (3, 10) and second.shape == (1, 10)
    np.testing.assert_array_equal(second, logits[3:])


def test_split_rejects_an_output_with_the_wrong_row_count():
    with pytest.raises(ValueError, match="expected 5 rows"):
        split(np.zeros((4, 10)), [2, 3])
