"""Wiring and lifecycle: one grpc.aio server on one port for every service.

Shutdown order on SIGTERM/SIGINT: health turns NOT_SERVING (so Kubernetes stops routing),
the gRPC server stops accepting and gives in-flight RPCs the grace period, then the models
drain and unload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto import POOL
from service._proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
from service._proto.quorum.v1 import ensemble_pb2, ensemble_pb2_grpc
from service.api import reflection
from service.api.context import ApiContext
from service.api.ensemble import EnsembleServicer
from service.api.health import HealthServicer
from service.api.http import HttpServer, start_http
from service.api.interceptors import ServiceInterceptor
from service.api.tfserving import ModelServicer, PredictionServicer
from service.api.v2 import InferenceServicer
from service.dataplane import DataPlane
from service.monitoring.monitor import Monitor
from service.monitoring.statistics import Statistics
from service.repository.manager import ModelManager
from service.settings import Settings

log = logging.getLogger(__name__)


def _service_names() -> list[str]:
    from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2

    return [
        prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name,
        model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
        grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        ensemble_pb2.DESCRIPTOR.services_by_name["EnsembleService"].full_name,
    ]


def _add_to_pool(pool: descriptor_pool.DescriptorPool, file: FileDescriptor) -> None:
    """Copy a proto file (dependencies first) into the reflection pool, once."""
    try:
        pool.FindFileByName(file.name)
        return
    except KeyError:
        pass
    for dependency in file.dependencies:
        _add_to_pool(pool, dependency)
    pool.AddSerializedFile(file.serialized_pb)


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """Quorum's protos live in their own pool (tritonclient registers the same `inference`
    names in the default pool); TF Serving's and health's files are copied in beside them."""
    from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2

    for module in (prediction_service_pb2, model_service_pb2, health_pb2):
        _add_to_pool(POOL, module.DESCRIPTOR)
    return POOL


class QuorumServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.statistics = Statistics()
        # The monitor observes the manager and forwards to the statistics (ModelStatistics RPC).
        self.monitor = Monitor(settings, self.statistics) if settings.monitoring else None
        self.manager = ModelManager(settings, self.monitor or self.statistics)
        data = DataPlane(self.manager)
        self.api = ApiContext(self.manager, data, self.statistics, monitor=self.monitor)
        if self.monitor:
            self.monitor.attach(self.manager, self.api.feedback, data.trackers)
        self.metrics_port: int | None = None
        self.http: HttpServer | None = None  # the HTTP/REST front, unless http_port is 0
        self.health = HealthServicer()
        self.port = settings.grpc_port
        self._server: grpc.aio.Server | None = None
        self._health_task: asyncio.Task | None = None
        self._objectives_task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if not (s.tls_cert and s.tls_key):
            return None
        key, cert = s.tls_key.read_bytes(), s.tls_cert.read_bytes()
        ca = s.tls_client_ca.read_bytes() if s.tls_client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=ca is not None)

    def _token(self) -> str | None:
        s = self.settings
        if s.auth_token_file:
            return s.auth_token_file.read_text().strip()
        return s.auth_token

    async def start(self) -> None:
        limit = self.settings.max_message_bytes
        self._server = grpc.aio.server(
            interceptors=[ServiceInterceptor(token=self._token(), observer=self.monitor)],
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", int(self.settings.reuse_port))])
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(self.api), self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(self.api), self._server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.api), self._server)
        ensemble_pb2_grpc.add_EnsembleServiceServicer_to_server(EnsembleServicer(self.api), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        services = _service_names()
        reflection.enable(self._server, services + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
                          _reflection_pool())
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        credentials = self._credentials()
        self.port = (self._server.add_secure_port(address, credentials) if credentials
                     else self._server.add_insecure_port(address))
        if self.monitor:
            self.metrics_port = self.monitor.start_http(self.settings.metrics_host, self.settings.metrics_port)
            log.info("Prometheus /metrics on port %d", self.metrics_port)
        await self._set_health(False)
        await self._server.start()  # probes get NOT_SERVING while the models load
        log.info("gRPC on port %d (%s)", self.port, "TLS" if credentials else "plaintext")
        self.http = await start_http(self.settings, self.api, token=self._token(), observer=self.monitor)
        await self.manager.start()
        if self.monitor:
            self.monitor.start_drift()
        self._log_models()
        await self._set_health(self.api.ready())
        self._health_task = asyncio.create_task(self._follow_health(), name="health")
        self._objectives_task = asyncio.create_task(
            self.api.data.run_objectives(self.settings.objective_interval_s), name="objectives")

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ["", *_service_names()]:
            await self.health.set(service, status)

    async def _follow_health(self) -> None:
        """Health follows readiness: a model that fails or is unloaded turns it NOT_SERVING."""
        serving = self.api.ready()
        while True:
            await asyncio.sleep(0.5)
            now = self.api.ready()
            if now != serving:
                serving = now
                await self._set_health(now)

    def _log_models(self) -> None:
        for status in self.manager.statuses():
            if status.error:
                log.error("model %s version %d FAILED: %s", status.model, status.version, status.error)
            else:
                log.info("model %s version %d %s on %s: %s", status.model, status.version,
                         self.manager.resolve(status.model, status.version).runtime.framework,
                         status.device, status.state.name)
        for name, ensemble in self.manager.ensembles.items():
            if ensemble.config is None:
                log.error("ensemble %s FAILED: %s", name, ensemble.error)
            else:
                log.info("ensemble %s (%s): %s", name, ensemble.config.policy, ", ".join(ensemble.config.members))

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        grace = self.settings.grace_period_s
        log.info("stopping: NOT_SERVING, draining in-flight requests (grace %.1fs)", grace)
        self.api.draining = True
        for task in (self._health_task, self._objectives_task):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.health.enter_graceful_shutdown()
        if self.settings.drain_delay_s:
            log.info("NOT_SERVING; still accepting for %.1fs while endpoints update", self.settings.drain_delay_s)
            await asyncio.sleep(self.settings.drain_delay_s)
        http_stopped = asyncio.create_task(self.http.stop()) if self.http else None  # drains beside gRPC
        if self._server:
            await self._server.stop(grace)
        if http_stopped:
            await http_stopped
        await self.manager.stop()
        if self.monitor:
            await self.monitor.stop()
        log.info("stopped")


async def serve(settings: Settings) -> None:
    server = QuorumServer(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.request_stop)
    await server.start()
    await server.wait()
    await server.stop()


def run(settings: Settings) -> int:
    if settings.workers > 1:
        from service.workers import run_workers

        return run_workers(settings)
    asyncio.run(serve(settings))
    return 0
