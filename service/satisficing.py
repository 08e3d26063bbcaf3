"""The data plane's member selection (satisficing): each ensemble's objective tracker, its
evaluation in the background and when a request needs it, and the shadow calls to the
members it leaves out, which keep their live accuracy and latency measured."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Sequence

import numpy as np

from service.ensemble.voting import calibrate
from service.errors import ModelNotFound, ModelNotReady
from service.objectives.status import MemberInfo
from service.objectives.store import Store
from service.objectives.tracker import ObjectiveTracker
from service.repository.contract import EnsembleSpec
from service.repository.manager import ModelManager
from service.repository.served import ServedVersion

log = logging.getLogger("service.dataplane")  # its lines read as the data plane's, as before the split


class Satisficing:
    """Mixed into DataPlane, which holds these."""

    manager: ModelManager
    feedback: Store
    trackers: dict[str, ObjectiveTracker]
    _shadow_tasks: set[asyncio.Task]
    _evaluations: dict[str, asyncio.Task]
    _member_infos: weakref.WeakKeyDictionary[ServedVersion, dict]

    def tracker(self, ensemble: str) -> ObjectiveTracker:
        """The ensemble's objective tracker, made anew when its configuration changes (for
        an ensemble whose configuration has loaded: callers check)."""
        model = self.manager.ensemble(ensemble)
        assert model is not None and model.config is not None, f"{ensemble}: no configured ensemble"
        config = model.config
        tracker = self.trackers.get(ensemble)
        if tracker is None or (tracker.members, tracker.configured, tracker.policy) != (
                config.members, config.objective, config.policy):
            tracker = self.trackers[ensemble] = ObjectiveTracker(
                ensemble, config.members, config.objective, config.policy)
        return tracker

    async def evaluate_objectives(self) -> None:
        """Re-evaluate every ensemble's member selection (the replay runs in a thread)."""
        for name, ensemble in list(self.manager.ensembles.items()):
            await self._evaluate(name, ensemble)

    async def ensure_evaluated(self, name: str) -> ObjectiveTracker | None:
        """The ensemble's tracker, evaluated now if the background loop has not yet done it
        (just loaded, or its configuration just changed): what it reports (selection,
        constraints) is then never a placeholder. None for a name that is no ensemble."""
        ensemble = self.manager.ensemble(name)
        if ensemble is None or ensemble.config is None:
            return None
        tracker = self.tracker(name)
        if tracker.selected is None:
            await self._evaluate_once(name, ensemble)
        return tracker

    async def _evaluate_once(self, name: str, ensemble) -> None:
        task = self._evaluations.get(name)
        if task is None or task.done():
            task = self._evaluations[name] = asyncio.ensure_future(self._evaluate(name, ensemble))
        try:
            await asyncio.shield(task)  # a caller that goes away does not cancel the others' wait
        except Exception:  # the request goes on with the selection it has, as the loop would
            log.exception("objective evaluation of %s failed", name)

    async def _evaluate(self, name: str, ensemble) -> None:
        if ensemble.config is None or ensemble.spec is None:
            return
        spec = ensemble.spec
        tracker = self.tracker(name)
        infos = {}
        for member in ensemble.config.members:
            model = self.manager.variants.get(member)
            served = model.serving() if model else None
            if served is not None:
                infos[member] = self._member_info(served, spec.labels)
        if not infos:
            return
        rows = self.feedback.live_rows(name)
        live = {m: self.feedback.live(f"{name}/{m}") for m in infos}
        tracker.stacked_weights = ensemble.calibration.weights
        await asyncio.to_thread(tracker.evaluate, infos, rows, live)

    def _member_info(self, served: ServedVersion, labels: tuple[str, ...]) -> MemberInfo:
        by_labels = self._member_infos.setdefault(served, {})
        info = by_labels.get(labels)
        if info is None:
            info = by_labels[labels] = member_info(served, labels)
        return info

    async def run_objectives(self, interval_s: float = 1.0) -> None:
        """Re-evaluate periodically: feedback and latency move the choice over time."""
        while True:
            try:
                await self.evaluate_objectives()
            except Exception:  # a failed evaluation must not stop the next one
                log.exception("objective evaluation failed")
            await asyncio.sleep(interval_s)

    def _start_shadow(self, tracker: ObjectiveTracker, spec: EnsembleSpec, members: Sequence[str],
                      rows: np.ndarray) -> dict[str, tuple[int, asyncio.Task]]:
        """Ask members the selection left out, without waiting for them: their answers
        feed live accuracy (through feedback) and their latency keeps being measured."""
        started = {}
        for name in members:
            try:
                served = self.manager.resolve(name)
            except (ModelNotFound, ModelNotReady):
                continue
            order = class_order(spec.labels, served.manifest.labels)
            task = asyncio.create_task(self._shadow_call(tracker, served, order, rows), name=f"shadow-{name}")
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)
            started[name] = (served.version, task)
        return started

    @staticmethod
    async def _shadow_call(tracker: ObjectiveTracker, served: ServedVersion, order: np.ndarray | None,
                           rows: np.ndarray) -> np.ndarray | None:
        start = time.perf_counter()
        try:
            logits = await served.infer(rows)
        except Exception:  # a shadow failure never reaches a client; the member is just unmeasured
            log.debug("shadow call to %s failed", served.name, exc_info=True)
            return None
        tracker.observe({served.name: time.perf_counter() - start}, None)
        probs = calibrate(logits, served.manifest.calibration.temperature)
        return (probs if order is None else probs[:, order]).astype(np.float32)


def class_order(ensemble_labels: tuple[str, ...], member_labels: tuple[str, ...]) -> np.ndarray | None:
    """Indices that put a member's class axis in the ensemble's order (by label name;
    None when it already is): computed once per pair of label lists, not per request."""
    if ensemble_labels == member_labels:
        return None
    position = {label: i for i, label in enumerate(member_labels)}
    return np.fromiter((position[label] for label in ensemble_labels), dtype=np.int64, count=len(ensemble_labels))


def member_info(served: ServedVersion, labels: tuple[str, ...] | None = None) -> MemberInfo:
    """What selection needs of a serving member; its validation replay in the class order
    `labels` (an ensemble's), so that members voting together agree on class indices."""
    validation = served.manifest.validation
    probabilities = np.asarray(validation.probabilities)
    truth = np.asarray(validation.labels)
    order = class_order(labels, served.manifest.labels) if labels is not None else None
    if order is not None:
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        probabilities, truth = probabilities[:, order], inverse[truth]
    return MemberInfo(
        name=served.name, version=served.version, device=served.device,
        warmup_latency_s=served.runtime.warmup_latency_s, memory_mb=served.runtime.artifact_mb,
        validation_accuracy=validation.calibrated.accuracy, validation_indices=validation.indices,
        validation_labels=truth, validation_probabilities=probabilities)
