"""Take a batch of requests off a queue, merge their row blocks into one batch, and split
the batch's output back."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol, TypeVar

import numpy as np

from service.errors import DeadlineExceeded, Overloaded

Clock = Callable[[], float]
"""Where the queues (DynamicBatcher, EnsemblePipeline), the data plane and the manager read
the time for deadlines, expiry, straggler cutoffs and admission: time.monotonic() in
production, the clock of the deadlines the fronts compute (time.monotonic() instants). It
is a parameter, stored once at construction, so that tests run them on the event loop's
clock (`loop.time`, which looptime fast-forwards) and check time-dependent behaviour
exactly. Not the running loop's time() in production: under uvloop (--event-loop uvloop)
that is libuv's millisecond clock, which would coarsen every deadline and latency. Durations
only measured for metrics (compute in threads) stay on time.perf_counter()."""


class Queued(Protocol):
    n: int
    """Rows."""
    deadline: float | None
    queued: bool
    """Still waiting (False once taken, expired or cancelled: left in the deque, skipped)."""


Q = TypeVar("Q", bound=Queued)


def take_run(queue: deque[Q], limit: int, now: float, expire: Callable[[Q], None],
             signature: Callable[[Q], Hashable], batch: list[Q] | None = None, rows: int = 0) -> tuple[list[Q], int]:
    """Pop the longest run of live requests from the front of `queue` that share one
    signature and fit in `limit` rows (a first request larger than that goes alone), and
    their row count. Requests whose deadline is past are handed to `expire` on the way; the
    ones taken are marked not queued (the caller keeps its own counts). With `batch` (of
    `rows` rows), the run continues that batch: its signature, its room."""
    batch = [] if batch is None else batch
    first = signature(batch[0]) if batch else None
    while queue:
        entry = queue[0]
        if not entry.queued:
            queue.popleft()
            continue
        if entry.deadline is not None and entry.deadline <= now:
            queue.popleft()
            expire(entry)
            continue
        if batch and (rows + entry.n > limit or signature(entry) != first):
            break
        if not batch:
            first = signature(entry)
        queue.popleft()
        entry.queued = False
        batch.append(entry)
        rows += entry.n
    return batch, rows


def unread(future: asyncio.Future) -> None:
    """Mark as read the outcome of a future whose waiter was cancelled before reading it (its
    answer or error came in the same turn of the loop as the cancellation: a call's deadline
    is both its straggler cutoff and the instant gRPC cancels it). Unread, an error would be
    logged as 'Future exception was never retrieved' when the future is collected."""
    if future.done() and not future.cancelled():
        future.exception()


def refuse_if_late(what: str, queued_rows: int, batches: int, batch_s: float, time_left_s: float) -> None:
    """Overloaded (RESOURCE_EXHAUSTED) when `batches` at the measured `batch_s` each take
    longer than the request's deadline leaves: failing at once frees the client to retry
    elsewhere, and no model spends time on an answer nobody will read. A deadline that leaves
    no time at all (`time_left_s` <= 0: less than the safety margin before it) is its own
    limit, not the load's: DeadlineExceeded (DEADLINE_EXCEEDED)."""
    if time_left_s <= 0:
        raise DeadlineExceeded(f"{what}: the call's deadline leaves no time to answer it "
                               f"({time_left_s * 1000:.1f} ms after the safety margin)")
    needed_s = batches * batch_s
    if needed_s > time_left_s:
        raise Overloaded(
            f"{what}: {queued_rows} rows queued ahead, about {needed_s * 1000:.1f} ms of work "
            f"({batches} batches of {batch_s * 1000:.2f} ms), more than the "
            f"{max(time_left_s, 0.0) * 1000:.1f} ms its deadline leaves; retry later or elsewhere",
            retry_after_s=needed_s)


def merge(blocks: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """One batch from row blocks of shapes (n_i, ...), plus the row count of each block.

    A lone block is passed through without a copy.
    """
    counts = [block.shape[0] for block in blocks]
    if len(blocks) == 1:
        return blocks[0], counts
    return np.concatenate(blocks, axis=0), counts


def split(output: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """The output rows of each request, in order; `counts` as returned by `merge`.

    The parts are views of `output`, not copies.
    """
    total = sum(counts)
    if output.ndim == 0 or output.shape[0] != total:
        raise ValueError(
            f"batch output has shape {output.shape}, expected {total} rows (one per input row)")
    if len(counts) == 1:
        return [output]
    return np.split(output, np.cumsum(counts[:-1]))
