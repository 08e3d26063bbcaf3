"""Feedback on the Redis store, one round trip per batch: the labels of the Feedback calls that
arrive while the previous batch is in flight (or in the same turn of the event loop) go to
Redis in one call of the labelling script (redis_layout.py: lookup, checks, scoring and
counting in one atomic step, with a deadline), and each call gets back its own answers.

A call on its own costs one round trip on the batches' own connection. Before, a label cost
two round trips and two redis-py commands through the pool, which held one-label Feedback to
0.76x the in-process store's throughput (0.86x after; docs/performance.md)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Connection, Redis
from redis.exceptions import NoScriptError

from service.objectives.redis_layout import KEY, LABEL_SCRIPT
from service.objectives.state_codec import decode_row
from service.objectives.store import FEEDBACK_CHUNK, FeedbackOutcome, PodCounters

UNKNOWN, REJECTED = 0, 1
"""The script's answer for a label whose prediction is unknown (or expired), and for one it
rejected; a label it accepted answers (model, version, the labelled row)."""


class _Batch:
    """The labels of the calls that share a round trip: the script's arguments, and per call its
    future and its labels' place among them."""

    __slots__ = ("args", "callers", "labels")

    def __init__(self, head: list[Any]) -> None:
        self.args = head
        self.callers: list[tuple[asyncio.Future, int, int]] = []
        self.labels = 0


class LabelBatches:
    def __init__(self, client: Redis, counters: PodCounters, ttl: int, window: int, timeout_s: float) -> None:
        self._client, self._counters, self._timeout_s = client, counters, timeout_s
        self._head = (ttl, window, KEY)
        self.clock_offset = 0.0
        """Redis's clock less this host's (seconds), measured by the store's refreshes."""
        self._sha = hashlib.sha1(LABEL_SCRIPT.encode()).hexdigest()
        self._open: _Batch | None = None  # the batch that calls join
        self._waiting: deque[_Batch] = deque()  # full batches behind the one in flight
        self._sending: asyncio.Task | None = None
        self._connection: Connection | None = None  # its own: no pool, no retry wrapper, per batch

    async def label(self, chunk: Sequence[Any], outcome: FeedbackOutcome) -> None:
        """Label up to FEEDBACK_CHUNK labels (each with request_id, row and label) into
        `outcome`, with the other calls of this turn of the loop, or of the turns a batch in
        flight took. The rows accepted are counted in the pod's counters even if the caller has
        gone by then. Raises what the store raised (RedisError, OSError, TimeoutError) when the
        batch could not be labelled."""
        batch = self._open
        if batch is None or batch.labels + len(chunk) > FEEDBACK_CHUNK:
            batch = self._open = _Batch([*self._head, 0.0])  # its deadline is set when it goes
            self._waiting.append(batch)
            if self._sending is None and len(self._waiting) == 1:
                asyncio.get_running_loop().call_soon(self._next)
        args = batch.args
        for item in chunk:
            args += (item.request_id, item.row, item.label)
        future = asyncio.get_running_loop().create_future()
        batch.callers.append((future, batch.labels, len(chunk)))
        batch.labels += len(chunk)
        answers = await future
        for item, answer in zip(chunk, answers):
            if answer == UNKNOWN:
                outcome.unknown[item.request_id] = None
            elif answer == REJECTED:
                outcome.rejected += 1
            else:
                outcome.accepted += 1

    def _next(self, _: object = None) -> None:
        """Send the oldest batch: one in flight at a time, so that the calls arriving meanwhile
        share the next round trip."""
        self._sending = None
        if not self._waiting:
            return
        batch = self._waiting.popleft()
        if self._open is batch:
            self._open = None
        self._sending = asyncio.create_task(self._run(batch), name="feedback-labels")
        self._sending.add_done_callback(self._next)

    async def _run(self, batch: _Batch) -> None:
        batch.args[3] = f"{time.time() + self.clock_offset + 3 * self._timeout_s:.6f}"
        try:
            async with asyncio.timeout(3 * self._timeout_s):
                answers = await self._script(batch.args)
            self._count(answers)
        except asyncio.CancelledError:  # the server is stopping
            for future, _, _ in batch.callers:
                future.cancel()
            raise
        except Exception as exc:  # each caller raises it (and says it its own way)
            for future, _, _ in batch.callers:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, first, count in batch.callers:
            if not future.done():  # a caller cancelled (its deadline) has gone
                future.set_result(answers[first:first + count])

    async def _script(self, args: list[Any]) -> list[Any]:
        """One EVALSHA on the batches' own connection (it reconnects by itself after an error;
        a reply cut short closes it)."""
        if self._connection is None:
            self._connection = await self._client.connection_pool.get_connection()
        connection = self._connection
        try:
            await connection.send_packed_command(connection.pack_command("EVALSHA", self._sha, 0, *args), False)
            return await connection.read_response()
        except NoScriptError:  # a Redis restarted (or replaced) since: load it, once
            self._sha = await self._client.script_load(LABEL_SCRIPT)
            await connection.send_packed_command(connection.pack_command("EVALSHA", self._sha, 0, *args), False)
            return await connection.read_response()

    def _count(self, answers: list[Any]) -> None:
        """The pod's counters for the rows labelled: the outcomes `score` gives (store.py)."""
        for answer in answers:
            if isinstance(answer, list):
                model, version, blob = answer[0].decode(), answer[1], answer[2]
                live, correct, separate = decode_row(blob)
                outcomes = [(model, "", version, correct)]
                if separate:
                    outcomes += [(model, member, member_version, int(probs.argmax()) == live.truth)
                                 for member, (member_version, probs) in live.members.items()]
                self._counters.add(outcomes)
                self._counters.add_uncertain(model, live.uncertain)
