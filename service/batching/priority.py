"""Priority classes of queued requests: a request's level, the queue share each level may
fill, and taking a batch from the highest level first."""

from __future__ import annotations

import contextvars
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from service.batching.requests import Queued, take_run


@dataclass(frozen=True, slots=True)
class Priority:
    level: int
    """1 is the highest."""
    levels: int
    reserve: float
    """Share of the queue kept for the highest level (see share)."""

    @property
    def share(self) -> float:
        """How much of the queue this level may fill: all of it for the highest, less the
        reserve for the lowest, linearly in between, so the lowest is refused first."""
        if self.levels == 1:
            return 1.0
        return 1.0 - self.reserve * (self.level - 1) / (self.levels - 1)


PRIORITY: contextvars.ContextVar[Priority | None] = contextvars.ContextVar("quorum_priority", default=None)
"""The priority of the request being served in this task, set by the front that decoded it
(and validated against the model's levels there); None: one class. A context variable, as
the trace collector is: the data plane between the front and the queue carries it untouched."""

Q = TypeVar("Q", bound=Queued)


def take_by_priority(queues: Mapping[int, deque[Q]], limit: int, now: float, expire: Callable[[Q], None],
                     signature: Callable[[Q], Hashable]) -> tuple[list[Q], int]:
    """As requests.take_run, over one queue per level: the batch starts at the head of the
    highest level with a live request, and fills from the heads of that level and then the
    lower ones (requests of its signature, in order, up to `limit` rows)."""
    batch: list[Q] = []
    rows = 0
    for level in sorted(queues):
        batch, rows = take_run(queues[level], limit, now, expire, signature, batch, rows)
        if batch and rows >= limit:
            break
    return batch, rows
