"""Graceful shutdown of the real server: SIGTERM in the middle of a burst of requests.

What the contract says (and Kubernetes relies on): health turns NOT_SERVING first; every
request the server had already accepted gets its answer; a request that arrives after the
listener closed is refused with UNAVAILABLE (it was never accepted, so a client may retry it
elsewhere); the models unload only after the RPCs finished; the process exits 0 within the
grace period. With `drain_delay_s`, the server keeps accepting for that long after going
NOT_SERVING, so endpoints can be updated before the listener closes.

To make "accepted before the signal" certain rather than a race, the burst runs against a
copy of the digits ensemble whose batcher lingers (max_queue_delay), and SIGTERM is sent once
the server's own gauge says it holds all 200 requests: they are answered after it.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from tests.e2e.fixtures import Reference
from tests.helpers import onnx_ensemble
from tests.server import RunningServer, running_server

BOTH_ENGINES = True  # the subject is the transport (tests/e2e/conftest.py)

BURST = 200
LINGER_S = 4.0  # how long the scratch ensemble's batcher holds the burst
GRACE_S = 15.0
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ROUNDS = 3  # per engine and process layout: 12 SIGTERMs under load in all


def _request(pixels: np.ndarray) -> pb.PredictRequest:
    rows = np.ascontiguousarray(pixels, dtype=np.float32).reshape(-1, 64)
    return pb.PredictRequest(model="digits", inputs=pb.Tensor(
        dtype="FP32", shape=list(rows.shape), content=rows.tobytes()))


def inflight(server: RunningServer, api: str = "quorum") -> float:
    """The server's quorum_inflight_requests gauge for one API, from its /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    prefix = f'quorum_inflight_requests{{api="{api}"}} '
    return next((float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


@dataclass
class Timeline:
    """Monotonic instants of what the test saw, to check their order."""

    health: list[tuple[float, int]] = field(default_factory=list)
    watch_ended: float | None = None
    watch_code: grpc.StatusCode | None = None
    exited: float | None = None

    def first(self, status: int) -> float | None:
        return next((t for t, s in self.health if s == status), None)


def _watch_health(server: RunningServer, timeline: Timeline, started: threading.Event) -> None:
    """Health.Watch on its own channel, recording each status with the time it arrived."""
    with grpc.insecure_channel(server.address) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                            timeout=60)
        try:
            for response in stream:
                timeline.health.append((time.monotonic(), response.status))
                started.set()
            timeline.watch_code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            timeline.watch_code = exc.code()
        timeline.watch_ended = time.monotonic()


def _watch_exit(server: RunningServer, timeline: Timeline) -> None:
    server.process.wait(timeout=90)
    timeline.exited = time.monotonic()


def _start_watchers(server: RunningServer, timeline: Timeline) -> list[threading.Thread]:
    started = threading.Event()
    threads = [threading.Thread(target=_watch_health, args=(server, timeline, started), daemon=True),
               threading.Thread(target=_watch_exit, args=(server, timeline), daemon=True)]
    for t in threads:
        t.start()
    assert started.wait(10), "Health.Watch sent nothing"
    assert timeline.health[0][1] == health_pb2.HealthCheckResponse.SERVING
    return threads


@dataclass
class Outcome:
    sent: float
    done: float
    code: grpc.StatusCode
    label: str = ""
    details: str = ""


async def _call(stub: pb_grpc.EnsembleServiceStub, pixels: np.ndarray) -> Outcome:
    sent = time.monotonic()
    try:
        response = await stub.Predict(_request(pixels), timeout=60)
        return Outcome(sent, time.monotonic(), grpc.StatusCode.OK, response.predictions[0].label)
    except grpc.aio.AioRpcError as exc:
        return Outcome(sent, time.monotonic(), exc.code(), details=exc.details() or "")


async def _late_request(address: str, pixels: np.ndarray) -> Outcome:
    async with grpc.aio.insecure_channel(address) as channel:
        return await _call(pb_grpc.EnsembleServiceStub(channel), pixels)


@pytest.fixture
def lingering_repo(tmp_path):
    """The ONNX digits members, with an ensemble whose batches wait LINGER_S to fill."""
    return onnx_ensemble(tmp_path / "repo", linger_s=LINGER_S)


def test_sigterm_during_a_burst_answers_every_accepted_request(tmp_path, lingering_repo, test_split):
    x, y = test_split
    pixels = [x[i % len(x)][None] for i in range(BURST)]
    timeline = Timeline()
    with running_server(tmp_path, lingering_repo, env={"QUORUM_GRACE_PERIOD": str(GRACE_S)}) as server:
        threads = _start_watchers(server, timeline)

        async def scenario() -> tuple[list[Outcome], float, Outcome, Outcome]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.EnsembleServiceStub(channel)
                await channel.channel_ready()
                burst = [asyncio.ensure_future(_call(stub, p)) for p in pixels]
                while inflight(server) < BURST:  # every request is taken by the server
                    assert not any(f.done() for f in burst), "the burst finished before the signal"
                    await asyncio.sleep(0.05)
                assert not any(f.done() for f in burst), "the burst finished before the signal"
                signalled = time.monotonic()
                server.process.send_signal(signal.SIGTERM)
                while timeline.first(NOT_SERVING) is None:  # the listener closes right after
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.2)
                late_new_channel = await _late_request(server.address, pixels[0])
                late_same_channel = await _call(stub, pixels[0])
                return await asyncio.gather(*burst), signalled, late_new_channel, late_same_channel

        outcomes, signalled, late_new, late_same = asyncio.run(scenario())
        code = server.process.wait(timeout=GRACE_S + 10)
        for t in threads:
            t.join(timeout=10)
        log = server.output()

    # Every request sent before the signal was accepted, and answered after the signal.
    codes = {o.code for o in outcomes}
    assert codes == {grpc.StatusCode.OK}, f"{[(o.code.name, o.details) for o in outcomes if o.code != grpc.StatusCode.OK][:5]}\n{log[-3000:]}"
    assert all(o.sent < signalled < o.done for o in outcomes)
    accuracy = np.mean([o.label == str(y[i % len(y)]) for i, o in enumerate(outcomes)])
    assert accuracy > 0.9
    # A request that arrives once the server stopped accepting is refused, never half-served.
    assert late_new.code == grpc.StatusCode.UNAVAILABLE, late_new
    assert late_same.code == grpc.StatusCode.UNAVAILABLE, late_same
    assert late_new.done < min(o.done for o in outcomes)  # refused while the burst was in flight

    # Order: NOT_SERVING, then the answers, then the exit, all within the grace period.
    not_serving = timeline.first(NOT_SERVING)
    assert not_serving is not None and signalled < not_serving < min(o.done for o in outcomes)
    assert timeline.exited is not None and max(o.done for o in outcomes) < timeline.exited
    assert code == 0, log[-3000:]
    # A Health.Watch stream must not hold the shutdown for the whole grace period: it ends
    # cleanly (OK) once it has delivered NOT_SERVING. Held, the grace period would run out and
    # end it otherwise (CANCELLED or UNAVAILABLE), and with it any request still running: no
    # wall-clock bound needed, which a loaded machine could break.
    assert timeline.watch_code == grpc.StatusCode.OK
    # Models unload only after the RPCs finished.
    assert log.index("draining") < log.index("unloaded") < log.index("stopped")
    assert "still running" not in log


def test_drain_delay_keeps_accepting_after_not_serving(tmp_path, test_split):
    """With drain_delay_s the listener stays open while endpoints catch up with NOT_SERVING."""
    x, _ = test_split
    delay = 6.0  # wide: under full load, NOT_SERVING and the late call still fit well inside it
    timeline = Timeline()
    with running_server(tmp_path, env={"QUORUM_DRAIN_DELAY": str(delay),
                                       "QUORUM_GRACE_PERIOD": str(GRACE_S)}) as server:
        threads = _start_watchers(server, timeline)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        while timeline.first(NOT_SERVING) is None and time.monotonic() - signalled < delay / 2:
            time.sleep(0.02)
        during = asyncio.run(_late_request(server.address, x[:1]))
        checked = server.health()
        code = server.process.wait(timeout=GRACE_S + 10)
        for t in threads:
            t.join(timeout=10)
        after = asyncio.run(_late_request(server.address, x[:1]))
        log = server.output()

    # In order: NOT_SERVING, then a new call still answered (the listener is open), then the
    # exit, no sooner than the drain delay after the signal (a loaded machine can only make
    # it later); after the exit, refused.
    not_serving = timeline.first(NOT_SERVING)
    assert not_serving is not None and signalled < not_serving < during.done
    assert during.code == grpc.StatusCode.OK and during.label in "0123456789", log[-3000:]
    assert checked == NOT_SERVING
    assert timeline.exited is not None and during.done < timeline.exited
    assert timeline.exited >= signalled + delay
    assert after.code == grpc.StatusCode.UNAVAILABLE
    assert code == 0, log[-3000:]


class Sender(threading.Thread):
    """One client on its own connection, sending the next request as soon as one is answered,
    until the server refuses one (UNAVAILABLE: it no longer accepts; a client behind a load
    balancer moves to another replica then)."""

    def __init__(self, address: str, pixels: np.ndarray, expected: list[str]) -> None:
        super().__init__(daemon=True)
        self.address, self.pixels, self.expected = address, pixels, expected
        self.outcomes: list[Outcome] = []
        self.wrong = 0

    def run(self) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]  # its own connection: spread over workers
        with grpc.insecure_channel(self.address, options=options) as channel:
            stub = pb_grpc.EnsembleServiceStub(channel)
            i = 0
            while True:
                sent = time.monotonic()
                try:
                    response = stub.Predict(_request(self.pixels[i % len(self.pixels)]), timeout=60)
                    self.outcomes.append(Outcome(sent, time.monotonic(), grpc.StatusCode.OK))
                    self.wrong += response.predictions[0].label != self.expected[i % len(self.pixels)]
                except grpc.RpcError as exc:
                    self.outcomes.append(Outcome(sent, time.monotonic(), exc.code(), details=exc.details() or ""))
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        return
                i += 1


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_sigterm_under_load_again_and_again_loses_nothing(tmp_path, test_split, workers):
    """SIGTERM while clients keep sending: every request the server took is answered (OK),
    every other one is refused with UNAVAILABLE; requests keep being answered through the
    drain delay; the process exits 0. ROUNDS times over, on one process and on --workers 2."""
    x, _ = test_split
    repo = onnx_ensemble(tmp_path / "repo", policy="soft")
    pixels = [x[i][None] for i in range(32)]
    expected = [str(v) for v in Reference(repo).vote("digits", x[:32]).label_index]  # labels are "0".."9"
    args = ["--workers", str(workers)] if workers > 1 else []
    for round_ in range(ROUNDS):
        (tmp_path / f"round{round_}").mkdir()
        with running_server(tmp_path / f"round{round_}", repo, args=args, env={
                "QUORUM_DRAIN_DELAY": "1.0", "QUORUM_GRACE_PERIOD": str(GRACE_S)}) as server:
            end = time.monotonic() + 120
            while server.output().count("ensemble digits (") < workers:  # every worker has loaded
                assert time.monotonic() < end, server.output()[-3000:]
                time.sleep(0.1)
            senders = [Sender(server.address, pixels, expected) for _ in range(8)]
            for s in senders:
                s.start()
            end = time.monotonic() + 60
            while sum(len(s.outcomes) for s in senders) < 50 and time.monotonic() < end:
                time.sleep(0.05)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            for s in senders:
                s.join(timeout=GRACE_S + 30)
            code = server.process.wait(timeout=GRACE_S + 30)
            log = server.output()
        outcomes = [o for s in senders for o in s.outcomes]
        lost = [(o.code.name, o.details) for o in outcomes
                if o.code not in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)]
        assert lost == [], f"round {round_}: {lost[:5]}\n{log[-3000:]}"
        assert not any(s.is_alive() for s in senders)
        assert sum(s.wrong for s in senders) == 0
        after = [o for o in outcomes if o.sent > signalled and o.code == grpc.StatusCode.OK]
        assert after, f"round {round_}: nothing answered during the drain delay"
        refused = [o for o in outcomes if o.code == grpc.StatusCode.UNAVAILABLE]
        assert all(o.sent > signalled for o in refused)  # only ever after the signal
        assert code == 0, log[-3000:]
        assert "still running" not in log and "still in flight" not in log
