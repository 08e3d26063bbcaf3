"""Large JSON bodies decoded in a child process, so one request cannot hold the event loop.

json and numpy hold the GIL while they parse and convert, so a thread would stop the loop all
the same: 65,536 digits rows as JSON (13.8 MB) held it 1.1-1.9 s, failing a concurrent gRPC
call's 2 s deadline. A body under INLINE_BYTES (a few ms of parsing) is decoded on the loop;
a larger one goes to one spawned child process, started at the first large body, which also
keeps the Python lists of a large document out of the server's memory. Large bodies queue
for that one process, so they cannot take more than one core from inference either.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from service.errors import Unavailable

log = logging.getLogger(__name__)

INLINE_BYTES = 256 << 10
T = TypeVar("T")


class BodyDecoder:
    def __init__(self, inline_bytes: int = INLINE_BYTES) -> None:
        self.inline_bytes = inline_bytes
        self._pool: ProcessPoolExecutor | None = None

    async def run(self, size: int, decode: Callable[..., T], *args: Any) -> T:
        """decode(*args) for a body of `size` bytes: inline when small, else in the child
        (bytes, not memoryviews, cross to it). Its InvalidInput comes back as raised."""
        if size < self.inline_bytes:
            return decode(*args)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            log.info("large JSON bodies (%d bytes and more) are decoded in a child process", self.inline_bytes)
        args = tuple(bytes(a) if isinstance(a, memoryview) else a for a in args)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, decode, *args)
        except BrokenProcessPool:  # the child died (killed for memory, say): the next body gets a new one
            self._pool = None
            raise Unavailable("the process decoding large JSON bodies died while decoding this request; "
                              "send large tensors as binary data (or over gRPC)") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
