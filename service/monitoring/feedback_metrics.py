"""The feedback store's Prometheus counters, read at scrape time: rows this pod accepted and
predictions it could not store. Per pod, so that summing over pods gives the fleet's."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LABELS = ["model", "member", "version"]


def feedback_counters(store: Any) -> Iterable:
    """`store`: a service.objectives.store.Store (its counters, name and availability)."""
    counters = store.counters
    labelled = CounterMetricFamily("quorum_feedback_labelled_rows", "Labelled rows this pod accepted (Feedback), by "
                                   "model and member version (member=\"\": the model's own answer); sum over pods.",
                                   labels=LABELS)
    correct = CounterMetricFamily("quorum_feedback_correct_rows", "Of quorum_feedback_labelled_rows, those answered "
                                  "right.", labels=LABELS)
    for (model, member, version), count in list(counters.labelled.items()):
        labelled.add_metric([model, member, str(version)], count)
        correct.add_metric([model, member, str(version)], counters.correct[model, member, version])
    yield labelled
    yield correct
    yield CounterMetricFamily("quorum_feedback_unstored_predictions", "Predictions this pod could not hand to the "
                              "shared feedback store (unreachable, slow or its write queue full): their labels will "
                              "be unknown.", value=counters.unstored)
    up = GaugeMetricFamily("quorum_feedback_store_up", "1 while the feedback store answered its last use, else 0 "
                           "(store: in-process, or the Redis URL without its password).", labels=["store"])
    up.add_metric([store.name], 1.0 if store.available() else 0.0)
    yield up
