"""Wiring and lifecycle: one grpc.aio server on one port for every service.

Shutdown order on SIGTERM/SIGINT: readiness turns NOT_SERVING at once (so Kubernetes and
load balancers stop routing); the server keeps accepting and answering for the drain delay;
then it refuses new calls (UNAVAILABLE) while the calls it accepted finish, within the grace
period; then the listener closes, and only then do the models drain and unload.

grpc.aio cancels calls that reached the transport but that the loop had not picked up yet
when `server.stop` is called, so `stop` comes only once the accepted calls are done and no
call has arrived for a moment: nothing accepted is left to cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.inference import grpc_service_pb2_grpc
from service._proto.quorum.v1 import ensemble_pb2_grpc
from service.api import reflection
from service.api.context import ApiContext
from service.api.engine import add_servicer, build_server, resolve_engine, sends_grpc_trailers
from service.api.ensemble import EnsembleServicer
from service.api.health import COMPLETE, LIVENESS, NOT_SERVING, SERVING, HealthServicer
from service.api.http import HttpServer, start_http
from service.api.admission import Admission
from service.api.priority import at_entry as priority_at_entry
from service.api.handlers import HandlerWrapper
from service.api.tfserving import ModelServicer, PredictionServicer
from service.api.v2 import InferenceServicer
from service.dataplane import DataPlane
from service.liveness import LoopWatchdog
from service.monitoring.monitor import Monitor
from service.monitoring.tracing import Tracing
from service.monitoring.statistics import Statistics
from service.objectives.state import open_store, startup_line
from service.remote.link import connect
from service.repository.manager import ModelManager
from service.settings import Settings
from service.workers import WorkerBarrier

log = logging.getLogger(__name__)


class QuorumServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.statistics = Statistics()
        # The monitor observes the manager and forwards to the statistics (ModelStatistics RPC).
        self.monitor = Monitor(settings, self.statistics) if settings.monitoring else None
        self.manager = ModelManager(settings, self.monitor or self.statistics, connector=connect)
        store = open_store(settings.state_url, password_file=settings.state_password_file, ttl_s=settings.state_ttl_s,
                           refresh_s=settings.state_refresh_s, queue_size=settings.state_queue)
        data = DataPlane(self.manager, store, observer=self.monitor)
        self.api = ApiContext(self.manager, data, self.statistics)
        if self.monitor:
            self.monitor.attach(self.manager, self.api.feedback, data.trackers, data.queued)
        self.metrics_port: int | None = None
        self.http: HttpServer | None = None  # the HTTP/REST front, unless http_port is 0
        self.tracing = Tracing.configure(settings.otlp_endpoint, settings.trace_sample_ratio)
        self.health = HealthServicer()
        self.admission = Admission()
        self.watchdog = LoopWatchdog(settings.liveness_timeout_s)
        self._models_in_health: set[str] = set()
        self.port = settings.grpc_port
        self._server: grpc.aio.Server | None = None
        self._health_task: asyncio.Task | None = None
        self._objectives_task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._tls: grpc.ServerCredentials | None = None
        self._opened = False  # the ports: a worker stopped before every worker loaded never opens them

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if not s.tls_cert:
            return None
        assert s.tls_key is not None  # Settings refuse a certificate without its key, and the reverse
        key, cert = s.tls_key.read_bytes(), s.tls_cert.read_bytes()
        ca = s.tls_client_ca.read_bytes() if s.tls_client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=ca is not None)

    async def start(self) -> None:
        """Alone, the ports open first (liveness SERVING, readiness NOT_SERVING while the models
        load); as one of --workers N, they open once every worker has loaded (service/workers.py)."""
        barrier = WorkerBarrier.from_env()
        self._build_grpc()
        if self.monitor:
            self.monitor.watch_loop(self.watchdog)
            self.metrics_port = self.monitor.start_http(self.settings.metrics_host, self.settings.metrics_port)
            log.info("Prometheus /metrics on port %d", self.metrics_port)
        self.watchdog.start()
        await self._start_store()
        if barrier is None:
            await self._open_ports()
            await self._load()
        else:
            await self._load()
            if not await barrier.loaded_then_go(self._stopping):
                log.info("stopped before every worker had loaded; the ports were never opened")
                return
            await self._open_ports()
        await self._update_health()
        self._health_task = asyncio.create_task(self._follow_health(), name="health")
        self._objectives_task = asyncio.create_task(
            self.api.data.run_objectives(self.settings.objective_interval_s), name="objectives")

    async def _start_store(self) -> None:
        """The feedback store: a malformed or unreachable one is one line, then a refusal to
        start with --state-required, else the server serves and Feedback answers UNAVAILABLE."""
        problem = await self.api.feedback.start()
        if problem is None:
            log.info("feedback store: %s", self.api.feedback.name)
            return
        line = startup_line(self.api.feedback, problem)
        if self.settings.state_required:
            await self.api.feedback.stop()
            raise RuntimeError(f"{line} (--state-required)")
        log.error("%s; serving without it: Feedback answers UNAVAILABLE while it cannot be used "
                  "(--state-required refuses to start instead)", line)

    def _build_grpc(self) -> None:
        """The gRPC server with every service registered; no port yet."""
        limit = self.settings.max_message_bytes
        self._tls = self._credentials()
        self.engine = resolve_engine(self.settings.grpc_engine, tls=self._tls is not None)
        self._server = build_server(
            self.engine,
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", int(self.settings.reuse_port))])
        # Every handler is wrapped as it is registered (auth, admission, errors, metrics).
        server = HandlerWrapper(token=self.settings.token(), observer=self.monitor, admission=self.admission,
                                tracing=self.tracing, pushback=sends_grpc_trailers(self.engine),
                                priorities=functools.partial(priority_at_entry, self.api)).registrar(self._server)
        from tensorflow_serving.apis import (model_service_pb2, model_service_pb2_grpc, prediction_service_pb2,
                                             prediction_service_pb2_grpc)

        add_servicer(server, prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server,
                     PredictionServicer(self.api), prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"])
        add_servicer(server, model_service_pb2_grpc.add_ModelServiceServicer_to_server,
                     ModelServicer(self.api), model_service_pb2.DESCRIPTOR.services_by_name["ModelService"])
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.api), server)
        ensemble_pb2_grpc.add_EnsembleServiceServicer_to_server(EnsembleServicer(self.api), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = reflection.service_names()
        reflection.enable(server, services + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
                          reflection.reflection_pool())

    async def _open_ports(self) -> None:
        """gRPC (grpcio listens from add_port on), then HTTP; health first, so a probe sees it."""
        assert self._server is not None
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        self.port = (self._server.add_secure_port(address, self._tls) if self._tls
                     else self._server.add_insecure_port(address))
        await self._update_health()
        await self._server.start()
        self._opened = True
        log.info("gRPC on port %d (%s), %s engine, %s event loop", self.port, "TLS" if self._tls else "plaintext",
                 self.engine, type(asyncio.get_running_loop()).__module__.partition(".")[0])
        if self.engine == "native":  # measured by bench/engine_memory.py; docs/performance.md
            log.warning("the native gRPC engine reads and inflates each request whole before the %d-byte message "
                        "limit applies, so one request can take GiBs of memory: serve it to trusted clients or "
                        "behind a proxy that bounds request bodies", self.settings.max_message_bytes)
        if self.settings.unauthenticated_control():  # allowed by --allow-unauthenticated-control only
            log.warning("model control is explicit without a bearer token (--allow-unauthenticated-control): "
                        "anyone who reaches the gRPC or HTTP port can load, unload and reconfigure models")
        self.http = await start_http(self.settings, self.api, token=self.settings.token(), observer=self.monitor,
                                     tracing=self.tracing)

    async def _load(self) -> None:
        await self.manager.start()
        if self.monitor:
            self.monitor.prime()
            self.monitor.start_drift()
        self._log_models()
        self.api.loaded = True
        self.admission.loading = False

    def _health_statuses(self) -> dict[str, int]:
        """Readiness for "" and each API, each model's own readiness, and liveness."""
        ready = SERVING if self.api.ready() else NOT_SERVING
        statuses = {service: ready for service in ["", *reflection.service_names()]}
        manager = self.manager
        models = (set(manager.variants) | set(manager.ensembles)) - {LIVENESS, ""}
        # "<ensemble>/complete": every member serves (NOT_SERVING while it answers degraded,
        # or not at all); "<ensemble>" stays its readiness. "/" is in no model's name.
        models |= {f"{name}/{COMPLETE}" for name in manager.ensembles}
        for name in models | self._models_in_health:  # a model removed from disk: NOT_SERVING
            statuses[name] = SERVING if name in models and self._serving(name) else NOT_SERVING
        self._models_in_health |= models
        statuses[LIVENESS] = SERVING if self.watchdog.alive() else NOT_SERVING
        return statuses

    def _serving(self, service: str) -> bool:
        """A model's or ensemble's readiness, or for "<ensemble>/complete" whether it is ready
        with every member serving."""
        name, _, part = service.partition("/")
        if not self.manager.is_ready(name):
            return False
        return not part or not self.manager.missing_members(name)

    async def _update_health(self) -> None:
        await self.health.update(self._health_statuses())

    async def _follow_health(self) -> None:
        """Health follows the models' states and the loop's liveness (after a stall too)."""
        while True:
            await asyncio.sleep(0.5)
            await self._update_health()

    def _log_models(self) -> None:
        """What serves once loaded; each failure was logged once by the manager, as it happened."""
        for status in self.manager.statuses():
            if not status.error:
                log.info("model %s version %d %s on %s: %s", status.model, status.version,
                         self.manager.resolve(status.model, status.version).runtime.framework,
                         status.device, status.state.name)
        for name, ensemble in self.manager.ensembles.items():
            if ensemble.config is not None and not ensemble.error:
                log.info("ensemble %s (%s): %s", name, ensemble.config.policy, ", ".join(ensemble.config.members))
        # The one line an operator looks for: loaded, and what is served (readiness turns SERVING next).
        manager = self.manager
        ready = sorted(n for n in set(manager.variants) | set(manager.ensembles) if manager.is_ready(n))
        not_ready = sorted(manager.named - set(ready))
        log.info("serving %d models and ensembles from %s: %s%s", len(ready), self.settings.model_repository,
                 ", ".join(ready) or "none", f"; not ready: {', '.join(not_ready)} (why: above)" if not_ready else "")

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        grace, delay = self.settings.grace_period_s, self.settings.drain_delay_s
        log.info("stopping: NOT_SERVING, draining in-flight requests (drain delay %.1fs, grace %.1fs)",
                 delay, grace)
        self.api.draining = True
        for task in (self._health_task, self._objectives_task):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.health.drain()
        if delay and self._opened:
            log.info("NOT_SERVING; still accepting for %.1fs while endpoints update", delay)
            await asyncio.sleep(delay)
        self.admission.close()
        http_stopped = asyncio.create_task(self.http.stop()) if self.http else None  # drains beside gRPC
        deadline = time.monotonic() + grace
        log.info("no longer accepting; %d requests in flight", self.admission.inflight)
        if not await self.admission.drained(deadline):
            log.warning("grace period over: %d requests still in flight, calls still arriving; closing",
                        self.admission.inflight)
        await self.health.close()
        if self._server and self._opened:
            await self._server.stop(max(0.0, deadline - time.monotonic()))
        if http_stopped:
            await http_stopped
        await self.manager.stop()
        await self.api.feedback.stop()  # after the last request: what they recorded is written
        if self.monitor:
            await self.monitor.stop()
        await asyncio.to_thread(self.tracing.shutdown)  # flushes the spans still queued
        await self.watchdog.stop()
        log.info("stopped")
