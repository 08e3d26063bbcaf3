"""The metric catalogue and the monitor, without a server: own registry, HTTP on port 0,
bounded labels, forwarding to Statistics, no GPU series without NVML."""

from __future__ import annotations

import urllib.request
from types import SimpleNamespace

import grpc
import numpy as np
import prometheus_client
import prometheus_client.parser
import pytest

from service.monitoring.monitor import Monitor, api_of, request_model
from service.monitoring.statistics import Statistics
from service.settings import Settings
from service.runtimes.devices import gpu_count


def _monitor() -> Monitor:
    return Monitor(Settings(), Statistics())


def test_own_registry_and_http_endpoint_on_port_zero():
    monitor = _monitor()
    port = monitor.start_http("127.0.0.1", 0)
    try:
        assert port > 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        monitor._server.stop()
    assert "quorum_satisficing_constraint_holds" in text
    assert monitor.registry is not prometheus_client.REGISTRY
    assert "quorum_requests_total" not in prometheus_client.generate_latest().decode()


def test_rpc_metrics_bound_the_model_label():
    monitor = _monitor()
    monitor._known_at = 1e18  # the names below, not a manager's
    monitor._known = frozenset({"digits_mlp_a", "digits"})
    method = "/inference.GRPCInferenceService/ModelInfer"
    for name in ("digits", "no-such-model-1", "no-such-model-2"):
        monitor.on_rpc_start(method)
        monitor.on_rpc(method, grpc.StatusCode.NOT_FOUND, 0.004, SimpleNamespace(model_name=name))
    get = monitor.registry.get_sample_value
    labels = {"api": "kserve_v2", "method": "ModelInfer", "code": "NOT_FOUND"}
    assert get("quorum_requests_total", {**labels, "model": "digits"}) == 1
    assert get("quorum_requests_total", {**labels, "model": "unknown"}) == 2
    assert get("quorum_inflight_requests", {"api": "kserve_v2"}) == 0
    assert get("quorum_request_duration_seconds_bucket", {"api": "kserve_v2", "model": "digits", "le": "0.005"}) == 1
    assert get("quorum_request_duration_seconds_bucket", {"api": "kserve_v2", "model": "digits", "le": "0.003"}) == 0


def test_manager_hooks_feed_metrics_and_statistics():
    monitor = _monitor()
    monitor.on_batch("digits_mlp_a:1", 3, [0.001, 0.002, 0.0005])
    monitor.on_compute("digits_mlp_a", 1, 3, 0.002)
    monitor.on_load_failure("digits_cnn_a", 2)
    get = monitor.registry.get_sample_value
    assert get("quorum_batch_size_rows_count", {"model": "digits_mlp_a"}) == 1
    assert get("quorum_queue_wait_seconds_count", {"model": "digits_mlp_a"}) == 3
    assert get("quorum_compute_seconds_count", {"model": "digits_mlp_a"}) == 1
    assert get("quorum_model_load_failures_total", {"model": "digits_cnn_a"}) == 1
    stats = monitor.statistics
    assert stats.models[("digits_mlp_a", 1)].execution_count == 1
    assert stats.models[("digits_mlp_a", 1)].queue.count == 3


def test_satisficing_state_of_trackers_is_exported():
    from service.objectives.selection import Candidate
    from service.objectives.status import ConstraintStatus
    from service.objectives.tracker import ObjectiveTracker
    from service.repository.config import Objective

    monitor = _monitor()
    tracker = ObjectiveTracker("digits", ["a", "b"], Objective(latency_p99_ms=20), "confidence")
    monitor.trackers["digits"] = tracker
    get = monitor.registry.get_sample_value
    assert get("quorum_satisficing_member_selected", {"ensemble": "digits", "member": "a"}) is None
    tracker.selected = Candidate(("a",), 0.97, 0.97, None, 0, 0.004, 1.0)
    tracker.constraints = [ConstraintStatus("latency_p99_ms", 20.0, 25.0, False, True)]
    assert get("quorum_satisficing_constraint_holds", {"ensemble": "digits", "constraint": "latency_p99_ms"}) == 0
    assert get("quorum_satisficing_constraint_value", {"ensemble": "digits", "constraint": "latency_p99_ms"}) == 25
    assert get("quorum_satisficing_constraint_threshold", {"ensemble": "digits", "constraint": "latency_p99_ms"}) == 20
    assert get("quorum_satisficing_optimizing_value", {"ensemble": "digits", "metric": "accuracy"}) == 0.97
    assert get("quorum_satisficing_member_selected", {"ensemble": "digits", "member": "a"}) == 1
    assert get("quorum_satisficing_member_selected", {"ensemble": "digits", "member": "b"}) == 0


def test_gpu_metrics_are_there_with_a_gpu_and_absent_without():
    monitor = _monitor()
    text = prometheus_client.generate_latest(monitor.registry).decode()
    if gpu_count() == 0:  # no NVML or no GPU on this host
        assert not monitor.gpus.available
        assert "quorum_gpu_" not in text  # absent, not zero
    else:
        assert monitor.gpus.available
        for gpu in range(gpu_count()):
            assert f'quorum_gpu_memory_total_bytes{{gpu="{gpu}"}}' in text


def test_api_and_model_of_requests():
    assert api_of("/tensorflow.serving.PredictionService/Predict") == "tfserving"
    assert api_of("/quorum.v1.EnsembleService/Predict") == "quorum"
    assert api_of("/grpc.health.v1.Health/Check") == "health"
    from service._proto.inference import grpc_service_pb2 as v2
    from tensorflow_serving.apis import predict_pb2

    assert request_model(v2.ModelInferRequest(model_name="digits")) == "digits"
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits_logreg"
    assert request_model(request) == "digits_logreg"
    assert request_model(None) == ""


@pytest.mark.parametrize("count", [0, 1, 3, 4, 50, 2000])
def test_bulk_observations_expose_what_one_by_one_observations_do(count):
    """observe_many (a batch's queue waits, its rows' agreement) against prometheus-client's
    own observe() on a twin histogram: the same exposition, bucket by bucket, with values on
    the bounds, below the first, above the last, negative and NaN."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from service.monitoring.bulk_histograms import observe_many

    rng = np.random.default_rng(count)
    bounds = (0.001, 0.01, 0.1, 0.5, 1.0, 10.0)
    values = rng.choice(np.concatenate([rng.exponential(0.3, 64), bounds, [-1.0, 0.0, 100.0]]), count)
    if count >= 50:
        values[7] = np.nan
    exposed = []
    for bulk in (False, True):
        registry = CollectorRegistry()
        child = Histogram("h", "twin", ["model"], buckets=bounds, registry=registry).labels("m")
        if bulk:
            observe_many(child, values)
        else:
            for v in values.tolist():
                child.observe(v)
        exposed.append([line for line in generate_latest(registry).decode().splitlines()
                        if not line.startswith("h_created")])
    assert exposed[1] == exposed[0]


def test_rpc_outcomes_are_exact_at_each_scrape_and_held_in_bounded_memory():
    """Outcomes are recorded in bulk, yet every scrape sees every RPC finished before it,
    with durations bucketed as Prometheus defines (le: value <= bound), and no more than
    FLUSH_EVERY outcomes wait between scrapes."""
    monitor = _monitor()
    monitor._known_at = 1e18
    monitor._known = frozenset({"digits"})
    method = "/inference.GRPCInferenceService/ModelInfer"
    rng = np.random.default_rng(7)
    durations = rng.uniform(0.0005, 0.03, size=2 * Monitor.FLUSH_EVERY + 37)
    codes = [grpc.StatusCode.OK if i % 5 else grpc.StatusCode.RESOURCE_EXHAUSTED for i in range(len(durations))]
    port = monitor.start_http("127.0.0.1", 0)
    try:
        for seconds, code in zip(durations, codes):
            monitor.on_rpc_start(method)
            monitor.on_rpc(method, code, float(seconds), SimpleNamespace(model_name="digits"))
            assert len(monitor._finished) < Monitor.FLUSH_EVERY
        for _ in range(3):  # still being answered
            monitor.on_rpc_start(method)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        monitor._server.stop()
    samples = {}
    for family in prometheus_client.parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    labels = (("api", "kserve_v2"), ("method", "ModelInfer"), ("model", "digits"))
    ok = sum(code == grpc.StatusCode.OK for code in codes)
    assert samples[("quorum_requests_total", tuple(sorted(labels + (("code", "OK"),))))] == ok
    assert samples[("quorum_requests_total", tuple(sorted(labels + (("code", "RESOURCE_EXHAUSTED"),))))] \
        == len(codes) - ok
    assert samples[("quorum_inflight_requests", (("api", "kserve_v2"),))] == 3
    for bound in ("0.001", "0.005", "0.01", "0.02", "+Inf"):
        key = ("quorum_request_duration_seconds_bucket", (("api", "kserve_v2"), ("le", bound), ("model", "digits")))
        assert samples[key] == int((durations <= float(bound)).sum()), bound
    assert samples[("quorum_request_duration_seconds_sum", (("api", "kserve_v2"), ("model", "digits")))] \
        == pytest.approx(durations.sum())


def test_held_observations_expose_exactly_what_observe_would_at_each_collection():
    """Per-batch observations are held and bucketed in bulk, yet a collection of the registry
    sees every one made before it, exactly as prometheus-client's own observe() would have
    counted them; observations from several threads at once are all kept, and no more than
    LIMIT values wait between collections."""
    import threading

    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from service.monitoring.bulk_histograms import HeldObservations
    from service.monitoring.metrics import Catalogue

    bounds = (0.001, 0.01, 0.1, 1.0)
    catalogue = Catalogue()
    held = HeldObservations()
    catalogue.before_collect.append(held.flush)
    twin_registry = CollectorRegistry()
    histogram = Histogram("h", "held", ["model"], buckets=bounds, registry=catalogue.registry)
    twin = Histogram("h", "twin", ["model"], buckets=bounds, registry=twin_registry)
    rng = np.random.default_rng(11)

    def exposed(registry) -> tuple[dict, dict]:
        """Bucket and count samples (exact), and sums (to float rounding: summed in another order)."""
        counts, sums = {}, {}
        text = generate_latest(registry).decode()
        for family in prometheus_client.parser.text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if sample.name.endswith(("_bucket", "_count")):
                    counts[key] = sample.value
                elif sample.name.endswith("_sum"):
                    sums[key] = sample.value
        return counts, sums

    for round_ in range(3):
        chunks = [rng.exponential(0.05, int(n)) for n in rng.integers(1, 40, size=300)]
        chunks[5] = np.concatenate([chunks[5], bounds, [np.nan, -1.0]])  # on the bounds, NaN, negative

        def observe(part: list[np.ndarray], thread: int) -> None:
            for i, values in enumerate(part):
                model = f"m{(thread + i) % 2}"
                if i % 3 == 0:
                    held.observe_many(histogram.labels(model), values)  # an array, as a vote's agreement
                elif i % 3 == 1:
                    held.observe_many(histogram.labels(model), values.tolist())  # a list, as queue waits
                else:
                    for value in values.tolist():
                        held.observe(histogram.labels(model), value)
                assert held._count < HeldObservations.LIMIT + 64
        threads = [threading.Thread(target=observe, args=(chunks[t::4], t)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for t in range(4):
            for i, values in enumerate(chunks[t::4]):
                for value in values.tolist():
                    twin.labels(f"m{(t + i) % 2}").observe(value)
        (counts, sums), (twin_counts, twin_sums) = exposed(catalogue.registry), exposed(twin_registry)
        assert counts == twin_counts and len(counts) == 2 * (len(bounds) + 2), round_
        assert sums.keys() == twin_sums.keys()
        assert all(sums[k] == pytest.approx(twin_sums[k], rel=1e-12, nan_ok=True) for k in sums), round_
