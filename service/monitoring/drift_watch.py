"""The monitor's drift windows: one per model (an ensemble's for the ensemble, whatever member
subset answered), made from its reference when its first answers arrive and again when that
reference changes, and evaluated off the request path on a timer."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from service.monitoring import drift

if TYPE_CHECKING:  # read, never imported at run time
    from service.repository.manager import ModelManager
    from service.results import InferenceResult

log = logging.getLogger("service.monitoring.monitor")  # its lines read as the monitor's, as before the split


class DriftWatch:
    """Mixed into Monitor, which holds these."""

    settings: Any
    metrics: Any
    manager: ModelManager | None
    window: int
    min_rows: int
    drift_windows: dict[str, drift.DriftWindow]
    drift_results: dict[str, list[drift.SignalValue]]
    _no_reference: set[tuple[str, tuple]]

    def _drift_window(self, result: "InferenceResult") -> drift.DriftWindow | None:
        """The model's window: it belongs to the model (an ensemble's to the ensemble, not to
        the member subset that answered), and restarts only when its reference changes."""
        name = result.model
        key = self._reference_key(name, result)
        window = self.drift_windows.get(name)
        if window is not None and window.key == key:
            return window
        if (name, key) in self._no_reference or self.manager is None:
            return None
        try:
            reference = self._reference(name, result)
        except Exception as exc:  # a model without a usable reference is just not monitored
            log.warning("no drift monitoring for %s: %s", name, exc)
            self._no_reference.add((name, key))
            return None
        window = self.drift_windows[name] = drift.DriftWindow(reference, self.window, key)
        self.drift_results.pop(name, None)
        return window

    def _reference_key(self, name: str, result: "InferenceResult") -> tuple:
        ensemble = self.manager.ensemble(name) if self.manager is not None else None
        if ensemble is None:
            return ("model", result.version)
        return ("ensemble", ensemble.checked)  # what its spec was derived from: its members' versions

    def _reference(self, name: str, result: "InferenceResult") -> drift.ModelReference:
        manager = self.manager
        assert manager is not None  # _drift_window asks for a reference only with a manager
        ensemble = manager.ensemble(name)
        if ensemble is None or ensemble.config is None or ensemble.spec is None:
            return drift.ModelReference.of_model(manager.resolve(name, result.version).manifest)
        spec = ensemble.spec
        manifests = []
        for member in ensemble.config.members:
            manifest = manager._member_manifest(member)
            if not isinstance(manifest, str) and manifest is not None:
                manifests.append(spec.aligned_manifest(member, manifest))
        return drift.ModelReference.of_ensemble(manifests, ensemble.config.policy, ensemble.calibration)

    # -- drift evaluation (off the hot path) -----------------------------------------------
    async def _drift_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.drift_interval_s)
            try:
                await asyncio.to_thread(self.evaluate_drift)
            except Exception:
                log.exception("drift evaluation failed")

    def evaluate_drift(self) -> None:
        for name, window in list(self.drift_windows.items()):
            self.drift_results[name] = window.evaluate(self.min_rows)
            self.metrics.drift_evaluations.labels(name).inc()
