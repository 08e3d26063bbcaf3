"""Quorum's own quorum.v1.EnsembleService: the vote with every member's part, feedback, status."""

from __future__ import annotations

import dataclasses
import math
import time
import uuid

import grpc
import numpy as np

from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from service.api.common import check_declared, deadline_of, model_rows
from service.api.context import ApiContext
from service.api.priority import asked as asked_priority, priority_of
from service.logs import REQUEST_ID
from service.codecs import v2 as codec
from service.codecs.dtypes import from_v2
from service.errors import InvalidInput, ModelNotFound, QuorumError
from service.objectives.store import Uncertain, check_label_count, window_uncertainty
from service.repository.config import Policy
from service.repository.served import EnsembleModel, State
from service.repository.members import degraded_reason

POLICY_OF: dict[pb.VotingPolicy, Policy] = {pb.VOTING_POLICY_MAJORITY: "majority", pb.VOTING_POLICY_SOFT: "soft",
             pb.VOTING_POLICY_CONFIDENCE: "confidence", pb.VOTING_POLICY_ACCURACY: "accuracy",
             pb.VOTING_POLICY_CONFIDENCE_ENTROPY: "confidence_entropy", pb.VOTING_POLICY_STACKED: "stacked"}
ENUM_OF: dict[str, pb.VotingPolicy] = {v: k for k, v in POLICY_OF.items()}  # by policy name
VERSION_STATE = {State.START: pb.VERSION_STATE_LOADING, State.LOADING: pb.VERSION_STATE_LOADING,
                 State.AVAILABLE: pb.VERSION_STATE_READY, State.UNLOADING: pb.VERSION_STATE_UNLOADING,
                 State.END: pb.VERSION_STATE_UNLOADED}


class EnsembleServicer(pb_grpc.EnsembleServiceServicer):
    def __init__(self, api: ApiContext) -> None:
        self.api = api

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        start = time.perf_counter()
        info = self.api.data.info(request.model, request.version or None)  # NOT_FOUND before the inputs
        what = f"model '{request.model}' inputs"
        try:
            dtype = from_v2(request.inputs.dtype)
        except InvalidInput as exc:
            raise InvalidInput(f"{what}: {exc}") from exc
        shape = codec.check_shape(what, request.inputs.shape)
        check_declared(info, {info.input.name: (dtype.numpy, shape)})  # before decoding anything
        rows = codec.decode_raw(what, dtype, shape, request.inputs.content)
        rows = model_rows(info, {info.input.name: rows}, declared_checked=True)
        min_accuracy = _min_accuracy(request)
        latency_budget_s = (_latency_budget_s(request.latency_budget_ms)
                            if request.HasField("latency_budget_ms") else None)
        asked = self.api.data.uncertainties.asked(
            request.model, request.version or None, request.coverage if request.HasField("coverage") else None,
            request.max_risk if request.HasField("max_risk") else None, [])
        level = priority_of(self.api, request.model, request.priority)
        try:
            with asked_priority(level):
                result = await self.api.data.infer(
                    request.model, rows, version=request.version or None, deadline=deadline_of(context),
                    policy=POLICY_OF.get(request.policy), min_accuracy=min_accuracy,
                    latency_budget_s=latency_budget_s, asked=asked if asked.anything else None)
        except QuorumError:
            self.api.on_failure(request.model, time.perf_counter() - start)
            raise
        request_id = request.request_id or REQUEST_ID.get() or uuid.uuid4().hex  # the logs' id
        uncertain = self.api.data.uncertainties.answer(result, asked)
        if uncertain:
            result = dataclasses.replace(result, uncertain=Uncertain(
                asked.coverage, uncertain.get("prediction_set"), asked.max_risk, uncertain.get("abstained")))
        self.api.feedback.record(request_id, result)
        response = pb.PredictResponse(
            request_id=request_id, model=result.model, version=result.version,
            members_left_out=result.left_out, policy=ENUM_OF[result.policy])
        vote = result.vote
        by_name = {m.name: m for m in result.members}
        sets, abstained = uncertain.get("prediction_set"), uncertain.get("abstained")
        for row in range(vote.label_index.shape[0]):
            winner = int(vote.label_index[row])
            prediction = response.predictions.add(
                label=result.labels[winner], class_index=winner,
                probabilities=vote.probabilities[row].tolist(),
                confidence=float(vote.confidence[row]), agreement=float(vote.agreement[row]))
            if sets is not None:
                prediction.prediction_set.extend(result.labels[c] for c in np.flatnonzero(sets[row]))
            if abstained is not None:
                prediction.abstained = bool(abstained[row])
            if not request.return_member_votes:
                continue
            for m, name in enumerate(vote.members):
                member = by_name[name]
                index = int(vote.member_labels[m, row])
                prediction.member_votes.add(
                    member=name, version=member.version, label=result.labels[index], class_index=index,
                    confidence=float(result.member_probabilities[m, row].max()),
                    weight=float(vote.member_weights[m, row]), latency_ms=member.latency_s * 1000.0,
                    in_time=True)
            for name in result.left_out:
                member = by_name[name]
                prediction.member_votes.add(member=name, version=member.version, class_index=-1,
                                            latency_ms=member.latency_s * 1000.0, in_time=False)
        self.api.on_inference(result, rows.shape[0], time.perf_counter() - start)
        return response

    async def Feedback(self, request: pb.FeedbackRequest, context: grpc.aio.ServicerContext) -> pb.FeedbackResponse:
        # bounded, then a chunk per turn of the loop (the store's): a large call never holds it
        check_label_count(len(request.labels), self.api.manager.settings.max_feedback_labels)
        outcome = await self.api.feedback.add_labels(request.labels, time.time())
        return pb.FeedbackResponse(accepted=outcome.accepted, unknown_ids=list(outcome.unknown),
                                   rejected=outcome.rejected)

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        manager = self.api.manager
        names = sorted(set(manager.variants) | set(manager.ensembles))
        if request.model:
            if request.model not in names:
                self.api.data.info(request.model)  # raises NOT_FOUND
            names = [request.model]
        response = pb.GetStatusResponse()
        for name in names:
            status = response.models.add(name=name)
            ensemble = manager.ensemble(name)
            if ensemble is not None:
                await self.api.data.ensure_evaluated(name)
                self._ensemble_status(status, name, ensemble)
            else:
                self._variant_status(status, name)
            if manager.is_ready(name):
                self._uncertainty_status(status.uncertainty, name)
        return response

    async def GetManifest(self, request: pb.GetManifestRequest,
                          context: grpc.aio.ServicerContext) -> pb.GetManifestResponse:
        if self.api.manager.ensemble(request.model) is not None:
            raise ModelNotFound(f"'{request.model}' is an ensemble: only a single model has a manifest")
        served = self.api.manager.resolve(request.model, request.version or None)  # NOT_FOUND, UNAVAILABLE
        known = request.known_version and request.known_version == served.version
        return pb.GetManifestResponse(model=served.name, version=served.version,
                                      manifest_json="" if known else served.manifest.model_dump_json(),
                                      max_batch_size=served.batching.max_batch_size)

    def _uncertainty_status(self, status: pb.UncertaintyStatus, name: str) -> None:
        figures = self.api.data.uncertainties.status(name)
        status.coverage, status.is_default, status.score = figures.coverage, figures.is_default, figures.score
        status.class_conditional, status.fit_rows = figures.class_conditional, figures.fit_rows
        status.calibration_rows, status.max_coverage = figures.calibration_rows, figures.max_coverage
        status.quantile, status.mean_set_size = figures.quantile, figures.mean_set_size
        coverage, status.live_set_rows, risk, status.live_answered_rows = window_uncertainty(
            self.api.feedback.live_rows(name))
        if coverage is not None:
            status.live_coverage = coverage
        if risk is not None:
            status.live_risk = risk

    def _variant_status(self, status: pb.ModelStatus, name: str) -> None:
        model = self.api.manager.variants[name]
        serving = model.serving()
        for version, served in sorted(model.versions.items()):
            status.versions.add(version=version, state=VERSION_STATE[served.state], device=served.device,
                                framework=served.runtime.framework, serving=served is serving,
                                copied_from=served.copied_from)
        for version, error in sorted(model.failed.items()):
            status.versions.add(version=version, state=pb.VERSION_STATE_FAILED, reason=error)
        status.members.append(name)
        status.policy = pb.VOTING_POLICY_SOFT
        live, status.live_samples = self.api.feedback.live(name)
        if live is not None:
            status.live_accuracy = live
        if serving is not None:
            b = serving.batching
            status.batching.CopyFrom(pb.BatchingConfig(
                enabled=True, max_batch_size=b.max_batch_size, max_queue_delay_ms=b.max_queue_delay_us / 1000.0,
                max_queue_size=b.max_queue_size, strict=self.api.manager.settings.batch_invariance == "strict"))
            status.class_labels.extend(serving.manifest.labels)
            self._member_stats(status, name, serving, name)

    def _ensemble_status(self, status: pb.ModelStatus, name: str, ensemble: EnsembleModel) -> None:
        manager = self.api.manager
        status.ensemble = True
        ready = manager.is_ready(name)
        missing = manager.missing_members(name)
        status.degraded = ready and bool(missing)
        status.members_missing.extend(missing)
        reason = manager.ensemble_problem(name) or (degraded_reason(missing) if missing else "")
        status.versions.add(version=1, state=pb.VERSION_STATE_READY if ready else pb.VERSION_STATE_FAILED,
                            reason=reason, serving=ready, framework="ensemble")
        if ensemble.config is None:
            return
        status.members.extend(ensemble.config.members)
        status.policy = ENUM_OF[ensemble.config.policy]
        status.quorum = ensemble.config.min_members
        status.serving_members = manager.serving_members(name)
        if ensemble.spec is not None:
            status.class_labels.extend(ensemble.spec.labels)
        for policy, c in ensemble.calibration.policies.items():
            status.vote_calibration.add(
                policy=ENUM_OF[policy], temperature=c.temperature, validation_rows=c.rows, accuracy=c.accuracy,
                ece_before=c.ece_before, ece_after=c.ece_after, nll_before=c.nll_before, nll_after=c.nll_after)
        for member, weight in ensemble.calibration.weights.items():
            status.stacked_weights[member] = weight
        live, status.live_samples = self.api.feedback.live(name)
        if live is not None:
            status.live_accuracy = live
        tracker = self.api.data.tracker(name)
        selected = set(tracker.selected.members) if tracker.selected else set(ensemble.config.members)
        latency = {m.name: m for m in tracker.member_status}
        for member in ensemble.config.members:
            model = manager.variants.get(member)
            serving = model.serving() if model else None
            if serving is not None:
                stats = self._member_stats(status, member, serving, f"{name}/{member}")
                stats.selected = member in selected
                if member in latency:
                    stats.latency_p50_ms = latency[member].latency_p50_ms or 0.0
                    stats.latency_p99_ms = latency[member].latency_p99_ms or 0.0
        objective = status.objective
        objective.objective = "accuracy"
        objective.reason = tracker.reason
        chosen, score = tracker.selected, tracker.score
        if chosen is not None and score is not None:  # both None until the first selection
            objective.objective_value = chosen.accuracy
            objective.selected_members.extend(chosen.members)
            objective.score = score
        for constraint in tracker.constraints:
            objective.constraints.add(name=constraint.name, threshold=constraint.threshold, value=constraint.value,
                                      holds=constraint.holds, bound=pb.BOUND_UPPER)

    def _member_stats(self, status: pb.ModelStatus, member: str, served, live_key: str) -> pb.MemberStats:
        stats = status.member_stats.add(
            member=member, version=served.version,
            validation_accuracy=served.manifest.validation.calibrated.accuracy, selected=True)
        live, samples = self.api.feedback.live(live_key)
        stats.live_samples = samples
        if live is not None:
            stats.live_accuracy = live
        return stats


MAX_BUDGET_MS = 3_600_000.0  # an hour: anything longer is a mistake, not a budget


def _latency_budget_s(budget_ms: float) -> float:
    if not (math.isfinite(budget_ms) and 0.0 <= budget_ms <= MAX_BUDGET_MS):
        raise InvalidInput(f"latency_budget_ms must be a number from 0 to {MAX_BUDGET_MS:.0f}, got {budget_ms}")
    return budget_ms / 1000.0


def _min_accuracy(request: pb.PredictRequest) -> float | None:
    if not request.HasField("min_accuracy"):
        return None
    value = request.min_accuracy
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise InvalidInput(f"min_accuracy must be a number from 0 to 1, got {value}")
    return value
