"""The server process: its event loop (asyncio or uvloop), its signals, and one server or, with
--workers N, N of them as child processes (service/workers.py)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from service.api.engine import EngineUnavailable, resolve_engine
from service.server import QuorumServer
from service.settings import Settings

log = logging.getLogger("service.server")  # its lines read as the server's, as before the split


def tune_gc(threshold: int) -> None:
    """The youngest generation's threshold (settings.gc_threshold; 0 keeps Python's): in this
    process and in every worker, before the models load."""
    if threshold:
        _, middle, oldest = gc.get_threshold()
        gc.set_threshold(threshold, middle, oldest)


async def serve(settings: Settings) -> None:
    from service.startup import StartupError

    tune_gc(settings.gc_threshold)
    try:
        server = QuorumServer(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.request_stop)
        await server.start()
    except Exception as exc:  # one line, no traceback (service/startup.py); the process ends, closing what was bound
        log.debug("start failed", exc_info=True)
        raise StartupError(f"could not start: {str(exc) or type(exc).__name__}") from None
    await server.wait()
    await server.stop()


def run(settings: Settings) -> int:
    try:  # before any worker starts or model loads
        resolve_engine(settings.grpc_engine, tls=bool(settings.tls_cert and settings.tls_key))
    except EngineUnavailable as exc:
        raise SystemExit(f"quorum serve: {exc}") from None
    if settings.workers > 1:
        from service.workers import run_workers

        return run_workers(settings)
    loop_factory = None
    if settings.event_loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(settings))
    return 0
