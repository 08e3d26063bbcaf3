"""The barrier that keeps --workers' ports closed until every worker has loaded
(service/workers.py), with real pipes between the parent's gate and each worker's side: the
ports open once all said "loaded"; a worker that exits while loading keeps them closed and
tells the workers still waiting to stop; a stop asked of a waiting worker ends its wait."""

from __future__ import annotations

import asyncio
import os

from service.workers import WorkerBarrier, _Gate


def _workers(gate: _Gate) -> list[WorkerBarrier]:
    barriers = []
    for index in range(len(gate.loaded)):
        loaded_fd, go_fd = gate.child_fds(index)
        barriers.append(WorkerBarrier(os.dup(loaded_fd), os.dup(go_fd)))  # the worker's own copies
    gate.after_spawn()  # the parent closes its copies of the workers' ends, as after Popen
    return barriers


async def _wait_all(gate: _Gate, waits: list) -> list[bool]:
    pending = [asyncio.ensure_future(w) for w in waits]
    while not all(p.done() for p in pending):
        await asyncio.to_thread(gate.poll, 0.05)
    return [p.result() for p in pending]


def test_the_ports_open_once_every_worker_has_said_loaded():
    async def run() -> list[bool]:
        gate = _Gate(2)
        first, second = _workers(gate)
        return await _wait_all(gate, [first.loaded_then_go(asyncio.Event()), second.loaded_then_go(asyncio.Event())])

    assert asyncio.run(run()) == [True, True]


def test_a_worker_that_exits_while_loading_keeps_the_ports_closed_for_the_others():
    async def run() -> tuple[bool, bool]:
        gate = _Gate(2)
        first, second = _workers(gate)
        os.close(second.loaded_fd)  # worker 1 dies while loading: its ends close
        os.close(second.go_fd)
        (opened,) = await _wait_all(gate, [first.loaded_then_go(asyncio.Event())])
        return opened, gate.released

    assert asyncio.run(run()) == (False, True)


def test_a_stop_ends_a_workers_wait_without_opening():
    async def run() -> bool:
        gate = _Gate(2)
        first, _second = _workers(gate)  # worker 1 never says loaded
        stopping = asyncio.Event()
        waiting = asyncio.ensure_future(first.loaded_then_go(stopping))
        await asyncio.sleep(0)
        stopping.set()  # SIGTERM while waiting
        return await waiting

    assert asyncio.run(run()) is False
