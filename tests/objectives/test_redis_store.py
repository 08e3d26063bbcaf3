"""The Redis feedback store against a real redis-server: two stores on one Redis stand for two
replicas (a prediction recorded by one is labelled through the other, each row once across
both), the fleet's window and counters, predictions expiring with their TTL, an outage that
inference never sees (unstored predictions counted, Feedback UNAVAILABLE naming the store),
and the store resuming when Redis comes back."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pytest

from service.errors import InvalidInput
from service.objectives.redis_store import RedisStore
from service.objectives.state import describe_url, open_store
from service.objectives.store import StoreUnavailable, check_label_count
from tests.redis_server import running_redis

LABELS = tuple("0123456789")


def result(predicted: list[int], model: str = "ens", members: tuple[str, ...] = ("a", "b")):
    """An ensemble's answer: member a says `predicted`, member b always class 0."""
    a = np.eye(10, dtype=np.float32)[predicted]
    b = np.eye(10, dtype=np.float32)[[0] * len(predicted)]
    vote = SimpleNamespace(members=members, label_index=np.asarray(predicted))
    return SimpleNamespace(model=model, version=1, labels=LABELS, vote=vote, shadow={}, uncertain=None,
                           members=tuple(SimpleNamespace(name=m, version=3) for m in members),
                           member_probabilities=np.stack([a, b][:len(members)]))


def label(request_id: str, row: int, value: str):
    return SimpleNamespace(request_id=request_id, row=row, label=value)


async def until(condition, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
def redis_server(tmp_path):
    with running_redis(tmp_path / "redis") as server:
        yield server


async def stored(store: RedisStore, *ids: str) -> None:
    client = store._redis()
    async def written():
        return all([await client.exists(f"quorum:p:{i}") for i in ids])
    await until(written)


async def test_a_label_finds_its_prediction_through_another_replica(redis_server):
    a, b = (RedisStore(redis_server.url, "redis", refresh_s=0.05) for _ in range(2))
    assert await a.start() is None and await b.start() is None
    try:
        a.record("r1", result([3, 4]))
        a.record("r2", result([5]))
        await stored(a, "r1", "r2")
        outcome = await b.add_labels([label("r1", 0, "3"), label("r1", 1, "7"), label("r1", 1, "7"),
                                      label("r1", 2, "3"), label("r1", 0, "cat"), label("gone", 0, "1")], now=1.0)
        assert (outcome.accepted, outcome.rejected, list(outcome.unknown)) == (2, 3, ["gone"])
        again = await a.add_labels([label("r1", 0, "3"), label("r2", 0, "0")], now=2.0)  # r1/0 was labelled on b
        assert (again.accepted, again.rejected) == (1, 1)

        async def both_see_three():
            return a.live("ens")[1] == 3 and b.live("ens")[1] == 3
        await until(both_see_three)
        for store in (a, b):
            assert store.live("ens") == (pytest.approx(1 / 3), 3)  # right on r1/0 only
            assert store.live("ens/a") == (pytest.approx(1 / 3), 3)
            assert store.live("ens/b") == (pytest.approx(1 / 3), 3)  # b said 0: right on r2/0
            assert [r.truth for r in store.live_rows("ens")] == [3, 7, 0]
        fleet = redis_server.client().hgetall("quorum:c:ens")
        assert fleet[b"labelled||1"] == b"3" and fleet[b"correct||1"] == b"1"
        assert fleet[b"labelled|a|3"] == b"3" and fleet[b"correct|b|3"] == b"1"
        pods = [s.counters.labelled["ens", "", 1] for s in (a, b)]
        assert pods == [1, 2] and sum(pods) == 3
        ttl = redis_server.client().ttl("quorum:p:r1")
        assert 0 < ttl <= 86400
    finally:
        await a.stop()
        await b.stop()


async def test_an_emptied_redis_empties_the_fleet_view(redis_server):
    store = RedisStore(redis_server.url, "redis", refresh_s=3600)  # refreshed by hand below
    await store.start()
    try:
        store.record("r", result([1]))
        await stored(store, "r")
        await store.add_labels([label("r", 0, "1")], now=1.0)
        await store.refresh()
        assert store.live("ens") == (1.0, 1) and len(store.live_rows("ens")) == 1 and store.live_all()
        redis_server.client().flushall()  # a Redis restarted without its data
        await store.refresh()
        assert store.live("ens") == (None, 0) and store.live_rows("ens") == [] and store.live_all() == {}
    finally:
        await store.stop()


async def test_predictions_expire_with_the_ttl_setting(redis_server):
    store = RedisStore(redis_server.url, "redis", ttl_s=120)
    await store.start()
    try:
        store.record("r", result([1]))
        await stored(store, "r")
        assert 0 < redis_server.client().ttl("quorum:p:r") <= 120
        await store.add_labels([label("r", 0, "1")], now=1.0)
        assert 0 < redis_server.client().ttl("quorum:l:r") <= 120
        redis_server.client().delete("quorum:p:r")  # what expiry does
        assert list((await store.add_labels([label("r", 0, "1")], now=2.0)).unknown) == ["r"]
    finally:
        await store.stop()


async def test_an_outage_counts_unstored_predictions_and_feedback_is_unavailable_until_redis_returns(redis_server):
    store = RedisStore(redis_server.url, "redis://127.0.0.1/0", refresh_s=0.05, timeout_s=0.5)
    await store.start()
    try:
        redis_server.stop()
        store.record("lost", result([1]))  # never raises, never waits

        async def counted():
            return store.counters.unstored == 1
        await until(counted)
        with pytest.raises(StoreUnavailable, match=r"feedback store redis://127.0.0.1/0 is unavailable"):
            await store.add_labels([label("lost", 0, "1")], now=1.0)
        assert not store.available()
        redis_server.start()
        store.record("kept", result([2]))
        await stored(store, "kept")
        outcome = await store.add_labels([label("kept", 0, "2"), label("lost", 0, "1")], now=2.0)
        assert outcome.accepted == 1 and list(outcome.unknown) == ["lost"]
        assert store.available() and store.counters.unstored == 1
    finally:
        await store.stop()


async def test_a_full_write_queue_counts_instead_of_waiting(redis_server):
    store = RedisStore(redis_server.url, "redis", queue_size=2)
    await store.start()
    try:
        for i in range(5):  # no await in between: the writer has not run yet
            store.record(f"r{i}", result([i]))
        assert store.counters.unstored == 3
        await stored(store, "r0", "r1")
    finally:
        await store.stop()


async def test_a_stream_without_feedback_stays_within_maxmemory_and_keeps_the_fleet_counters(tmp_path):
    """volatile-ttl evicts only what expires: predictions go, the window and counters stay."""
    with running_redis(tmp_path / "redis", maxmemory="2mb") as server:
        store = RedisStore(server.url, "redis", queue_size=100_000)
        await store.start()
        try:
            store.record("labelled", result([1]))
            await stored(store, "labelled")
            assert (await store.add_labels([label("labelled", 0, "1")], now=1.0)).accepted == 1
            client = server.client()
            baseline = client.info("memory")["used_memory"]
            for i in range(30_000):  # ~10 MB of predictions into 2 MB
                store.record(f"stream-{i}", result([i % 10, (i + 1) % 10]))
                if i % 1000 == 999:
                    await stored(store, f"stream-{i}")
                    assert client.info("memory")["used_memory"] <= 2 * 1024 * 1024 + baseline // 2
            assert client.info("stats")["evicted_keys"] > 0
            assert store.counters.unstored == 0  # eviction makes room: no write fails
            assert client.hget("quorum:c:ens", "labelled||1") == b"1" and client.llen("quorum:r:ens") == 1
        finally:
            await store.stop()


async def test_a_prediction_the_writer_cannot_encode_is_counted_and_the_writer_goes_on(redis_server):
    store = RedisStore(redis_server.url, "redis")
    await store.start()
    try:
        broken = result([1])
        broken.member_probabilities = broken.member_probabilities[:, :, :3]  # 3 classes for 10 labels
        store.record("broken", broken)
        await until_async(lambda: store.counters.unstored == 1)
        store.record("fine", result([1]))
        await stored(store, "fine")
        assert not redis_server.client().exists("quorum:p:broken") and store.counters.unstored == 1
    finally:
        await store.stop()


async def test_an_entry_that_cannot_be_read_does_not_stop_the_refreshes(redis_server, caplog):
    store = RedisStore(redis_server.url, "redis", refresh_s=0.02)
    await store.start()
    try:
        client = redis_server.client()
        client.sadd("quorum:models", "ens")
        client.rpush("quorum:r:ens", b"not a row")  # written by something else
        client.set("quorum:s:ens", 1)
        await until_async(lambda: "live accuracy could not be read" in caplog.text)  # the loop met it
        client.delete("quorum:r:ens")
        client.set("quorum:s:ens", 0)
        store.record("r", result([1]))
        await stored(store, "r")
        await store.add_labels([label("r", 0, "1")], now=1.0)

        async def refreshed():
            return store.live("ens") == (1.0, 1)
        await until(refreshed)
    finally:
        await store.stop()


async def until_async(condition) -> None:
    async def check():
        return condition()
    await until(check)


def test_state_urls_are_checked_and_shown_without_their_password():
    assert describe_url("redis://:secret@cache:6380/2") == ("redis://cache:6380/2", None)
    assert describe_url("rediss://user:pw@cache/0") == ("rediss://cache/0", None)
    for url, why in [("http://cache:6379/0", "scheme"), ("redis://cache:port/0", "malformed"),
                     ("redis:///0", "no host"), ("redis://cache:6379/x", "database"), ("cache:6379", "scheme")]:
        shown, problem = describe_url(url)
        assert problem and why in problem, (url, problem)
    assert "secret" not in describe_url("redis://:secret@cache:port/0")[0]


async def test_a_malformed_url_serves_without_the_store_and_says_why():
    store = open_store("redis://cache:port/0")
    assert "malformed" in (await store.start() or "")
    store.record("r", result([1]))
    assert store.counters.unstored == 1
    with pytest.raises(StoreUnavailable, match="cannot be used"):
        await store.add_labels([label("r", 0, "1")], now=1.0)
    await store.stop()


async def test_an_unreachable_store_at_start_is_reported(tmp_path):
    store = open_store(f"redis://127.0.0.1:{_closed_port()}/0")
    problem = await store.start()
    assert problem and problem.startswith("unreachable")
    await store.stop()


async def test_a_password_from_a_file(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    with running_redis(tmp_path / "redis", password="s3cret") as server:
        store = open_store(server.url, password_file=tmp_path / "pw")
        assert await store.start() is None
        await store.stop()
        wrong = open_store(server.url)
        assert "unreachable" in (await wrong.start() or "")
        await wrong.stop()


async def test_rediss_with_the_ca_in_the_url(tmp_path):
    from tests.e2e.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    with running_redis(tmp_path / "redis", tls=(pki.server.cert, pki.server.key, pki.ca.cert)) as server:
        assert server.url.startswith("rediss://") and describe_url(server.url)[1] is None
        assert describe_url(server.url)[0] == f"rediss://localhost:{server.port}/0"  # no query in messages
        store = open_store(server.url)
        assert await store.start() is None
        try:
            store.record("tls", result([2]))
            await stored(store, "tls")
            assert (await store.add_labels([label("tls", 0, "2")], now=1.0)).accepted == 1
        finally:
            await store.stop()
        plain = open_store(f"redis://localhost:{server.port}/0")  # plaintext to a TLS port
        assert "unreachable" in (await plain.start() or "")
        await plain.stop()


def test_the_label_count_is_bounded_with_the_setting_named():
    check_label_count(100, 100)
    with pytest.raises(InvalidInput, match=r"500000 labels, more than the limit of 100 .*--max-feedback-labels"):
        check_label_count(500_000, 100)


def _closed_port() -> int:
    from tests.helpers import free_port
    return free_port()
