"""The Prometheus metric catalogue, in Quorum's own CollectorRegistry, and the collectors
read at scrape time.

Two kinds of metric live here:
- per-request bookkeeping (counters and histograms), updated by `service.monitoring.monitor`
  through pre-bound labelled children;
- state read at scrape time (queue depth, model info, live accuracy, drift, satisficing,
  GPUs) by collectors, so nothing is maintained per request for them.

Every metric, its labels and meaning are listed in docs/metrics.md. The per-batch
observations are bucketed in bulk (service.monitoring.bulk_histograms); the /metrics endpoint
is service.monitoring.metrics_server.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                   0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds: 1 ms resolution at the low end (where the 20 ms p99 objective sits) to 10 s."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
AGREEMENT_BUCKETS = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0)


class Catalogue:
    """Every request-time metric of the server, registered in `self.registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        self.before_collect: list[Callable[[], None]] = []
        """Run before every collection (registered first: collectors are read in order)."""
        r.register(_BeforeCollect(self.before_collect))
        ProcessCollector(registry=r)
        self.inflight = Gauge(
            "quorum_inflight_requests", "RPCs being handled right now, by API.", ["api"], registry=r)
        self.requests = Counter(
            "quorum_requests", "Finished RPCs by API, method, model (repository names only, "
            "else 'unknown'; empty for RPCs without a model) and gRPC status code.",
            ["api", "method", "model", "code"], registry=r)
        self.request_duration = Histogram(
            "quorum_request_duration_seconds", "End-to-end RPC latency in the server, by API and model.",
            ["api", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "quorum_queue_wait_seconds", "Time a request waited in a model's batching queue.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram(
            "quorum_compute_seconds", "Time one batch spent in the model runtime.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.vote = Histogram(
            "quorum_vote_seconds", "Time spent calibrating and combining the members' outputs of one batch "
            "(all the requests it answers at once).",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "quorum_batch_size_rows", "Rows per batch the dynamic batcher dispatched.",
            ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.inference_rows = Counter(
            "quorum_inference_rows", "Rows answered, by model (ensemble or single model asked for).",
            ["model"], registry=r)
        self.load_failures = Counter(
            "quorum_model_load_failures", "Model versions (or model configurations) that failed to load.",
            ["model"], registry=r)
        self.member_latency = Histogram(
            "quorum_member_latency_seconds", "Latency of each ensemble member within an ensemble batch (its requests' rows merged).",
            ["ensemble", "member"], buckets=LATENCY_BUCKETS, registry=r)
        self.members_dropped = Counter(
            "quorum_ensemble_members_dropped", "Members left out of an ensemble vote (missed the "
            "deadline or failed), counted once per request.", ["ensemble", "member"], registry=r)
        self.agreement = Histogram(
            "quorum_ensemble_agreement_ratio", "Per row: share of answering members whose own vote "
            "is the ensemble's winner.", ["ensemble"], buckets=AGREEMENT_BUCKETS, registry=r)
        self.drift_evaluations = Counter(
            "quorum_drift_evaluations", "Drift evaluations of a model's live window.", ["model"], registry=r)


class _BeforeCollect(Collector):
    """Exports nothing: runs its callbacks (pending observations flushed) before the
    collectors registered after it are read."""

    def __init__(self, callbacks: list[Callable[[], None]]) -> None:
        self._callbacks = callbacks

    def collect(self) -> Iterable[Metric]:
        for callback in self._callbacks:
            try:
                callback()
            except Exception:  # a scrape must never take the endpoint down
                log.exception("metrics flush failed")
        return []

    def describe(self) -> Iterable[Metric]:
        return []


class StateCollector(Collector):
    """Calls `collect_fn` at scrape time; whatever it yields is exported."""

    def __init__(self, collect_fn: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect_fn

    def collect(self) -> Iterable[Metric]:
        try:
            yield from self._collect()
        except Exception:  # a scrape must never take the endpoint down
            log.exception("metrics collection failed")

    def describe(self) -> Iterable[Metric]:
        return []


def gauge(name: str, documentation: str, labels: list[str],
          samples: Iterable[tuple[list[str], float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


class GpuCollector(Collector):
    """GPU utilisation and memory through NVML (nvidia-ml-py, imported lazily). Without the
    library, a driver or a GPU, these series are absent, never zero."""

    def __init__(self) -> None:
        self._nvml: types.ModuleType | None = None  # pynvml, once NVML has started
        self._handles: list = []
        self._tried = False

    def _init(self) -> None:
        self._tried = True
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
        except Exception as exc:  # ImportError, NVMLError (no driver / no device)
            log.info("no GPU metrics: NVML unavailable (%s)", exc)
            self._nvml, self._handles = None, []

    @property
    def available(self) -> bool:
        if not self._tried:
            self._init()
        return bool(self._handles)

    def collect(self) -> Iterable[Metric]:
        if not self.available:
            return
        nvml = self._nvml
        assert nvml is not None  # set together with the handles
        util = GaugeMetricFamily("quorum_gpu_utilization_ratio",
                                 "Share of time a kernel ran on the GPU over NVML's last sample period.", labels=["gpu"])
        used = GaugeMetricFamily("quorum_gpu_memory_used_bytes", "GPU memory in use (all processes).", labels=["gpu"])
        total = GaugeMetricFamily("quorum_gpu_memory_total_bytes", "GPU memory installed.", labels=["gpu"])
        for i, handle in enumerate(self._handles):
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception:
                continue
            util.add_metric([str(i)], rates.gpu / 100.0)
            used.add_metric([str(i)], float(memory.used))
            total.add_metric([str(i)], float(memory.total))
        yield from (util, used, total)

    def describe(self) -> Iterable[Metric]:
        return []
