"""Builds deploy/grafana/quorum-dashboard.json with Grafana's own SDK (grafana-foundation-sdk),
so that every panel is a valid Grafana model by construction.

    .venv/bin/python deploy/grafana/build_dashboard.py   # then deploy/k8s/sync_monitoring.py

Rows follow the order an on-call engineer reads: errors and saturation first, then latency by
stage, batching, the objective and live accuracy, drift, and the models and devices behind it
all. Every panel says what it shows and what to do when it looks wrong; every query is filtered
by the namespace, pod and model variables, and tests/monitoring runs each one against a real
Prometheus scraping a real server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

OUT = Path(__file__).resolve().parent / "quorum-dashboard.json"
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
POD = 'namespace=~"$namespace", pod=~"$pod"'
MODEL = f'{POD}, model=~"$model"'
VARIANT = f'{POD}, model=~"$variant"'
ENSEMBLE = f'{POD}, ensemble=~"$model"'
SERVER_ERRORS = "INTERNAL|UNKNOWN|UNAVAILABLE|DATA_LOSS"
OVERLOAD = "RESOURCE_EXHAUSTED|DEADLINE_EXCEEDED"
SLO_BUCKET = ', le="0.02"'  # the 20 ms objective's histogram bucket


@dataclass
class Target:
    expr: str
    legend: str = ""


@dataclass
class Spec:
    """One panel: what it shows, its unit, and how to read it."""

    kind: str  # timeseries, stat, table
    title: str
    description: str
    unit: str
    targets: list[Target]
    thresholds: list[tuple[float | None, str]] = field(default_factory=list)
    threshold_lines: bool = False
    log_scale: bool = False
    mappings: dict[str, tuple[str, str]] = field(default_factory=dict)
    min: float | None = None
    max: float | None = None
    axis_label: str = ""
    width: int = 8


def _with(selector: str, **regexes: str) -> str:
    """`selector` plus label=~"regex" matchers."""
    return selector + "".join(f', {k}=~"{v}"' for k, v in regexes.items())


def _rate(metric: str, selector: str) -> str:
    return f"rate({metric}{{{selector}}}[$__rate_interval])"


def _quantile(q: float, metric: str, selector: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) ({_rate(metric + '_bucket', selector)}))"


def _mean(metric: str, selector: str, by: str) -> str:
    return (f"sum by ({by}) ({_rate(metric + '_sum', selector)}) / "
            f"sum by ({by}) ({_rate(metric + '_count', selector)})")


def _ratio(codes: str, by: str) -> str:
    """Share of RPCs that ended with one of `codes`; 0 (not empty) when none did."""
    total = f"sum by ({by}) ({_rate('quorum_requests_total', MODEL)})"
    failed = f"sum by ({by}) ({_rate('quorum_requests_total', _with(MODEL, code=codes))})"
    return f"({failed} or {total} * 0) / {total}"


BINARY = {"0": ("no", "green"), "1": ("yes", "red")}
ROWS: list[tuple[str, list[Spec]]] = [
    ("Errors and saturation", [
        Spec("stat", "Server-side error ratio",
             "Share of RPCs that failed through no fault of the client (INTERNAL, UNKNOWN, UNAVAILABLE, "
             "DATA_LOSS) over the selected pods and models. Client mistakes (INVALID_ARGUMENT, NOT_FOUND...) "
             "are not counted. Above 1% look at the per-pod panel to see whether one pod or all are failing, "
             "then at the server log of that pod; runbook: QuorumHighErrorRate.",
             "percentunit", [Target(_ratio(SERVER_ERRORS, "namespace"), "{{namespace}}")],
             thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")], min=0, max=1),
        Spec("timeseries", "Server-side error ratio by pod",
             "The same ratio per pod: one pod far above the others points at that pod (its node, its GPU, a "
             "model that failed to load there); all pods together point at a model or a bad rollout.",
             "percentunit", [Target(_ratio(SERVER_ERRORS, "pod"), "{{pod}}")],
             thresholds=[(None, "green"), (0.05, "red")], threshold_lines=True, min=0),
        Spec("timeseries", "Overload: refused and expired requests / s",
             "RESOURCE_EXHAUSTED (admission control refused the request: the queue could not finish it before "
             "its deadline) and DEADLINE_EXCEEDED (the deadline passed) by model. Both rising with traffic "
             "means the pods are at capacity: check the HPA (in-flight requests per pod) and the queue depth "
             "panel; runbook: QuorumOverloaded.",
             "reqps", [Target(f"sum by (model, code) ({_rate('quorum_requests_total', _with(MODEL, code=OVERLOAD))}) "
                              f"or sum by (model) ({_rate('quorum_requests_total', MODEL)}) * 0",
                              "{{model}} {{code}}")], min=0),
        Spec("timeseries", "Requests / s by API and status code",
             "Finished RPCs per second by protocol (kserve_v2, tfserving, quorum, health...) and gRPC status "
             "code. A drop to zero with no errors means clients stopped reaching the pods (Service, "
             "NetworkPolicy, ingress), not that Quorum failed.",
             "reqps", [Target(f"sum by (api, code) ({_rate('quorum_requests_total', MODEL)})", "{{api}} {{code}}")],
             min=0),
        Spec("timeseries", "In-flight RPCs by pod",
             "RPCs being handled now, per pod: the HPA's scaling signal. A pod far above the others is "
             "slower (or gets more connections: gRPC balances per connection, use the headless Service for "
             "client-side balancing).",
             "short", [Target(f"sum by (pod) (quorum_inflight_requests{{{POD}}})", "{{pod}}")], min=0,
             axis_label="RPCs"),
        Spec("timeseries", "Queue depth by pod and variant",
             "Requests waiting in each variant's batching queue. A queue that keeps growing means the variant "
             "cannot keep up: requests will start to expire (DEADLINE_EXCEEDED) or be refused "
             "(RESOURCE_EXHAUSTED). Scale out, or move the variant to a GPU.",
             "short", [Target(f"sum by (pod, model) (quorum_queue_depth{{{VARIANT}}})", "{{pod}} {{model}}")],
             min=0, axis_label="requests"),
        Spec("timeseries", "Process CPU by pod",
             "CPU cores used by each pod's server process. Near the pod's CPU limit means throttling: "
             "latency rises before errors do.",
             "short", [Target(f"rate(process_cpu_seconds_total{{{POD}}}[$__rate_interval])", "{{pod}}")],
             min=0, axis_label="cores"),
        Spec("timeseries", "Resident memory by pod",
             "Resident memory of each pod's server process. Steady growth under steady traffic is a leak "
             "(report it); a step up follows a model version being loaded beside the serving one.",
             "bytes", [Target(f"process_resident_memory_bytes{{{POD}}}", "{{pod}}")], min=0),
    ]),
    ("Latency by stage", [
        Spec("timeseries", "End-to-end latency p50 / p90 / p99",
             "RPC latency inside the server by model (the client adds its network). The objective is p99 "
             "under 20 ms (red line). When p99 rises, the stage panels below say where the time goes: "
             "queue wait (capacity), compute (the model or its device) or the vote.",
             "s", [Target(_quantile(q, "quorum_request_duration_seconds", MODEL, "model"), f"p{int(q * 100)} {{{{model}}}}")
                   for q in (0.5, 0.9, 0.99)],
             thresholds=[(None, "green"), (0.02, "red")], threshold_lines=True, min=0),
        Spec("timeseries", "p99 latency by pod",
             "End-to-end p99 per pod: one slow pod (a noisy neighbour, a throttled CPU, a busy GPU) shows "
             "here before it moves the fleet's p99.",
             "s", [Target(_quantile(0.99, "quorum_request_duration_seconds", MODEL, "pod"), "{{pod}}")],
             thresholds=[(None, "green"), (0.02, "red")], threshold_lines=True, min=0),
        Spec("timeseries", "Latency objective: share of requests over 20 ms",
             "Share of requests slower than the 20 ms objective; the error budget is 1% (red line). The "
             "burn-rate alerts fire when this stays above 14.4% (page) or 6% (ticket); runbook: "
             "QuorumLatencyBudgetFastBurn.",
             "percentunit",
             [Target(f"1 - sum by (model) ({_rate('quorum_request_duration_seconds_bucket', MODEL + SLO_BUCKET)}) / "
                     f"sum by (model) ({_rate('quorum_request_duration_seconds_count', MODEL)})", "{{model}}")],
             thresholds=[(None, "green"), (0.01, "red")], threshold_lines=True, min=0),
        Spec("timeseries", "Queue wait p50 / p99 by variant",
             "Time a request waits in a variant's batching queue before its batch starts. High wait with "
             "low compute means too little capacity for the traffic: scale out.",
             "s", [Target(_quantile(q, "quorum_queue_wait_seconds", VARIANT, "model"), f"p{int(q * 100)} {{{{model}}}}")
                   for q in (0.5, 0.99)], min=0),
        Spec("timeseries", "Compute per batch p50 / p99 by variant",
             "Runtime time of one batch per variant. A rise without more rows per batch points at the "
             "device (a shared GPU, CPU throttling) or a new model version.",
             "s", [Target(_quantile(q, "quorum_compute_seconds", VARIANT, "model"), f"p{int(q * 100)} {{{{model}}}}")
                   for q in (0.5, 0.99)], min=0),
        Spec("timeseries", "Member latency p99 within ensembles",
             "Each member's latency inside its ensemble's requests. A member much slower than the rest is "
             "the straggler that deadlines leave out (see members dropped) and that the latency objective "
             "may deselect.",
             "s", [Target(_quantile(0.99, "quorum_member_latency_seconds", ENSEMBLE, "ensemble, member"),
                          "{{ensemble}} {{member}}")], min=0),
        Spec("timeseries", "Vote p99",
             "Calibrating and combining the members' outputs. It should stay far below a millisecond; "
             "if not, the server's CPU is saturated.",
             "s", [Target(_quantile(0.99, "quorum_vote_seconds", MODEL, "model"), "{{model}}")], min=0),
        Spec("timeseries", "Mean latency by stage",
             "Mean queue wait and compute per variant side by side: the larger one is where to act "
             "(capacity for queue wait, the model or device for compute).",
             "s", [Target(_mean("quorum_queue_wait_seconds", VARIANT, "model"), "queue {{model}}"),
                   Target(_mean("quorum_compute_seconds", VARIANT, "model"), "compute {{model}}")], min=0),
    ]),
    ("Batching", [
        Spec("timeseries", "Rows / s by model",
             "Rows answered per second by model (a request may carry many rows): the load the batchers see, "
             "which in-flight RPCs alone do not show.",
             "cps", [Target(f"sum by (model) ({_rate('quorum_inference_rows_total', MODEL)})", "{{model}}")], min=0),
        Spec("timeseries", "Mean batch size",
             "Rows per dispatched batch. Batches grow only while a variant is busy (an idle variant "
             "dispatches at once); persistently full batches mean the variant is saturated.",
             "short", [Target(_mean("quorum_batch_size_rows", VARIANT, "model"), "{{model}}")], min=0,
             axis_label="rows"),
        Spec("timeseries", "Rows in running batches",
             "Rows being computed now per variant and pod. Rows always in flight with a growing queue "
             "mean the variant's device is busy all the time: move it to a GPU or scale out.",
             "short", [Target(f"sum by (pod, model) (quorum_batch_inflight_rows{{{VARIANT}}})", "{{pod}} {{model}}")],
             min=0, axis_label="rows"),
    ]),
    ("Objective and live accuracy", [
        Spec("stat", "Constraints holding",
             "Whether each satisficing constraint of each ensemble (e.g. latency_p99_ms) holds now: 'holds' "
             "(green) or 'violated' (red). A violated constraint means even the fastest member subset misses "
             "it: the fallback serves; look at member latency and capacity; runbook: "
             "QuorumSatisficingConstraintViolated.",
             "none", [Target(f"min by (ensemble, constraint) (quorum_satisficing_constraint_holds{{{ENSEMBLE}}})",
                             "{{ensemble}} {{constraint}}")],
             thresholds=[(None, "red"), (1, "green")], mappings={"0": ("violated", "red"), "1": ("holds", "green")}),
        Spec("timeseries", "Constraint value vs threshold",
             "The measured value of each constraint (solid) against its threshold: the selector keeps "
             "the most accurate member subset whose value stays under the threshold.",
             "short", [Target(f"max by (ensemble, constraint) (quorum_satisficing_constraint_value{{{ENSEMBLE}}})",
                              "{{ensemble}} {{constraint}}"),
                       Target(f"max by (ensemble, constraint) (quorum_satisficing_constraint_threshold{{{ENSEMBLE}}})",
                              "threshold {{ensemble}} {{constraint}}")], min=0, axis_label="constraint unit"),
        Spec("timeseries", "Expected accuracy of the selected members",
             "The optimizing metric: expected accuracy of the member subset that serves (validation "
             "replay blended with live feedback). A drop after a rollout means a worse version came in.",
             "percentunit", [Target(f"max by (ensemble, metric) (quorum_satisficing_optimizing_value{{{ENSEMBLE}}})",
                                    "{{ensemble}}")], min=0, max=1),
        Spec("timeseries", "Selected members",
             "How many members the selector keeps per ensemble. Fewer members than configured mean the "
             "latency objective (or memory) forces a smaller subset.",
             "short", [Target(f"max by (ensemble, member) (quorum_satisficing_member_selected{{{ENSEMBLE}}})",
                              "{{ensemble}} {{member}}")], min=0, axis_label="selected (1) or not (0)"),
        Spec("timeseries", "Live accuracy (feedback)",
             "Accuracy against ground truth sent back with Feedback, over the feedback window, per model and "
             "member. Compare with the validation accuracy: a gap that grows with input drift means the "
             "model needs retraining; runbook: live accuracy. With a shared store (--state-url) every pod "
             "shows the fleet's window; the dashed lines are every pod's labelled-row counters summed, the "
             "fleet's accuracy over the interval whatever the store.",
             "percentunit", [Target(f"max by (model, member) (quorum_live_accuracy{{{MODEL}}})", "{{model}} {{member}}"),
                             Target(f"sum by (model, member) (rate(quorum_feedback_correct_rows_total{{{MODEL}}}"
                                    f"[$__rate_interval])) / sum by (model, member) "
                                    f"(rate(quorum_feedback_labelled_rows_total{{{MODEL}}}[$__rate_interval]))",
                                    "{{model}} {{member}} (all pods)")],
             min=0, max=1),
        Spec("timeseries", "Labelled rows in the accuracy window",
             "Ground-truth labels behind live accuracy: with few of them the accuracy line is noisy.",
             "short", [Target(f"max by (model, member) (quorum_live_accuracy_samples{{{MODEL}}})", "{{model}} {{member}}")],
             min=0, axis_label="rows"),
        Spec("stat", "Time since last feedback",
             "Seconds since any pod accepted a ground-truth label. Over an hour (red) live accuracy is going "
             "stale: check the labelling pipeline that calls Feedback; runbook: QuorumFeedbackStopped.",
             "s", [Target(f"time() - max(quorum_feedback_last_timestamp_seconds{{{POD}}})", "")],
             thresholds=[(None, "green"), (3600, "red")]),
    ]),
    ("Prediction sets and selective answers", [
        Spec("timeseries", "Live coverage vs asked (1h)",
             "Over the last hour, the share of labelled rows whose truth was in the prediction set their answer "
             "carried ('live'), and the coverage those requests asked ('asked'). The sets promise at least the "
             "asked coverage on rows like the validation rows: a gap that opens means the data has shifted "
             "(see Drift); runbook: QuorumLiveCoverageBelowTarget.",
             "percentunit",
             [Target(f"sum by (model) (increase(quorum_conformal_covered_rows_total{{{MODEL}}}[1h])) / "
                     f"sum by (model) (increase(quorum_conformal_labelled_rows_total{{{MODEL}}}[1h]))", "{{model}} live"),
              Target(f"sum by (model) (increase(quorum_conformal_coverage_asked_total{{{MODEL}}}[1h])) / "
                     f"sum by (model) (increase(quorum_conformal_labelled_rows_total{{{MODEL}}}[1h]))", "{{model}} asked")],
             min=0, max=1),
        Spec("timeseries", "Coverage z-score (1h)",
             "(covered - asked) / sqrt(sum of c(1 - c)) over the last hour: how many standard deviations the "
             "live coverage runs below what the guarantee promises. The alert fires below -3 (the threshold line).",
             "short",
             [Target(f"(sum by (model) (increase(quorum_conformal_covered_rows_total{{{MODEL}}}[1h])) - "
                     f"sum by (model) (increase(quorum_conformal_coverage_asked_total{{{MODEL}}}[1h]))) / "
                     f"sqrt(sum by (model) (increase(quorum_conformal_coverage_variance_total{{{MODEL}}}[1h])))",
                     "{{model}}")],
             thresholds=[(None, "red"), (-3, "green")], threshold_lines=True),
        Spec("timeseries", "Live risk vs asked (1h)",
             "Among labelled rows answered (not abstained) to requests that asked a max_risk: the share "
             "answered wrong ('live') and the max_risk asked ('asked'); runbook: QuorumLiveRiskAboveTarget.",
             "percentunit",
             [Target(f"sum by (model) (increase(quorum_selective_errors_total{{{MODEL}}}[1h])) / "
                     f"sum by (model) (increase(quorum_selective_answered_rows_total{{{MODEL}}}[1h]))", "{{model}} live"),
              Target(f"sum by (model) (increase(quorum_selective_risk_asked_total{{{MODEL}}}[1h])) / "
                     f"sum by (model) (increase(quorum_selective_answered_rows_total{{{MODEL}}}[1h]))", "{{model}} asked")],
             min=0),
    ]),
    ("Drift", [
        Spec("stat", "Drift detected",
             "Per model and signal (input, prediction, confidence, disagreement): 'drift' (red) when the "
             "signal's rule holds on the live window, 'no drift' (green) otherwise. Drift is a reason to look, "
             "not an outage: the panels beside it say how far and how sure; runbook: QuorumInputDrift.",
             "none", [Target(f'max by (model, signal) (quorum_drift_detected{{{MODEL}, signal!="feature"}})',
                             "{{model}} {{signal}}")],
             thresholds=[(None, "green"), (1, "red")], mappings={"0": ("no drift", "green"), "1": ("drift", "red")}),
        Spec("timeseries", "Drift distance by signal",
             "How far the live window is from the training reference: max feature PSI (input; 0.2 is the "
             "flag threshold), Jensen-Shannon distance of predicted classes (0.1), KS D of confidence (0.1), "
             "and the rise in disagreement (0.05). The lines mark 0.1 and 0.2.",
             "short", [Target(f'max by (model, signal) (quorum_drift_distance{{{MODEL}, signal!="feature"}})',
                              "{{model}} {{signal}}")],
             thresholds=[(None, "green"), (0.1, "orange"), (0.2, "red")], threshold_lines=True, min=0,
             axis_label="distance"),
        Spec("timeseries", "Drift p-value by signal",
             "How sure the difference is, log scale: below the 0.01 line (red) the live window is unlikely "
             "to come from the training distribution. A tiny p-value with a small distance is a real but "
             "small shift.",
             "short", [Target(f'min by (model, signal) (quorum_drift_pvalue{{{MODEL}, signal!="feature"}})',
                              "{{model}} {{signal}}")],
             thresholds=[(None, "red"), (0.01, "green")], threshold_lines=True, log_scale=True, axis_label="p-value"),
        Spec("timeseries", "Feature PSI",
             "Population stability index of each monitored input feature (line at 0.2). The features "
             "that moved say what changed upstream (a camera, a unit, a preprocessing step).",
             "short", [Target(f'max by (model, feature) (quorum_drift_distance{{{MODEL}, signal="feature"}})',
                              "{{model}} {{feature}}")],
             thresholds=[(None, "green"), (0.2, "red")], threshold_lines=True, min=0, axis_label="PSI"),
        Spec("timeseries", "Drift window fill",
             "Share of the drift window filled with live rows. Statistics are computed once it holds "
             "QUORUM_DRIFT_MIN_ROWS rows; before that drift panels stay empty.",
             "percentunit", [Target(f"max by (model) (quorum_drift_window_fill{{{MODEL}}})", "{{model}}")],
             min=0, max=1),
    ]),
    ("Models and devices", [
        Spec("table", "Loaded versions",
             "One row per loaded model version and pod: its device, framework and state. A version missing "
             "on one pod failed to load there (see load failures and that pod's log).",
             "none", [Target(f"max by (pod, model, version, device, framework, state) (quorum_model_info{{{POD}}})", "")],
             width=12),
        Spec("stat", "Not ready",
             "Models and ensembles that are not serving, per pod: 'not ready' (red) or 'ready' (green). One "
             "bad model does not take a pod out of the Service (readiness stays SERVING unless "
             "--strict-readiness); requests to that model fail until it is fixed; runbook: QuorumModelNotReady.",
             "none", [Target(f"min by (model, kind) (quorum_model_ready{{{MODEL}}})", "{{kind}} {{model}}")],
             thresholds=[(None, "red"), (1, "green")], mappings={"0": ("not ready", "red"), "1": ("ready", "green")},
             width=6),
        Spec("timeseries", "Load failures (1h)",
             "Versions or configurations that failed to load in the last hour, by model. The previous "
             "version keeps serving; the reason is in GetModelStatus and the log; runbook: QuorumModelLoadFailure.",
             "short", [Target(f"sum by (model) (increase(quorum_model_load_failures_total{{{MODEL}}}[1h]))", "{{model}}")],
             min=0, axis_label="failures", width=6),
        Spec("timeseries", "GPU utilisation",
             "NVML utilisation per GPU and pod (absent on CPU-only pods). Near 100% with a growing queue: "
             "the GPU is the bottleneck.",
             "percentunit", [Target(f"quorum_gpu_utilization_ratio{{{POD}}}", "{{pod}} gpu {{gpu}}")], min=0, max=1),
        Spec("timeseries", "GPU memory used",
             "Device memory in use per GPU (dashed: total). A new version is loaded beside the serving one, "
             "so a swap needs room for both.",
             "bytes", [Target(f"quorum_gpu_memory_used_bytes{{{POD}}}", "used {{pod}} gpu {{gpu}}"),
                       Target(f"quorum_gpu_memory_total_bytes{{{POD}}}", "total {{pod}} gpu {{gpu}}")], min=0),
    ]),
]

VARIABLES = [  # name, label, query, what it selects
    ("namespace", "namespace", "label_values(quorum_requests_total, namespace)"),
    ("pod", "pod", 'label_values(quorum_requests_total{namespace=~"$namespace"}, pod)'),
    ("model", "model / ensemble", 'label_values(quorum_model_ready{namespace=~"$namespace"}, model)'),
    ("variant", "variant (batching)", 'label_values(quorum_compute_seconds_count{namespace=~"$namespace"}, model)'),
]


def _thresholds(steps: list[tuple[float | None, str]]) -> db.ThresholdsConfig:
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
        [dm.Threshold(value=v, color=c) for v, c in steps])


def _panel(spec: Spec, panel_id: int, x: int, y: int):
    if spec.kind == "timeseries":
        p = (timeseries.Panel().line_width(1).fill_opacity(10).show_points(cm.VisibilityMode.NEVER)
             .legend(cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST)
                     .placement(cm.LegendPlacement.BOTTOM).show_legend(True))
             .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)))
        if spec.threshold_lines:
            p = p.thresholds_style(cb.GraphThresholdsStyleConfig().mode(cm.GraphTresholdsStyleMode.LINE))
        if spec.log_scale:
            p = p.scale_distribution(cb.ScaleDistributionConfig().type(cm.ScaleDistribution.LOG).log(10))
        if spec.axis_label:
            p = p.axis_label(spec.axis_label)
    elif spec.kind == "stat":
        p = (stat.Panel().color_mode(cm.BigValueColorMode.BACKGROUND).graph_mode(cm.BigValueGraphMode.NONE)
             .text_mode(cm.BigValueTextMode.VALUE_AND_NAME)
             .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    else:
        p = table.Panel().show_header(True)
    p = (p.id(panel_id).title(spec.title).description(spec.description).unit(spec.unit).datasource(DS)
         .grid_pos(dm.GridPos(h=8, w=spec.width, x=x, y=y)))
    if spec.thresholds:
        p = p.thresholds(_thresholds(spec.thresholds))
    if spec.mappings:
        p = p.mappings([dm.ValueMap(options={k: dm.ValueMappingResult(text=t, color=c)
                                              for k, (t, c) in spec.mappings.items()})])
    if spec.min is not None:
        p = p.min(spec.min)
    if spec.max is not None:
        p = p.max(spec.max)
    for i, t in enumerate(spec.targets):
        query = prometheus.Dataquery().expr(t.expr).legend_format(t.legend or "__auto").ref_id(chr(ord("A") + i))
        if spec.kind == "table":
            query = query.instant().format(pm.PromQueryFormat.TABLE)
        p = p.with_target(query.datasource(DS))
    return p


def build() -> dict:
    board = (db.Dashboard("Quorum").uid("quorum-serving").tags(["quorum", "inference"])
             .description("Quorum ensemble serving: errors and saturation first, then latency by stage, "
                          "the objective and live accuracy, drift, and the models behind it. Runbook: docs/runbook.md.")
             .timezone("browser").refresh("30s").time("now-1h", "now").tooltip(dm.DashboardCursorSync.CROSSHAIR)
             .editable())
    board = board.with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
    for name, label, query in VARIABLES:
        board = board.with_variable(
            db.QueryVariable(name).label(label).query(query).datasource(DS).include_all(True).multi(True)
            .all_value(".*").refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC))
    panel_id, y = 1, 0
    for title, specs in ROWS:
        board = board.with_row(db.Row(title).id(panel_id).grid_pos(dm.GridPos(h=1, w=24, x=0, y=y)))
        panel_id, y, x = panel_id + 1, y + 1, 0
        for spec in specs:
            if x + spec.width > 24:
                x, y = 0, y + 8
            board = board.with_panel(_panel(spec, panel_id, x, y))
            panel_id, x = panel_id + 1, x + spec.width
        y += 8
    return json.loads(JSONEncoder(sort_keys=True).encode(board.build()))


def render() -> str:
    return json.dumps(build(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
