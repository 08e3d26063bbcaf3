"""grpc.health.v1.Health, with Watch streams that end once shutdown has begun.

The reference servicer keeps every Watch stream open until the server stops, so one
watching client (a load balancer, a sidecar, `grpc-health-probe -watch`) would hold a
graceful shutdown for the whole grace period. Here a watcher gets NOT_SERVING, then its
stream ends with OK, and only the real in-flight RPCs are waited for.
"""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health.aio.HealthServicer):
    # Same bookkeeping as the parent's Watch (grpcio-health-checking pins its attributes),
    # plus the early return.
    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        condition = self._server_watchers[request.service]
        self._watcher_count_by_service[request.service] += 1
        last = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(request.service, SERVICE_UNKNOWN)
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                        last = status
                    if self._gracefully_shutting_down and status != SERVING:
                        return  # NOT_SERVING delivered: the stream must not delay the drain
                    await condition.wait()
        finally:
            self._watcher_count_by_service[request.service] -= 1
            if self._watcher_count_by_service[request.service] == 0:
                del self._server_watchers[request.service]
                del self._watcher_count_by_service[request.service]
