"""Entry admission on a controlled clock: a call whose deadline is shorter than the work in
flight ahead of it is refused at once (RESOURCE_EXHAUSTED); everything else is let in."""

from __future__ import annotations

import grpc
import pytest

from service import errors
from service._proto.inference import grpc_service_pb2 as v2_pb
from service.api.engine import build_server, sends_grpc_trailers
from service.api.admission import Admission
from service.api.handlers import HandlerWrapper
from service.batching.priority import Priority
from service.batching.requests import refuse_if_late


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _serving(clock: Clock) -> Admission:
    gate = Admission(clock)
    gate.loading = False
    return gate


def _measure(gate: Admission, clock: Clock, in_flight: int, per_second: float, calls: int) -> None:
    """Keep `in_flight` calls open and finish `calls` of them at `per_second`."""
    for _ in range(in_flight - gate.inflight):
        gate.enter(None)
    for _ in range(calls):
        clock.now += 1.0 / per_second
        gate.leave()
        gate.enter(None)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_a_call_whose_deadline_has_passed_is_deadline_exceeded_not_overloaded(busy):
    """Its own deadline ends it, idle or under load: DEADLINE_EXCEEDED, never 'overloaded'."""
    clock = Clock()
    gate = _serving(clock)
    if busy:
        _measure(gate, clock, in_flight=4, per_second=200.0, calls=100)
    for time_left_s in (0.0, -1e-6, -5.0):
        with pytest.raises(errors.DeadlineExceeded, match="deadline passed before it was admitted"):
            gate.enter(time_left_s)
    assert gate.inflight == (4 if busy else 0)  # nothing was let in


def test_a_deadline_shorter_than_the_work_in_flight_is_refused_at_once():
    clock = Clock()
    gate = _serving(clock)
    gate.enter(0.001)  # nothing measured yet: let in
    gate.leave()
    _measure(gate, clock, in_flight=10, per_second=100.0, calls=60)  # 0.6 busy s: measured
    assert gate.rate == pytest.approx(100.0, rel=0.05)
    # 10 calls ahead at 100/s: about 100 ms before a new one is answered, over twice 40 ms
    with pytest.raises(errors.Overloaded, match=r"10 calls in flight, about (9[5-9]|10[0-5]) ms of work"):  # RESOURCE_EXHAUSTED
        gate.enter(0.04)
    assert gate.inflight == 10  # the refused call holds nothing
    gate.enter(0.08)  # the work ahead is about its deadline (an ensemble at its cutoff): let in
    gate.enter(None)  # no deadline: let in
    gate.enter(0.5)  # time to spare
    assert gate.inflight == 13


def test_under_the_same_load_the_lowest_priority_is_refused_first_and_the_reserve_kept_for_the_highest():
    """Each level may count on its share of its deadline (Priority.share, as the model's own
    queue does): with 100 ms of work ahead, a call with 60 ms left is let in at the highest
    level (twice 60 ms covers it) and refused at the lowest, whose share leaves it 90 ms of
    the 120 (the top 25 %, priority_reserve, is kept for the highest), RESOURCE_EXHAUSTED
    naming its level; a middle level gets what lies between."""
    clock = Clock()
    gate = _serving(clock)
    _measure(gate, clock, in_flight=10, per_second=100.0, calls=60)  # about 100 ms of work ahead
    high, middle, low = (Priority(level, 3, 0.25) for level in (1, 2, 3))
    with pytest.raises(errors.Overloaded, match=r"priority 3 of 3 may wait 75% of that"):
        gate.enter(0.06, low)
    gate.enter(0.06, middle)  # 87.5 % of 120 ms: let in
    gate.enter(0.06, high)
    gate.enter(0.06, None)  # one class: the whole deadline, as before
    assert gate.inflight == 13
    with pytest.raises(errors.Overloaded):
        gate.enter(0.055, middle)  # 87.5 % of 110 ms < 130 ms ahead now
    gate.enter(0.07, high)  # 140 ms >= 130 ms ahead
    with pytest.raises(errors.DeadlineExceeded):
        gate.enter(0.0, high)  # its own deadline, whatever its level


def test_idle_time_does_not_count_against_the_rate():
    clock = Clock()
    gate = _serving(clock)
    _measure(gate, clock, in_flight=4, per_second=200.0, calls=100)
    for _ in range(gate.inflight):
        clock.now += 0.005
        gate.leave()
    clock.now += 60.0  # a quiet minute
    assert gate.inflight == 0
    gate.enter(0.001)  # nothing in flight: always let in, however short the deadline
    _measure(gate, clock, in_flight=4, per_second=200.0, calls=100)
    assert gate.rate == pytest.approx(200.0, rel=0.05)


def test_closing_and_loading_still_answer_unavailable_first():
    clock = Clock()
    gate = Admission(clock)
    with pytest.raises(errors.Unavailable, match="loading"):
        gate.enter(10.0)
    gate.loading = False
    gate.close()
    with pytest.raises(errors.Unavailable, match="shutting down"):
        gate.enter(10.0)


def test_a_refusal_on_work_ahead_says_when_that_work_will_have_drained():
    clock = Clock()
    gate = _serving(clock)
    _measure(gate, clock, in_flight=10, per_second=100.0, calls=60)
    with pytest.raises(errors.Overloaded) as refused:
        gate.enter(0.04)
    assert refused.value.retry_after_s == pytest.approx(0.1, rel=0.05)  # 10 calls at 100/s
    with pytest.raises(errors.Overloaded) as late:
        refuse_if_late("model 'm'", queued_rows=128, batches=3, batch_s=0.02, time_left_s=0.05)
    assert late.value.retry_after_s == pytest.approx(0.06)  # three batches of 20 ms
    with pytest.raises(errors.DeadlineExceeded, match="leaves no time"):  # the margin ate it: its own limit
        refuse_if_late("ensemble 'e'", queued_rows=1, batches=1, batch_s=0.02, time_left_s=-0.003)


@pytest.mark.parametrize("engine", ["grpcio", "native"])
async def test_resource_exhausted_carries_grpc_retry_pushback(engine):
    """What a stock gRPC client reads: the status at once, the message, and in the trailers
    the request id and, on grpcio, the pushback (gRPC's retry design: clients with a retry
    policy wait that long); an overload with nothing measured sends no pushback. The method
    is registered as the generated add_*_to_server registers the servicers (on native a
    generic handler would run on the grpcio server behind it). pygrpc-native reserves every
    `grpc-` trailer and leaves a call that sets one unanswered until its deadline, so there
    the refusal goes without the pushback: it must still arrive, and before the deadline."""
    method = "/inference.GRPCInferenceService/ModelInfer"
    refusals = iter([errors.Overloaded("busy for a while", retry_after_s=0.2504),
                     errors.Overloaded("queue full")])

    async def infer(request, context):
        raise next(refusals)

    handler = grpc.unary_unary_rpc_method_handler(
        infer, request_deserializer=v2_pb.ModelInferRequest.FromString,
        response_serializer=v2_pb.ModelInferResponse.SerializeToString)
    server = build_server(engine, options=[])
    HandlerWrapper(pushback=sends_grpc_trailers(engine)).registrar(server).add_registered_method_handlers(
        "inference.GRPCInferenceService", {"ModelInfer": handler})
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(method, request_serializer=v2_pb.ModelInferRequest.SerializeToString,
                                       response_deserializer=v2_pb.ModelInferResponse.FromString)
            trailers = []
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(v2_pb.ModelInferRequest(model_name="m", id="req-7"), timeout=30)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
                trailers.append(dict(err.value.trailing_metadata()))
    finally:
        await server.stop(0)
    assert trailers[0]["x-request-id"] == "req-7" and trailers[1]["x-request-id"] == "req-7"
    assert trailers[0].get("grpc-retry-pushback-ms") == ("250" if engine == "grpcio" else None)
    assert "grpc-retry-pushback-ms" not in trailers[1]
