"""--gc-threshold: the server process raises the garbage collector's youngest threshold before
its models load (service/process.py tune_gc); 0 keeps Python's."""

from __future__ import annotations

import gc

import pytest

from service.process import tune_gc
from service.settings import Settings


@pytest.fixture
def restored():
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_the_youngest_threshold_is_raised_and_the_others_kept(restored):
    gc.set_threshold(700, 10, 10)
    tune_gc(Settings().gc_threshold)
    assert gc.get_threshold() == (50_000, 10, 10)
    tune_gc(0)  # Python's is kept
    assert gc.get_threshold() == (50_000, 10, 10)
    gc.set_threshold(700, 10, 10)
    tune_gc(0)
    assert gc.get_threshold() == (700, 10, 10)


def test_a_negative_threshold_is_refused():
    with pytest.raises(ValueError, match="gc_threshold"):
        Settings(gc_threshold=-1)
