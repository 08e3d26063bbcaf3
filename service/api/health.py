"""grpc.health.v1.Health: readiness, per-model readiness and liveness on one service.

- service "" (and each API's service name): readiness, SERVING once the first load has
  finished and until the server drains (with --strict-readiness: only while every model
  and ensemble is ready);
- a model's or ensemble's own name: that model's readiness (an ensemble: it answers, its
  quorum of members serving);
- "<ensemble>/complete": SERVING only while every member of the ensemble serves; NOT_SERVING
  while it answers without some (degraded) or not at all;
- "liveness": the event loop is turning (service.liveness); unaffected by models or drain.

Watch streams end once the drain has delivered NOT_SERVING to them (the reference servicer
keeps them open until the server stops, so one watching client would hold a graceful
shutdown for the whole grace period); a "liveness" watcher ends when the server closes.
"""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
LIVENESS = "liveness"
COMPLETE = "complete"
"""Suffix of an ensemble's service name that is SERVING only while every member serves."""


# grpc-stubs 1.53 has no grpc_health.v1.health.aio (grpcio-health-checking's asyncio servicer).
class HealthServicer(health.aio.HealthServicer):  # type: ignore[name-defined]
    def __init__(self) -> None:
        super().__init__()
        self._server_status[""] = NOT_SERVING  # until the first load has finished
        self._server_status[LIVENESS] = SERVING
        self._closing = False

    async def update(self, statuses: dict[str, int]) -> None:
        """Set the services whose status changed (names missing from `statuses` keep theirs)."""
        for service, status in statuses.items():
            if self._server_status.get(service) != status:
                await self.set(service, status)

    async def drain(self) -> None:
        """NOT_SERVING for readiness and every model, for good; liveness stays as it is."""
        for service in list(self._server_status):
            if service != LIVENESS:
                await self._set(service, NOT_SERVING)
        self._gracefully_shutting_down = True  # later set() calls are ignored

    async def close(self) -> None:
        """End every Watch stream, liveness watchers included (the server is stopping)."""
        self._closing = True
        for condition in list(self._server_watchers.values()):
            async with condition:
                condition.notify_all()

    async def List(self, request: health_pb2.HealthListRequest, context) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for service, status in self._server_status.items():
            response.statuses[service].status = status
        return response

    # Same bookkeeping as the parent's Watch (grpcio-health-checking pins its attributes),
    # plus the early returns.
    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        condition = self._server_watchers[request.service]
        self._watcher_count_by_service[request.service] += 1
        last = None
        try:
            async with condition:
                while not self._closing:
                    status = self._server_status.get(request.service, SERVICE_UNKNOWN)
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                        last = status
                    if self._gracefully_shutting_down and request.service != LIVENESS:
                        return  # NOT_SERVING delivered: the stream must not delay the drain
                    await condition.wait()
        finally:
            self._watcher_count_by_service[request.service] -= 1
            if self._watcher_count_by_service[request.service] == 0:
                del self._server_watchers[request.service]
                del self._watcher_count_by_service[request.service]
