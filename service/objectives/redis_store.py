"""The Redis feedback store: predictions awaiting ground truth, the fleet's window of labelled
rows and its counters in one Redis, so that any replica accepts Feedback for any prediction.

The request path only appends to a bounded queue; a background writer stores each batch of
queued predictions in one command (a script: SET with a TTL per key). Live accuracy is read
back on a period, never per request. When Redis is slow or down, inference goes on: predictions that cannot be
stored are counted (and logged once per episode), Feedback raises StoreUnavailable, and both
resume by themselves when Redis answers again.
The keys and the labelling script: service/objectives/redis_layout.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.objectives.redis_labels import LabelBatches
from service.objectives.redis_layout import KEY, WRITE_SCRIPT
from service.objectives.state_codec import decode_row, encode_prediction, stored, window_accuracy
from service.objectives.store import FEEDBACK_CHUNK, FeedbackOutcome, LiveRow, PodCounters, StoreUnavailable

log = logging.getLogger(__name__)
ERRORS = (RedisError, OSError, TimeoutError)
WRITE_BATCH = 256
"""Predictions stored per command."""
WRITE_LINGER_S = 0.01
"""The writer waits this long for more predictions before a round trip: at 1,000 requests/s a
round trip per prediction cost a quarter of Predict's throughput; batched so, the whole store
was ~4% of the server's py-spy samples under Predict alone."""
SHADOW_WAIT_S = 1.0
"""How long the writer waits for a prediction's background (shadow) members to answer."""
QUIET_S = 5.0
"""An episode of unstored predictions ends once writes succeed this long after the last drop."""


def _why(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"no answer within {timeout_s:g} s"
    return str(exc) or type(exc).__name__


class RedisStore:
    def __init__(self, url: str, name: str, *, password: str | None = None, ttl_s: float = 86400.0,
                 refresh_s: float = 1.0, queue_size: int = 10_000, queue_bytes: int = 64 * 1024 * 1024,
                 window: int = 1000, timeout_s: float = 1.0, broken: str | None = None) -> None:
        self.name = name
        self.counters = PodCounters()
        self.last_feedback_at: float | None = None
        self._broken = broken  # why the URL cannot work (malformed): never connects
        self._client: Redis | None = None if broken else Redis.from_url(
            url, password=password, socket_timeout=None, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0))  # no retries: a request never waits, a write that fails is counted
        # every command runs under an asyncio.timeout (a batch's): redis-py's socket timeout
        # as well cost a task (asyncio.wait_for) and a timer per command
        self._ttl = max(1, round(ttl_s))
        self._refresh_s, self._timeout_s, self._window = refresh_s, timeout_s, window
        self._queue: deque[tuple[str, Any, int]] = deque()
        self._queue_size, self._queue_bytes, self._queued = queue_size, queue_bytes, 0
        self._wake = asyncio.Event()
        self._writing = False
        self._reachable = False
        self._episode = 0  # predictions unstored since the episode began (0: none going on)
        self._last_drop = 0.0
        self._seq: dict[str, int] = {}
        self._rows: dict[str, list[LiveRow]] = {}
        self._live: dict[str, dict[str, tuple[float | None, int]]] = {}  # model -> key -> (accuracy, samples)
        self._tasks: list[asyncio.Task] = []
        self._labels = LabelBatches(self._client, self.counters, self._ttl, window, timeout_s) if self._client else None
        self._store = self._client.register_script(WRITE_SCRIPT) if self._client is not None else None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> str | None:
        if self._broken is not None:
            return self._broken
        problem = None
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._redis().ping()
            self._reachable = True
        except ERRORS as exc:
            problem = f"unreachable ({_why(exc, self._timeout_s)})"
        self._tasks = [asyncio.create_task(self._write_loop(), name="state-writer"),
                       asyncio.create_task(self._refresh_loop(), name="state-refresh")]
        return problem

    async def stop(self) -> None:
        """Give the writer a moment to store what is queued, then close."""
        deadline = time.monotonic() + 2 * self._timeout_s
        while (self._queue or self._writing) and self._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def _redis(self) -> Redis:
        assert self._client is not None  # a broken store never gets this far
        return self._client

    def available(self) -> bool:
        return self._reachable

    # -- predictions: the request path and the writer ------------------------------------------
    def record(self, request_id: str, result: Any) -> None:
        """Queue a request's answers for the writer; never waits. A full queue (or no store)
        counts the prediction as unstored."""
        size = result.vote.label_index.nbytes + result.member_probabilities.nbytes + len(request_id)
        if not self._tasks or len(self._queue) >= self._queue_size or self._queued + size > self._queue_bytes:
            self._unstored(1, self._broken or "the write queue is full")
            return
        self._queue.append((request_id, result, size))
        self._queued += size
        self._wake.set()

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            if len(self._queue) < WRITE_BATCH:
                await asyncio.sleep(WRITE_LINGER_S)
            self._wake.clear()
            while self._queue:
                self._writing = True
                batch = [self._queue.popleft() for _ in range(min(WRITE_BATCH, len(self._queue)))]
                self._queued -= sum(size for _, _, size in batch)
                try:
                    await self._write(batch)
                except Exception:  # a bug must not end the writer: later predictions would queue forever
                    log.exception("feedback store %s: %d predictions could not be written", self.name, len(batch))
                    self._unstored(len(batch), "the writer failed (see the traceback above)")
                finally:
                    self._writing = False

    async def _write(self, batch: list[tuple[str, Any, int]]) -> None:
        pending = [task for _, result, _ in batch for _, task in result.shadow.values() if not task.done()]
        if pending:  # shadow members usually answer within milliseconds
            await asyncio.wait(pending, timeout=SHADOW_WAIT_S)
        keys = [f"{KEY}p:{request_id}" for request_id, _, _ in batch]
        values = [encode_prediction(stored(result)) for _, result, _ in batch]
        assert self._store is not None  # a broken store never queues
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._store(keys=keys, args=[self._ttl, *values])
        except ERRORS as exc:
            self._unreachable(exc)
            self._unstored(len(batch), _why(exc, self._timeout_s))
            return
        self._answered()

    def _unstored(self, count: int, why: str) -> None:
        self.counters.unstored += count
        self._last_drop = time.monotonic()
        if not self._episode:
            log.warning("feedback store %s: predictions are not being stored (%s); inference goes on, they are "
                        "counted in quorum_feedback_unstored_predictions_total until the store takes them again",
                        self.name, why)
        self._episode += count

    def _unreachable(self, exc: BaseException) -> None:
        if self._reachable:
            log.warning("feedback store %s is unreachable (%s): Feedback answers UNAVAILABLE until it answers",
                        self.name, _why(exc, self._timeout_s))
        self._reachable = False

    def _answered(self) -> None:
        if not self._reachable:
            log.info("feedback store %s answers again", self.name)
        self._reachable = True
        if self._episode and time.monotonic() - self._last_drop >= QUIET_S:
            log.info("feedback store %s stores predictions again; %d were not stored meanwhile",
                     self.name, self._episode)
            self._episode = 0

    # -- the fleet's live accuracy, read on a period ------------------------------------------
    async def _refresh_loop(self) -> None:
        failing = False  # logged once per run of failures: a bad entry would fail every second
        while True:
            try:
                await self.refresh()
                failing = False
            except ERRORS as exc:
                self._unreachable(exc)
            except Exception:  # an entry it cannot decode must not end the refreshes
                if not failing:
                    log.exception("feedback store %s: the fleet's live accuracy could not be read", self.name)
                failing = True
            await asyncio.sleep(self._refresh_s)

    async def refresh(self) -> None:
        """Read the fleet's windows of labelled rows, only those that changed since the last read."""
        redis = self._redis()
        async with asyncio.timeout(self._timeout_s):
            before = time.time()
            seconds, micros = await redis.time()  # the labelling script's deadlines are in Redis's clock
            if self._labels is not None:
                self._labels.clock_offset = seconds + micros / 1e6 - (before + time.time()) / 2
            members: Awaitable[set[bytes]] = redis.smembers(f"{KEY}models")  # type: ignore[assignment]
            models = sorted(m.decode() for m in await members)
            pipe = redis.pipeline(transaction=False)
            for model in models:
                pipe.get(f"{KEY}s:{model}")
            seqs = [int(s or 0) for s in await pipe.execute()] if models else []
            changed = [m for m, s in zip(models, seqs) if s != self._seq.get(m)]
            pipe = redis.pipeline(transaction=True)  # a window and its count read together
            for model in changed:
                pipe.get(f"{KEY}s:{model}")
                pipe.lrange(f"{KEY}r:{model}", -self._window, -1)
            read = await pipe.execute() if changed else []
        for gone in set(self._seq) - set(models):  # the store was emptied
            for table in (self._seq, self._rows, self._live):
                table.pop(gone, None)
        for i, model in enumerate(changed):
            rows = [decode_row(blob) for blob in read[2 * i + 1]]
            self._rows[model] = [live for live, _, _ in rows]
            self._live[model] = window_accuracy(model, rows)
            self._seq[model] = int(read[2 * i] or 0)
        self._answered()

    def live(self, key: str) -> tuple[float | None, int]:
        return self._live.get(key.partition("/")[0], {}).get(key, (None, 0))

    def live_all(self) -> dict[str, tuple[float | None, int]]:
        return {key: value for table in list(self._live.values()) for key, value in table.items()}

    def live_rows(self, model: str) -> list[LiveRow]:
        return list(self._rows.get(model, ()))

    # -- feedback ------------------------------------------------------------------------------
    async def add_labels(self, labels: Any, now: float) -> FeedbackOutcome:
        outcome = FeedbackOutcome()
        if self._broken is not None:
            raise StoreUnavailable(f"the feedback store {self.name} cannot be used ({self._broken}): "
                                   "no label can be checked or counted until the server restarts with a valid URL")
        try:
            assert self._labels is not None  # a broken store never gets this far
            chunks = [labels] if len(labels) <= FEEDBACK_CHUNK else (  # most calls: one chunk, no copy
                labels[start:start + FEEDBACK_CHUNK] for start in range(0, len(labels), FEEDBACK_CHUNK))
            for chunk in chunks:  # the batch of each chunk goes at a later turn: a large call never holds the loop
                await self._labels.label(chunk, outcome)
        except ERRORS as exc:
            self._unreachable(exc)
            counted = f"; {outcome.accepted} labels of this call were counted before it failed" if outcome.accepted else ""
            raise StoreUnavailable(f"the feedback store {self.name} is unavailable ({_why(exc, 3 * self._timeout_s)}): "
                                   f"labels cannot be checked or counted now, send them again later{counted}") from None
        self._answered()
        if outcome.accepted:
            self.last_feedback_at = now
        return outcome
