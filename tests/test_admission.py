"""Entry admission on a controlled clock: a call whose deadline is shorter than the work in
flight ahead of it is refused at once (RESOURCE_EXHAUSTED); everything else is let in."""

from __future__ import annotations

import pytest

from service import errors
from service.api.interceptors import Admission


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _serving(clock: Clock) -> Admission:
    gate = Admission(clock)
    gate.loading = False
    return gate


def _measure(gate: Admission, clock: Clock, in_flight: int, per_second: float, calls: int) -> None:
    """Keep `in_flight` calls open and finish `calls` of them at `per_second`."""
    for _ in range(in_flight - gate.inflight):
        gate.enter(None)
    for _ in range(calls):
        clock.now += 1.0 / per_second
        gate.leave()
        gate.enter(None)


def test_a_deadline_shorter_than_the_work_in_flight_is_refused_at_once():
    clock = Clock()
    gate = _serving(clock)
    gate.enter(0.001)  # nothing measured yet: let in
    gate.leave()
    _measure(gate, clock, in_flight=10, per_second=100.0, calls=60)  # 0.6 busy s: measured
    assert gate.rate == pytest.approx(100.0, rel=0.05)
    # 10 calls ahead at 100/s: about 100 ms before a new one is answered, over twice 40 ms
    with pytest.raises(errors.Overloaded, match=r"10 calls in flight, about (9[5-9]|10[0-5]) ms of work"):  # RESOURCE_EXHAUSTED
        gate.enter(0.04)
    assert gate.inflight == 10  # the refused call holds nothing
    gate.enter(0.08)  # the work ahead is about its deadline (an ensemble at its cutoff): let in
    gate.enter(None)  # no deadline: let in
    gate.enter(0.5)  # time to spare
    assert gate.inflight == 13


def test_idle_time_does_not_count_against_the_rate():
    clock = Clock()
    gate = _serving(clock)
    _measure(gate, clock, in_flight=4, per_second=200.0, calls=100)
    for _ in range(gate.inflight):
        clock.now += 0.005
        gate.leave()
    clock.now += 60.0  # a quiet minute
    assert gate.inflight == 0
    gate.enter(0.001)  # nothing in flight: always let in, however short the deadline
    _measure(gate, clock, in_flight=4, per_second=200.0, calls=100)
    assert gate.rate == pytest.approx(200.0, rel=0.05)


def test_closing_and_loading_still_answer_unavailable_first():
    clock = Clock()
    gate = Admission(clock)
    with pytest.raises(errors.Unavailable, match="loading"):
        gate.enter(10.0)
    gate.loading = False
    gate.close()
    with pytest.raises(errors.Unavailable, match="shutting down"):
        gate.enter(10.0)
