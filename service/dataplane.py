"""The data plane: every protocol's servicer calls into this, with numpy in and out.

A single model is served as an ensemble of one, so every answer has the same shape: the
vote (label, calibrated probabilities, confidence, agreement) and each member's part.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import weakref
from collections.abc import Mapping, Sequence

import numpy as np

from service.ensemble.outcomes import FanOut, Plan
from service.ensemble.pipeline import EnsemblePipeline
from service.ensemble.voting import calibrate, vote
from service.errors import DeadlineExceeded, FailedPrecondition, ModelNotFound, ModelNotReady
from service.monitoring.stages import COLLECTOR, Stage, record
from service.objectives.feedback import FeedbackStore
from service.objectives.store import Store
from service.objectives.selection import blend
from service.objectives.tracker import ObjectiveTracker
from service.repository.config import Policy
from service.repository.contract import EnsembleSpec
from service.repository.manager import ModelManager
from service.repository.served import ServedVersion
from service.results import AnswerObserver, InferenceResult, MemberResult, ModelInfo, result_rows
from service.satisficing import Satisficing, class_order
from service.uncertainties import Asked, Uncertainties

log = logging.getLogger(__name__)
PRIOR_STRENGTH = 200  # validation accuracy counts as this many live rows (single models)


class DataPlane(Satisficing):
    def __init__(self, manager: ModelManager, feedback: Store | None = None,
                 observer: AnswerObserver | None = None) -> None:
        self.manager = manager
        self.clock = manager.clock  # the manager's (its batchers'): deadlines compare on one clock
        self.observer = observer
        self.feedback: Store = feedback or FeedbackStore()
        self.uncertainties = Uncertainties(manager)  # prediction sets and selective answers, when asked
        manager.settled.append(self.uncertainties.refit)  # fitted at load and on version changes
        self.trackers: dict[str, ObjectiveTracker] = {}
        self._shadow_tasks: set[asyncio.Task] = set()
        self._info: dict[str, tuple] = {}  # model -> (what it was built from..., ModelInfo)
        self._pipelines: dict[tuple[str, str], EnsemblePipeline] = {}  # (kind, name) -> its queue
        self._evaluations: dict[str, asyncio.Task] = {}  # ensemble -> its evaluation running now
        # served version -> {ensemble labels: MemberInfo}: its validation replay is parsed
        # into arrays once per loaded version, not at every (periodic) evaluation
        self._member_infos: weakref.WeakKeyDictionary[ServedVersion, dict] = weakref.WeakKeyDictionary()

    # -- inference -------------------------------------------------------------------------
    async def infer(self, model: str, rows: np.ndarray, *, version: int | None = None,
                    deadline: float | None = None, policy: Policy | None = None,
                    min_accuracy: float | None = None, latency_budget_s: float | None = None,
                    members: Sequence[str] | None = None, asked: Asked | None = None) -> InferenceResult:
        """Vote of `model` (an ensemble or a single model) on `rows`.

        `deadline` is an absolute instant on the manager's clock (time.monotonic() in
        production: the RPC's, as the fronts compute it): an ensemble asks the
        best member subset whose predicted latency fits it, or, when none does, its usual
        members, and votes with those that answered before it (less the ensemble's safety
        margin). `latency_budget_s` and `min_accuracy` are the client's explicit objectives:
        when no subset meets them, FailedPrecondition. `members` names the subset
        explicitly instead (offline evaluation). `asked`: the coverage and risk whose
        prediction sets and abstentions the answer carries, computed per batch (requests that
        ask the same share batches)."""
        start = time.perf_counter()
        now = self.clock()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"model '{model}': the deadline passed before the request started")
        ensemble = self.manager.ensemble(model)
        if ensemble is None:
            return await self._infer_single(model, rows, version, deadline, policy, min_accuracy, asked)
        if version not in (None, 0, 1):
            raise ModelNotFound(f"ensemble '{model}' has no version {version} (only version 1)")
        config, spec = ensemble.config, ensemble.spec
        # every configured member resolved once per request (readiness, choice, left-out)
        everyone, absent = ({}, {}) if config is None else self._resolve_members(config.members)
        if config is None or spec is None or ensemble.unloaded_by_request or len(everyone) < config.min_members:
            raise ModelNotReady(f"ensemble '{model}' is not ready: {self.manager.ensemble_problem(model)}")
        tracker = self.tracker(model)
        if tracker.selected is None and (min_accuracy is not None or latency_budget_s is not None):
            # An objective asked of an ensemble not yet evaluated (just loaded, or its
            # configuration just changed): evaluate it now, once, rather than ignore it.
            await self.ensure_evaluated(model)
        elif tracker.evaluated is not None and tracker.evaluated != everyone.keys():
            # A member stopped or started serving since the selection was made: choose
            # again now (one evaluation shared by the requests that see it), not at the
            # background loop's next turn.
            await self._evaluate_once(model, ensemble)
        explicit = latency_budget_s is not None and (deadline is None or now + latency_budget_s <= deadline)
        if latency_budget_s is not None:
            deadline = now + latency_budget_s if deadline is None else min(deadline, now + latency_budget_s)
        if members is None:
            budget = None if deadline is None else deadline - now - config.deadline_margin_ms / 1000
            if budget is not None and budget <= 0:  # no subset can help: the deadline, not an objective
                raise DeadlineExceeded(f"ensemble '{model}': the deadline leaves no time after its "
                                       f"{config.deadline_margin_ms:g} ms safety margin")
            members = tracker.choose(budget, min_accuracy, strict_budget=explicit)
            # A configured member that stopped serving is left out of the vote (and named)
            # whether or not the selection, re-evaluated in the background, still names it:
            # every protocol says so alike, with or without a deadline.
            served, missing = {m: everyone[m] for m in members if m in everyone}, absent
            if len(served) < min(config.min_members, len(members)):
                # the subset chose members that stopped serving since: the ensemble is ready
                # (its quorum serves), so ask every member rather than fail
                members, served = config.members, everyone
        else:
            served, missing = self._resolve_members(members)
        quorum = min(config.min_members, len(members))
        if len(served) < quorum:
            raise ModelNotReady(f"ensemble '{model}': only {len(served)} of {len(members)} members are "
                                f"serving, fewer than its quorum {quorum} ({'; '.join(map(str, missing.values()))})")
        policy = policy or config.policy
        key = (policy, quorum, tuple((m, id(s)) for m, s in served.items()), tuple(missing), id(ensemble), id(spec),
               asked)
        plan = Plan(served, missing, quorum, config.deadline_margin_ms / 1000.0,
                    (model, ensemble, spec, policy, tracker, asked), key)
        held = tuple(served.values())
        for member in held:  # held while queued: a reload waits for the request
            member.acquire()
        try:
            result = await self._pipeline(model, spec, served).submit(plan, rows, deadline)
        finally:
            for member in held:
                member.release()
        tracker.observe({}, time.perf_counter() - start)
        shadow = tracker.shadow(members)
        if shadow:
            result = dataclasses.replace(result, shadow=self._start_shadow(tracker, spec, shadow, rows))
        return result

    def _pipeline(self, model: str, spec: EnsembleSpec, served: dict[str, ServedVersion]) -> EnsemblePipeline:
        """The ensemble's queue (one per ensemble name, kept across reloads: a plan says
        which members and versions a request asked)."""
        pipeline = self._pipelines.get(("ensemble", model))
        if pipeline is None:
            queue = min(s.batching.max_queue_size for s in served.values())
            pipeline = self._pipelines["ensemble", model] = EnsemblePipeline(
                model, self._answer, spec.max_batch_size, queue, clock=self.clock)
        else:
            pipeline.max_batch_rows = spec.max_batch_size
        return pipeline

    def queued(self) -> dict[str, int]:
        """Requests waiting in each model's and ensemble's queue (not yet in a batch)."""
        return {name: p.queue_depth for (_, name), p in self._pipelines.items()}

    def _answer(self, plan: Plan, outcomes: FanOut, rows: np.ndarray,
                spans: Sequence[tuple[int, int]]) -> list[InferenceResult]:
        """One batch's vote, over all its rows at once, then each request's slice of it."""
        model, ensemble, spec, policy, tracker, asked = plan.context
        result = self._combine(model, ensemble, spec, policy, plan.members, outcomes, rows, plan.missing)
        tracker.observe({m.name: m.latency_s for m in result.members if m.in_time}, None)
        if asked is not None:  # once per batch: each request gets its rows' slice
            result = dataclasses.replace(result, uncertain_outputs=self.uncertainties.answer(result, asked))
        return self._slices(result, spans)

    def _slices(self, result: InferenceResult, spans: Sequence[tuple[int, int]]) -> list[InferenceResult]:
        """Each request's part of a batch's result, the batch recorded once by the observer."""
        if self.observer is not None:
            self.observer.on_answers(result, spans)
        if len(spans) == 1 and spans[0] == (0, result.vote.label_index.shape[0]):
            return [result]
        return [result_rows(result, a, b) for a, b in spans]

    def _resolve_members(self, members: Sequence[str]) -> tuple[dict[str, ServedVersion], dict[str, Exception]]:
        served: dict[str, ServedVersion] = {}
        missing: dict[str, Exception] = {}
        for m in members:
            try:
                served[m] = self.manager.resolve(m)
            except (ModelNotFound, ModelNotReady) as exc:
                missing[m] = exc  # voted without, like a member that missed the deadline
        return served, missing

    def _ready_spec(self, model: str, ensemble) -> EnsembleSpec:
        """The ensemble's spec when it is ready (its contract holds and at least its quorum
        of members serves), else ModelNotReady saying why."""
        if not self.manager.is_ready(model):
            raise ModelNotReady(f"ensemble '{model}' is not ready: {self.manager.ensemble_problem(model)}")
        return ensemble.spec

    async def _infer_single(self, model: str, rows: np.ndarray, version: int | None,
                            deadline: float | None, policy: Policy | None,
                            min_accuracy: float | None, asked: Asked | None = None) -> InferenceResult:
        served = self.manager.resolve(model, version)
        if min_accuracy is not None:
            live, samples = self.feedback.live(model)
            expected = blend(served.manifest.validation.calibrated.accuracy, live, samples, PRIOR_STRENGTH)
            if expected < min_accuracy:
                raise FailedPrecondition(
                    f"model '{model}': min_accuracy {min_accuracy:.4f} exceeds its expected accuracy {expected:.4f}")
        # An ensemble of one: requests queue at the model and a batch of them is calibrated,
        # voted and sliced once (its member's batcher still merges, pads and splits).
        plan = Plan({model: served}, {}, 1, 0.0, (model, served, policy or "soft", asked), (id(served), policy, asked))
        pipeline = self._pipelines.get(("model", model))
        config = served.batching
        if pipeline is None:
            pipeline = self._pipelines["model", model] = EnsemblePipeline(
                model, self._answer_single, config.max_batch_size, config.max_queue_size, kind="model",
                clock=self.clock)
        else:
            pipeline.max_batch_rows, pipeline.max_queue = config.max_batch_size, config.max_queue_size
        served.acquire()  # held while queued: a reload waits for the request
        try:
            return await pipeline.submit(plan, rows, deadline)
        finally:
            served.release()

    def _answer_single(self, plan: Plan, outcomes: FanOut, rows: np.ndarray,
                       spans: Sequence[tuple[int, int]]) -> list[InferenceResult]:
        """One batch of a single model: calibrated and voted over all its rows at once, then
        each request's slice of it."""
        model, served, policy, asked = plan.context
        outcome = outcomes[model]
        logits = outcome.result
        assert logits is not None  # answered: the pipeline answers only once its quorum (1) has
        start = time.perf_counter()
        probs = calibrate(logits, served.manifest.calibration.temperature)
        voted = vote("soft", [probs], [model])
        vote_s = time.perf_counter() - start
        _record_vote(vote_s, "soft", ())
        member = MemberResult(model, served.version, served.device, outcome.latency_s, True)
        result = InferenceResult(model, served.version, policy, served.manifest.labels, voted, (member,), (),
                                 probs[None].astype(np.float32), logits, inputs=rows, vote_s=vote_s)
        if asked is not None:
            result = dataclasses.replace(result, uncertain_outputs=self.uncertainties.answer(result, asked))
        return self._slices(result, spans)

    def _combine(self, model: str, ensemble, spec: EnsembleSpec, policy: Policy,
                 served: Mapping[str, ServedVersion], outcomes, rows: np.ndarray | None = None,
                 missing: Mapping[str, Exception] | None = None) -> InferenceResult:
        start = time.perf_counter()
        answered = [m for m, o in outcomes.items() if o.in_time and o.error is None]
        probs = []
        for m in answered:
            p = calibrate(outcomes[m].result, served[m].manifest.calibration.temperature)
            order = class_order(spec.labels, served[m].manifest.labels)  # by label name
            probs.append(p if order is None else p[:, order])
        accuracy = [served[m].manifest.validation.calibrated.accuracy for m in answered]
        result = ensemble.calibration.apply(vote(policy, probs, answered, validation_accuracy=accuracy,
                                                 member_weights=ensemble.calibration.weights_of(answered)))
        members = tuple(
            MemberResult(m, served[m].version, served[m].device, o.latency_s,
                         m in answered, "" if o.error is None else str(o.error))
            for m, o in outcomes.items())
        members += tuple(MemberResult(m, 0, "", 0.0, False, str(exc)) for m, exc in (missing or {}).items())
        left_out = tuple(m.name for m in members if not m.in_time)
        vote_s = time.perf_counter() - start
        _record_vote(vote_s, policy, left_out)
        return InferenceResult(model, 1, policy, spec.labels, result, members, left_out,
                               np.stack(probs).astype(np.float32), inputs=rows, vote_s=vote_s)

    # -- metadata --------------------------------------------------------------------------
    def info(self, model: str, version: int | None = None) -> ModelInfo:
        """The model's metadata; built once per serving state (every request asks). An
        ensemble's is its own, derived and checked when it loaded (its EnsembleSpec).
        With `version`: ModelNotFound first when the model has no such version (the fronts
        ask before reading a request's inputs, so that an unknown version is NOT_FOUND)."""
        if version:
            self.manager.check_known(model, version)
        ensemble = self.manager.ensemble(model)
        if ensemble is not None:
            spec = self._ready_spec(model, ensemble)
            cached = self._info.get(model)
            if cached is not None and cached[0] is ensemble.config and cached[1] is spec:
                return cached[2]
            config = ensemble.config
            assert config is not None  # ready: its ensemble.yaml has loaded
            info = ModelInfo(model, "ensemble", (1,), spec.input, spec.labels, config.members,
                             config.policy, spec.max_batch_size, self.manager.settings.max_request_rows,
                             config.uncertainty.coverage)
            self._info[model] = (config, spec, info)
            return info
        served = self.manager.resolve(model)
        versions = tuple(sorted(self.manager.variants[model].versions))
        cached = self._info.get(model)
        if cached is not None and cached[0] is served and cached[1] == versions:
            return cached[2]
        m = served.manifest
        info = ModelInfo(model, "model", versions, m.input, m.labels, (model,), "soft",
                         served.batching.max_batch_size, self.manager.settings.max_request_rows,
                         self.manager.variants[model].config.uncertainty.coverage)
        self._info[model] = (served, versions, info)
        return info


def _record_vote(seconds: float, policy: str, left_out: tuple[str, ...]) -> None:
    """The calibration and vote just done, as a stage of the request's trace (if traced)."""
    if COLLECTOR.get() is not None:
        end = time.monotonic()
        record(Stage("calibrate and vote", end - seconds, end,
                     {"quorum.policy": policy, "quorum.members_left_out": ",".join(left_out)}))
