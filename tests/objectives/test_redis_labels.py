"""Feedback on the Redis store labelled in one script call per batch, against a real
redis-server: concurrent one-label calls through two replicas each get their own answer and
each row counts once, and the script scores a row as the in-process store does (ensemble
members, prediction sets and abstentions included)."""

from __future__ import annotations

import asyncio
import signal
from types import SimpleNamespace

import numpy as np
import pytest

from service.objectives.feedback import FeedbackStore
from service.objectives.redis_store import RedisStore
from service.objectives.store import StoreUnavailable, Uncertain
from tests.objectives.test_redis_store import LABELS, label, result, stored, until
from tests.redis_server import running_redis


@pytest.fixture
def redis_server(tmp_path):
    with running_redis(tmp_path / "redis") as server:
        yield server


async def test_concurrent_one_label_calls_each_get_their_own_answer_and_a_row_counts_once(redis_server):
    a, b = (RedisStore(redis_server.url, "redis", refresh_s=0.05) for _ in range(2))
    assert await a.start() is None and await b.start() is None
    try:
        ids = [f"p{i}" for i in range(20)]
        for i, request_id in enumerate(ids):
            a.record(request_id, result([i % 10]))
        await stored(a, *ids)
        calls, expected = [], []
        for i, request_id in enumerate(ids):
            calls.append((a, label(request_id, 0, str(i % 10))))  # right: accepted
            expected.append((1, 0, []))
            calls.append((b, label(request_id, 0, str(i % 10))))  # the same row, through the other replica
            expected.append(None)  # accepted by one of the two, rejected by the other
            calls.append((b, label(request_id, 1, "3")))  # no row 1
            expected.append((0, 1, []))
            calls.append((a, label(request_id, 0, "cat")))  # no such label
            expected.append((0, 1, []))
            calls.append((b, label(f"gone{i}", 0, "3")))
            expected.append((0, 0, [f"gone{i}"]))
        outcomes = await asyncio.gather(*(store.add_labels([item], now=1.0) for store, item in calls))
        for (store, item), outcome, want in zip(calls, outcomes, expected):
            got = (outcome.accepted, outcome.rejected, list(outcome.unknown))
            assert got == want or (want is None and got in [(1, 0, []), (0, 1, [])]), (item, got)
        for i in range(len(ids)):  # of the two calls for a row, exactly one was accepted
            first, second = outcomes[5 * i], outcomes[5 * i + 1]
            assert first.accepted + second.accepted == 1
        fleet = redis_server.client().hgetall("quorum:c:ens")
        assert fleet[b"labelled||1"] == b"20" and fleet[b"correct||1"] == b"20"
        assert sum(s.counters.labelled["ens", "", 1] for s in (a, b)) == 20

        async def both_see_twenty():
            return a.live("ens")[1] == 20 and b.live("ens")[1] == 20
        await until(both_see_twenty)
        assert sorted(r.truth for r in a.live_rows("ens")) == sorted(i % 10 for i in range(20))
    finally:
        await a.stop()
        await b.stop()


async def test_a_failed_batch_answers_each_of_its_calls_unavailable(redis_server):
    store = RedisStore(redis_server.url, "redis://127.0.0.1/0", timeout_s=0.5)
    await store.start()
    try:
        store.record("r", result([1]))
        await stored(store, "r")
        redis_server.stop()
        outcomes = await asyncio.gather(*(store.add_labels([label("r", 0, "1")], now=1.0) for _ in range(5)),
                                        return_exceptions=True)
        assert all(isinstance(o, StoreUnavailable) and "redis://127.0.0.1/0" in str(o) for o in outcomes), outcomes
    finally:
        await store.stop()


def uncertain_result(predicted: list[int]) -> SimpleNamespace:
    """An ensemble's answer with prediction sets (coverage 0.9) and abstentions (max_risk 0.2)."""
    answer = result(predicted)
    n = len(predicted)
    sets = np.zeros((n, len(LABELS)), bool)
    sets[:, :3] = True  # {0, 1, 2} on every row
    abstained = np.arange(n) % 2 == 1  # odd rows abstain
    answer.uncertain = Uncertain(0.9, sets, 0.2, abstained)
    answer.member_probabilities[1, :, :] = np.linspace(0.05, 0.14, 10, dtype=np.float32)  # b says 9, not 0
    return answer


@pytest.mark.parametrize("make", [result, uncertain_result], ids=["plain", "sets-and-abstentions"])
async def test_the_script_scores_a_row_as_the_in_process_store(redis_server, make):
    store = RedisStore(redis_server.url, "redis", refresh_s=3600)
    await store.start()
    reference = FeedbackStore()
    try:
        predicted = [0, 1, 2, 3, 9, 5]
        for request_id in ("r", "s"):
            store.record(request_id, make(predicted))
            reference.record(request_id, make(predicted))
        await stored(store, "r", "s")
        labels = [label("r", row, value) for row, value in enumerate("013999")]
        labels += [label("s", row, value) for row, value in enumerate("210395")] + [label("s", 0, "2")]
        ours, theirs = await store.add_labels(labels, now=1.0), await reference.add_labels(labels, now=1.0)
        assert (ours.accepted, ours.rejected) == (theirs.accepted, theirs.rejected) == (12, 1)
        assert store.counters.labelled == reference.counters.labelled
        assert store.counters.correct == reference.counters.correct
        assert store.counters.conformal == reference.counters.conformal
        assert store.counters.selective == reference.counters.selective
        await store.refresh()
        assert store.live_all() == reference.live_all()
        rows, expected = store.live_rows("ens"), reference.live_rows("ens")
        assert [(r.truth, r.uncertain) for r in rows] == [(r.truth, r.uncertain) for r in expected]
        for row, want in zip(rows, expected):
            assert row.members.keys() == want.members.keys()
            for name, (version, probs) in row.members.items():
                assert version == want.members[name][0] and np.array_equal(probs, want.members[name][1])
        fleet = {k.decode(): int(v) for k, v in redis_server.client().hgetall("quorum:c:ens").items()}
        assert fleet == {f"{what}|{member}|{version}": count
                         for what, table in (("labelled", reference.counters.labelled),
                                             ("correct", reference.counters.correct))
                         for (_, member, version), count in table.items()}
    finally:
        await store.stop()


async def test_a_call_that_gave_up_on_a_frozen_redis_counted_nothing(redis_server):
    """Redis frozen with the labels sent: the call answers UNAVAILABLE, and when Redis runs the
    script late it labels nothing, so the label sent again is accepted and counts once."""
    store = RedisStore(redis_server.url, "redis", timeout_s=0.3)
    await store.start()
    try:
        store.record("r", result([1]))
        await stored(store, "r")
        await store.refresh()  # measures Redis's clock
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable):
                await store.add_labels([label("r", 0, "1")], now=1.0)
            await asyncio.sleep(0.2)  # well past the deadline, whatever the error of the measured clock offset
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        again = await store.add_labels([label("r", 0, "1")], now=2.0)
        assert (again.accepted, again.rejected) == (1, 0)
        assert redis_server.client().hget("quorum:c:ens", "labelled||1") == b"1"
        assert store.counters.labelled["ens", "", 1] == 1
    finally:
        await store.stop()
