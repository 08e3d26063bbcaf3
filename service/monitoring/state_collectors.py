"""The monitor's scrape-time collectors: the state of the models, the feedback store, drift
and the satisficing selection, read when Prometheus scrapes (never on a request's path)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from service.monitoring import drift
from service.monitoring.feedback_metrics import feedback_counters
from service.monitoring.metrics import Catalogue, gauge

if TYPE_CHECKING:  # read, never imported at run time
    from service.objectives.store import Store
    from service.objectives.tracker import ObjectiveTracker
    from service.repository.manager import ModelManager


def models_state(manager: "ModelManager", queued: dict[str, int], metrics: Catalogue) -> Iterable:
    """Each model's and ensemble's queue, readiness, missing members and vote calibration."""
    depth: dict[str, float] = {name: n for name, n in queued.items()  # not yet in a batcher
                               if name in manager.variants or name in manager.ensembles}
    inflight_rows: dict[str, float] = {}
    info, ready = [], []
    for name, model in list(manager.variants.items()):
        for version, served in list(model.versions.items()):
            depth[name] = depth.get(name, 0) + served.batcher.queue_depth
            inflight_rows[name] = inflight_rows.get(name, 0) + served.batcher.in_flight
            info.append(([name, str(version), served.device, served.runtime.framework,
                          served.state.name], 1.0))
        ready.append(([name, "model"], float(manager.is_ready(name))))
    calibration, missing = [], []
    for name, ensemble in list(manager.ensembles.items()):
        metrics.load_failures.labels(name)  # an ensemble's contract failures too
        ready.append(([name, "ensemble"], float(manager.is_ready(name))))
        missing.append(([name], float(len(manager.missing_members(name)))))
        for policy, c in ensemble.calibration.policies.items():
            calibration.append((name, policy, c))
        if ensemble.config is not None:
            for member in ensemble.config.members:
                metrics.members_dropped.labels(name, member)  # starts at 0
    yield gauge("quorum_queue_depth", "Requests waiting in a model's or an ensemble's queue and its batcher "
                "(all loaded versions).",
                ["model"], ((([n]), v) for n, v in depth.items()))
    yield gauge("quorum_batch_inflight_rows", "Rows in batches running in a model's runtime.",
                ["model"], (([n], v) for n, v in inflight_rows.items()))
    yield gauge("quorum_model_info", "1 for each loaded model version, with its device, framework and state.",
                ["model", "version", "device", "framework", "state"], info)
    yield gauge("quorum_model_ready", "1 when a model serves (an ensemble: its contract holds and at "
                "least its quorum of members serves).", ["model", "kind"], ready)
    yield gauge("quorum_ensemble_members_missing", "Members of an ensemble that serve no version now (folder "
                "gone, unloaded, failing): above 0 while it is ready, it answers degraded, without them.",
                ["ensemble"], missing)
    yield gauge("quorum_vote_calibration_temperature", "Temperature of an ensemble's vote under a policy, "
                "fitted at load on the members' validation replay.", ["ensemble", "policy"],
                (([e, p], c.temperature) for e, p, c in calibration))
    yield gauge("quorum_vote_calibration_ece", "Validation expected calibration error of an ensemble's vote "
                "under a policy, before and after its calibration (stage).", ["ensemble", "policy", "stage"],
                (([e, p, stage], value) for e, p, c in calibration
                 for stage, value in (("before", c.ece_before), ("after", c.ece_after))))
    yield gauge("quorum_vote_calibration_nll", "Validation negative log-likelihood of an ensemble's vote "
                "under a policy, before and after its calibration (stage).", ["ensemble", "policy", "stage"],
                (([e, p, stage], value) for e, p, c in calibration
                 for stage, value in (("before", c.nll_before), ("after", c.nll_after))))


def feedback_state(feedback: "Store") -> Iterable:
    """Live accuracy over the fleet's window, the last label's time, and the store's counters."""
    accuracy, samples = [], []
    for key, (value, count) in feedback.live_all().items():  # the fleet's, with a shared store
        model, _, member = key.partition("/")
        if value is not None:
            accuracy.append(([model, member], value))
        samples.append(([model, member], float(count)))
    yield gauge("quorum_live_accuracy", "Accuracy on the last labelled live rows (feedback), for a "
                "model, or for one member's own vote within an ensemble (member label).",
                ["model", "member"], accuracy)
    yield gauge("quorum_live_accuracy_samples", "Labelled rows behind quorum_live_accuracy.",
                ["model", "member"], samples)
    if feedback.last_feedback_at is not None:
        yield gauge("quorum_feedback_last_timestamp_seconds", "Unix time of the last accepted feedback label.",
                    [], [([], feedback.last_feedback_at)])
    yield from feedback_counters(feedback)


def drift_state(drift_windows: dict[str, drift.DriftWindow],
                drift_results: dict[str, list[drift.SignalValue]]) -> Iterable:
    """Each model's drift window fill and its signals' last evaluation."""
    fill = [([name], w.fill) for name, w in list(drift_windows.items())]
    distance, pvalue, detected = [], [], []
    for name, results in list(drift_results.items()):
        for s in results:
            labels = [name, s.signal, s.feature]
            distance.append((labels, s.distance))
            detected.append((labels, float(s.detected)))
            if s.pvalue is not None:
                pvalue.append((labels, s.pvalue))
    baselines = [([name], w.reference.disagreement_baseline) for name, w in list(drift_windows.items())
                 if w.reference.disagreement_baseline is not None]
    yield gauge("quorum_drift_window_fill", "Share of a model's drift window holding live rows (0-1).",
                ["model"], fill)
    yield gauge("quorum_drift_distance", "Drift distance by signal: PSI (feature, input: max), Jensen-"
                "Shannon distance (prediction), KS statistic (confidence), disagreement rate minus "
                "its validation baseline (disagreement).", ["model", "signal", "feature"], distance)
    yield gauge("quorum_drift_pvalue", "Drift p-value by signal: Holm-adjusted chi-square (feature, input: "
                "min), chi-square (prediction), KS (confidence), one-sided binomial (disagreement).",
                ["model", "signal", "feature"], pvalue)
    yield gauge("quorum_drift_detected", "1 when a drift signal crosses its threshold (see docs/metrics.md).",
                ["model", "signal", "feature"], detected)
    yield gauge("quorum_ensemble_disagreement_baseline_ratio", "Share of validation rows on which the "
                "ensemble's members did not all vote for the winner.", ["model"], baselines)


def satisficing_state(trackers: dict[str, "ObjectiveTracker"]) -> Iterable:
    """Each ensemble's constraints, optimizing value and selected members."""
    selected = [(t, s) for t in list(trackers.values()) if (s := t.selected) is not None]
    constraints = [(t.ensemble, c) for t, _ in selected for c in t.constraints]
    yield gauge("quorum_satisficing_constraint_value", "Current value of a satisficing constraint "
                "(measured when enough samples, else predicted).",
                ["ensemble", "constraint"], (([e, c.name], c.value) for e, c in constraints))
    yield gauge("quorum_satisficing_constraint_threshold", "Threshold of a satisficing constraint.",
                ["ensemble", "constraint"], (([e, c.name], c.threshold) for e, c in constraints))
    yield gauge("quorum_satisficing_constraint_holds", "1 while a satisficing constraint holds.",
                ["ensemble", "constraint"], (([e, c.name], float(c.holds)) for e, c in constraints))
    yield gauge("quorum_satisficing_optimizing_value", "Expected value of the optimizing metric "
                "(accuracy) of the selected member subset.",
                ["ensemble", "metric"], (([t.ensemble, "accuracy"], s.accuracy) for t, s in selected))
    yield gauge("quorum_satisficing_member_selected", "1 when the selection keeps a member in the vote.",
                ["ensemble", "member"], (([t.ensemble, m], float(m in s.members))
                                         for t, s in selected for m in t.members))
