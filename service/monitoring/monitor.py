"""The server's one observer: manager hooks (batches, compute, load failures), RPC hooks
from the gRPC handler wrapper, per-inference hooks from the API, drift windows, and the scrape-time
collectors. It forwards the manager's hooks to `Statistics` (the v2 ModelStatistics RPC).

Per-request work is an in-flight count, one append of the RPC's outcome (flushed into the
counters and histograms in bulk: before each scrape, and every Monitor.FLUSH_EVERY RPCs)
and, for drift, one append to preallocated ring buffers. Per batch, its histogram values
(sizes, waits, compute, vote, agreement, member latency) are held the same way (HeldObservations).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.core import CounterMetricFamily

from service.monitoring import drift, state_collectors
from service.monitoring.drift_watch import DriftWatch
from service.monitoring.bulk_histograms import HeldObservations, observe_many
from service.monitoring.metrics import Catalogue, GpuCollector, StateCollector, gauge
from service.monitoring.metrics_server import MetricsServer
from service.monitoring.statistics import Statistics

if TYPE_CHECKING:  # no import cycles at run time; nothing here imports grpc
    from service.results import InferenceResult
    from service.objectives.store import Store
    from service.objectives.tracker import ObjectiveTracker
    from service.repository.manager import ModelManager
    from service.settings import Settings

log = logging.getLogger(__name__)

API_OF = (("/inference.GRPCInferenceService/", "kserve_v2"),
          ("/rest.kserve_v2/", "kserve_v2_rest"),  # the HTTP front (service/api/http)
          ("/rest.tfserving/", "tfserving_rest"),
          ("/tensorflow.serving.", "tfserving"),
          ("/quorum.v1.", "quorum"),
          ("/grpc.health.", "health"),
          ("/grpc.reflection.", "reflection"))
OK = "OK"


def api_of(method: str) -> str:
    for prefix, api in API_OF:
        if method.startswith(prefix):
            return api
    return "other"


def request_model(request: Any) -> str:
    """The model a request names, whatever the protocol ('' when it names none)."""
    if request is None:
        return ""
    for field in ("model_name", "model", "name"):
        value = getattr(request, field, None)
        if isinstance(value, str):
            return value
    spec = getattr(request, "model_spec", None)
    return getattr(spec, "name", "") if spec is not None else ""


class Monitor(DriftWatch):
    FLUSH_EVERY = 1024
    """Finished RPCs held before the loop flushes them itself (between scrapes)."""

    def __init__(self, settings: "Settings", statistics: Statistics | None = None) -> None:
        self.settings = settings
        self.statistics = statistics
        self.metrics = Catalogue()
        self.registry = self.metrics.registry
        self.trackers: dict[str, "ObjectiveTracker"] = {}
        self.queued: Callable[[], dict[str, int]] = dict
        self.gpus = GpuCollector()
        self.manager: ModelManager | None = None
        self.feedback: Store | None = None
        self.window = settings.drift_window
        self.min_rows = min(settings.drift_min_rows, settings.drift_window)
        self.drift_windows: dict[str, drift.DriftWindow] = {}
        self.drift_results: dict[str, list[drift.SignalValue]] = {}
        self._no_reference: set[tuple[str, tuple]] = set()  # (model, its reference key)
        self._rpc: dict[tuple[str, str, Any], Any] = {}  # (method, model, status code) -> counter
        self._api: dict[str, str] = {}  # method -> api label
        self._inflight: dict[str, int] = {}  # api -> RPCs being answered
        self._finished: collections.deque[tuple[str, str, Any, float]] = collections.deque()
        self._flush_lock = threading.Lock()
        self.metrics.before_collect.append(self.flush_rpcs)
        self._held = HeldObservations()  # per-batch observations, bucketed in bulk
        self.metrics.before_collect.append(self._held.flush)
        self._per_model: dict[str, tuple[Any, ...]] = {}
        self._per_ensemble: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._known: frozenset[str] = frozenset()
        self._known_at = 0.0
        self._server: MetricsServer | None = None
        self._task: asyncio.Task | None = None
        for part in (self._collect_models, self._collect_feedback,
                     lambda: state_collectors.drift_state(self.drift_windows, self.drift_results),
                     lambda: state_collectors.satisficing_state(self.trackers)):
            self.registry.register(StateCollector(part))  # each guarded: one failing part skips only itself
        self.registry.register(self.gpus)

    # -- lifecycle -------------------------------------------------------------------------
    def attach(self, manager: "ModelManager", feedback: "Store",
               trackers: dict[str, "ObjectiveTracker"] | None = None,
               queued: Callable[[], dict[str, int]] | None = None) -> None:
        """The state exported at scrape time: models, feedback and satisficing trackers, and
        `queued`: requests waiting at each model's and ensemble's queue, before any batcher."""
        self.manager, self.feedback = manager, feedback
        self.trackers = trackers if trackers is not None else {}
        self.queued = queued or dict

    def prime(self) -> None:
        """Create the counters docs/metrics.md says start at 0, for every model and ensemble
        the manager knows (called after each load, so they are in the first scrape)."""
        manager = self.manager
        if manager is None:
            return
        # Every name the repository holds, a model whose model.yaml does not load included
        for name in set(manager.named) | set(manager.variants) | set(manager.ensembles):
            self.metrics.load_failures.labels(name)
        for name, ensemble in list(manager.ensembles.items()):
            if ensemble.config is not None:
                for member in ensemble.config.members:
                    self.metrics.members_dropped.labels(name, member)

    def watch_loop(self, watchdog: Any) -> None:
        """Export the event loop's heartbeat (service.liveness.LoopWatchdog) at scrape time;
        the scrape is answered by its own thread, so this reads right while the loop is stuck."""
        def collect() -> Iterable:
            yield gauge("quorum_event_loop_heartbeat_age_seconds",
                        "Seconds since the event loop last ticked (liveness fails past liveness_timeout_s).",
                        [], [([], watchdog.heartbeat_age_s)])
            stalls = CounterMetricFamily("quorum_event_loop_stalls",
                                         "Event-loop stalls longer than liveness_timeout_s.")
            stalls.add_metric([], float(watchdog.stalls))
            yield stalls
        self.registry.register(StateCollector(collect))

    def start_http(self, host: str, port: int) -> int:
        self._server = MetricsServer(self.registry, host, port)
        return self._server.start()

    @property
    def port(self) -> int | None:
        return self._server.port if self._server else None

    def start_drift(self) -> None:
        self._task = asyncio.create_task(self._drift_loop(), name="drift")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._server:
            self._server.stop()

    # -- manager observer ------------------------------------------------------------------
    def _model(self, name: str) -> tuple[Any, ...]:
        children = self._per_model.get(name)
        if children is None:
            m = self.metrics
            children = self._per_model[name] = (
                m.batch_size.labels(name), m.queue_wait.labels(name), m.compute.labels(name),
                m.vote.labels(name), m.inference_rows.labels(name))
        return children

    def on_batch(self, model: str, batch_rows: int, queue_waits_s: list[float]) -> None:
        if self.statistics:
            self.statistics.on_batch(model, batch_rows, queue_waits_s)
        batch, queue = self._model(model.rpartition(":")[0] or model)[:2]
        self._held.observe(batch, batch_rows)
        self._held.observe_many(queue, queue_waits_s)

    def on_compute(self, model: str, version: int, rows: int, seconds: float) -> None:
        if self.statistics:
            self.statistics.on_compute(model, version, rows, seconds)
        self._held.observe(self._model(model)[2], seconds)

    def on_load_failure(self, model: str, version: int) -> None:
        self.metrics.load_failures.labels(model).inc()

    # -- RPC observer (the handler wrapper) -----------------------------------------------
    def _bounded(self, model: str) -> str:
        if not model:
            return ""
        now = time.monotonic()
        if model not in self._known and now - self._known_at > 1.0 and self.manager is not None:
            self._known = frozenset(self.manager.variants) | frozenset(self.manager.ensembles)
            self._known_at = now
        return model if model in self._known else "unknown"

    def on_rpc_start(self, method: str) -> None:
        api = self._api.get(method)
        if api is None:
            api = self._api[method] = api_of(method)
            if api not in self._inflight:  # the gauge reads the count at scrape time
                self._inflight[api] = 0
                self.metrics.inflight.labels(api).set_function(functools.partial(self._inflight.__getitem__, api))
        self._inflight[api] += 1

    def on_rpc(self, method: str, code: Any, seconds: float, request: Any = None) -> None:
        """One finished RPC, queued for the next flush: per request a tuple and an append
        (prometheus-client's inc() and observe() take a lock each, three per RPC, and bucket
        the duration one value at a time: 6.6 % of the loop in a native ensemble profile)."""
        api = self._api.get(method)
        if api is None:  # an outcome without its start (none in the server): count it in, then out
            self.on_rpc_start(method)
            api = self._api[method]
        self._inflight[api] -= 1
        self._finished.append((method, self._bounded(request_model(request)), code, seconds))
        if len(self._finished) >= self.FLUSH_EVERY:
            self.flush_rpcs()

    def flush_rpcs(self) -> None:
        """The RPCs finished since the last flush into the request counters and latency
        histograms, in bulk. Runs before every collection of the registry (a scrape, from the
        metrics thread) and on the loop every FLUSH_EVERY RPCs; the deque's append and
        popleft are thread-safe, and the lock keeps two flushes from splitting one batch."""
        with self._flush_lock:
            finished = self._finished
            done = [finished.popleft() for _ in range(len(finished))]
        if not done:
            return
        counts: dict[tuple[str, str, Any], int] = {}
        durations: dict[tuple[str, str], list[float]] = {}
        for method, model, code, seconds in done:
            key = (method, model, code)
            counts[key] = counts.get(key, 0) + 1
            durations.setdefault((self._api[method], model), []).append(seconds)
        metrics = self.metrics
        for key, count in counts.items():
            child = self._rpc.get(key)
            if child is None:
                method, model, code = key
                child = self._rpc[key] = metrics.requests.labels(
                    self._api[method], method.rpartition("/")[2], model, getattr(code, "name", None) or str(code))
            child.inc(count)
        for (api, model), values in durations.items():
            observe_many(metrics.request_duration.labels(api, model), values)

    # -- per inference (the API) -----------------------------------------------------------
    def on_answers(self, result: "InferenceResult", spans: Sequence[tuple[int, int]]) -> None:
        """A batch's answers, recorded at once: its rows answered, its vote's time, and per
        request (the `spans` of the batch's rows answered to someone) what each saw: the
        agreement of each row, the members left out, the rows and answers for drift."""
        children = self._model(result.model)
        whole = len(spans) == 1 and spans[0] == (0, result.vote.label_index.shape[0])
        rows = result.vote.label_index.shape[0] if whole else sum(b - a for a, b in spans)
        children[4].inc(rows)
        self._held.observe(children[3], result.vote_s)
        vote = result.vote
        ensemble = len(result.members) > 1 or result.members[0].name != result.model
        if ensemble:
            agreement, member_latency = self._ensemble_children(result.model)
            self._held.observe_many(agreement, vote.agreement if whole else np.concatenate(
                [vote.agreement[a:b] for a, b in spans]))
            for member in result.members:
                child = member_latency.get(member.name)
                if child is None:
                    child = member_latency[member.name] = self.metrics.member_latency.labels(result.model, member.name)
                self._held.observe(child, member.latency_s)  # once per batch: every request of it saw this
            for dropped in result.left_out:
                self.metrics.members_dropped.labels(result.model, dropped).inc(len(spans))
        window = self._drift_window(result)
        if window is not None:
            inputs = getattr(result, "inputs", None)
            for a, b in ((0, rows),) if whole else spans:
                window.observe(None if inputs is None else inputs[a:b], vote.label_index[a:b],
                               vote.confidence[a:b], vote.agreement[a:b] if ensemble else None)

    def _ensemble_children(self, ensemble: str) -> tuple[Any, dict[str, Any]]:
        children = self._per_ensemble.get(ensemble)
        if children is None:
            children = self._per_ensemble[ensemble] = (self.metrics.agreement.labels(ensemble), {})
        return children

    # -- scrape-time state (service/monitoring/state_collectors.py) -------------------------
    def _collect_models(self) -> Iterable:
        if self.manager is None:
            return
        self.prime()  # models that appeared since: their counters are exported from the next scrape
        yield from state_collectors.models_state(self.manager, self.queued(), self.metrics)

    def _collect_feedback(self) -> Iterable:
        if self.feedback is not None:
            yield from state_collectors.feedback_state(self.feedback)
