"""A batcher's dispatcher: one batch at a time, taken from the queue's head once the model is
free (lingering for a preferred size when configured), computed inline or on the model's
thread, each request answered with its slice, the batch reported to the observer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import ClassVar, Protocol

import numpy as np

from service.batching.queue import BatchQueue, Pending, scatter
from service.batching.requests import merge, split
from service.errors import ModelNotReady

# Lines keep the batcher's logger name, as before the split: operators filter the logs on it.
log = logging.getLogger("service.batching.batcher")

RunBatch = Callable[[np.ndarray], Awaitable[np.ndarray]]
RunHere = Callable[[np.ndarray], np.ndarray]


class BatchObserver(Protocol):
    def on_batch(self, model: str, batch_rows: int, queue_waits_s: list[float]) -> None:
        """Called once per dispatched batch with its row count and each request's wait."""


class BatchDispatcher(BatchQueue):
    """DynamicBatcher's dispatcher (a part of it: DynamicBatcher.__init__ sets the state below)."""

    requests_everywhere: ClassVar[int]  # DynamicBatcher's count, process-wide
    _run_batch: RunBatch
    _inline: RunHere | None
    _inline_rows: int
    _observer: BatchObserver | None
    _dispatcher: asyncio.Task[None] | None
    _in_flight: int
    _batches_running: int
    _stopping: bool
    _batch_s: float | None

    def _ensure_started(self) -> None:
        if self._dispatcher is None:
            self._wakeup = asyncio.Event()
            self._dispatcher = asyncio.get_running_loop().create_task(
                self._dispatch_loop(), name=f"batcher-{self.name}")
            self._dispatcher.add_done_callback(self._dispatcher_done)

    async def _dispatch_loop(self) -> None:
        cfg = self._config
        wakeup = self._wakeup
        assert wakeup is not None
        while True:
            while not (self._depth and not self._batches_running):
                if self._stopping and not self._depth and not self._batches_running:
                    return
                wakeup.clear()
                await wakeup.wait()
            if cfg.max_queue_delay_us and not self._stopping:
                await self._linger()
            batch, rows = self._take()
            if not batch:
                continue
            self._batches_running += 1
            self._in_flight += rows
            # One batch at a time, run inline (one task switch fewer per batch): the runtime
            # computes on a single executor thread, so a second batch could not overlap.
            await self._run(batch, rows)

    async def _linger(self) -> None:
        """Wait, up to max_queue_delay_us after the oldest queued request arrived, for
        the queued rows to reach the next preferred batch size."""
        cfg = self._config
        wakeup = self._wakeup
        assert wakeup is not None
        head = self._head()
        if head is None:
            return
        until = head.arrival + cfg.max_queue_delay_s
        while self._depth and self._queued_rows < cfg.target_rows(self._queued_rows) \
                and not self._stopping:
            remaining = until - self.clock()
            if remaining <= 0:
                return
            wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await wakeup.wait()
            except TimeoutError:
                return

    async def _run(self, batch: list[Pending], rows: int) -> None:
        try:
            if self._observer is not None:
                self._observe(batch, rows)
            merged, counts = merge([pending.rows for pending in batch])
            for pending in batch:
                pending.rows = None  # type: ignore[assignment]
            started = self.clock()
            if self._inline is not None and rows <= self._inline_rows and self.requests_everywhere == 1:
                # alone: nothing else for the loop to do while the model's thread computes
                outputs = split(self._inline(merged), counts)
            else:
                outputs = split(await self._run_batch(merged), counts)
            finished = self.clock()
            took = finished - started
            self._batch_s = took if self._batch_s is None else 0.8 * self._batch_s + 0.2 * took
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        except BaseException:
            # Cancelled (the loop is shutting down): fail the callers, then propagate.
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(ModelNotReady(
                        f"model '{self.name}' stopped while the batch was running"))
            raise
        else:
            for pending, output in zip(batch, outputs):
                pending.started, pending.finished, pending.batch_rows = started, finished, rows
                if not pending.future.done():
                    pending.future.set_result(scatter(output, pending.mask))
        finally:
            self._in_flight -= rows
            self._batches_running -= 1
            self._wake()

    def _observe(self, batch: list[Pending], rows: int) -> None:
        now = self.clock()
        try:
            self._observer.on_batch(self.name, rows, [now - a for p in batch for a in p.arrivals])  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - metrics must never fail a batch
            log.exception("batch observer failed for model '%s'", self.name)

    def _dispatcher_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.error("batcher '%s' dispatcher died", self.name, exc_info=task.exception())
            self._stopping = True
            self._fail_queued(ModelNotReady(f"model '{self.name}': batcher stopped"))
