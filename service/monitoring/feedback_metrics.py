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
    yield from _uncertainty_counters(counters)
    yield CounterMetricFamily("quorum_feedback_unstored_predictions", "Predictions this pod could not hand to the "
                              "shared feedback store (unreachable, slow or its write queue full): their labels will "
                              "be unknown.", value=counters.unstored)
    up = GaugeMetricFamily("quorum_feedback_store_up", "1 while the feedback store answered its last use, else 0 "
                           "(store: in-process, or the Redis URL without its password).", labels=["store"])
    up.add_metric([store.name], 1.0 if store.available() else 0.0)
    yield up


CONFORMAL = (  # PodCounters.conformal's sums, in order
    ("quorum_conformal_labelled_rows", "Labelled rows whose answer carried a prediction set (a coverage asked or "
                                       "defaulted); sum over pods."),
    ("quorum_conformal_covered_rows", "Of quorum_conformal_labelled_rows, those whose truth was in the set."),
    ("quorum_conformal_coverage_asked", "Sum of the coverage asked over quorum_conformal_labelled_rows: the "
                                             "covered rows the guarantee promises."),
    ("quorum_conformal_coverage_variance", "Sum of c (1 - c) over those rows (c: the coverage asked): the "
                                               "variance of the covered count under the guarantee."),
)
SELECTIVE = (  # PodCounters.selective's sums, in order
    ("quorum_selective_answered_rows", "Labelled rows answered (not abstained) to requests that asked a max_risk."),
    ("quorum_selective_errors", "Of quorum_selective_answered_rows, those answered wrong."),
    ("quorum_selective_risk_asked", "Sum of the max_risk asked over quorum_selective_answered_rows: the errors "
                                         "the threshold allows."),
    ("quorum_selective_risk_variance", "Sum of r (1 - r) over those rows (r: the max_risk asked)."),
)


def _uncertainty_counters(counters: Any) -> Iterable:
    """Live coverage and risk (docs/repository.md, "Prediction sets"), as counters that sum
    over pods: the recording rules and alerts test them against what was asked."""
    for specs, table in ((CONFORMAL, counters.conformal), (SELECTIVE, counters.selective)):
        families = [CounterMetricFamily(name, help_text, labels=["model"]) for name, help_text in specs]
        for model, sums in list(table.items()):
            for family, value in zip(families, sums):
                family.add_metric([model], value)
        yield from families
