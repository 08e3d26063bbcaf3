"""What the servicers share: the data plane, the manager, feedback and statistics."""

from __future__ import annotations

from dataclasses import dataclass

from service.dataplane import DataPlane
from service.results import InferenceResult
from service.monitoring.stages import annotate
from service.monitoring.statistics import Statistics
from service.objectives.store import Store
from service.repository.manager import ModelManager
from service.repository.served import State
from service.repository.members import degraded_reason

STATE_NAMES = {State.START: "LOADING", State.LOADING: "LOADING", State.AVAILABLE: "READY",
               State.UNLOADING: "UNLOADING", State.END: "UNAVAILABLE", State.UNKNOWN: "UNAVAILABLE"}


@dataclass
class ApiContext:
    manager: ModelManager
    data: DataPlane
    statistics: Statistics
    draining: bool = False
    loaded: bool = False
    """The first load of the repository has finished."""

    @property
    def feedback(self) -> Store:
        return self.data.feedback

    def ready(self) -> bool:
        """Readiness (health "", ServerReady): up, first load done, not draining; with
        strict_readiness also every model and ensemble ready."""
        if self.draining or not self.loaded:
            return False
        return self.manager.all_ready() if self.manager.settings.strict_readiness else True

    def on_inference(self, result: InferenceResult, rows: int, seconds: float) -> None:
        annotate({"quorum.model": result.model, "quorum.version": result.version, "quorum.rows": rows,
                  "quorum.policy": result.policy, "quorum.members_left_out": ",".join(result.left_out)})
        # per request: its own latency; its metrics and drift are the data plane's
        # observer's, per batch
        self.statistics.on_request(result.model, result.version, rows, seconds, ok=True)

    def on_failure(self, model: str, seconds: float) -> None:
        """A failed request, counted under the version its successes are counted at (an
        ensemble's 1, a model's serving version); a name the server does not have is not
        counted: clients must not grow the table with made-up names."""
        if self.manager.ensemble(model) is not None:
            version = 1
        else:
            variant = self.manager.variants.get(model)
            served = variant.serving() if variant is not None else None
            if served is None:
                return
            version = served.version
        self.statistics.on_request(model, version, 0, seconds, ok=False)

    def repository_index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) for every model on disk or loaded."""
        rows = [(s.model, str(s.version), "UNAVAILABLE" if s.error else STATE_NAMES[s.state], s.error)
                for s in self.manager.statuses()]
        for name, model in self.manager.variants.items():
            if model.unloaded_by_request and not model.versions:
                rows.append((name, "", "UNAVAILABLE", "unloaded"))
        for name, ensemble in self.manager.ensembles.items():
            ready = self.manager.is_ready(name)
            missing = self.manager.missing_members(name) if ready else {}
            reason = degraded_reason(missing) if missing else self.manager.ensemble_problem(name)
            rows.append((name, "1", "READY" if ready else "UNAVAILABLE", reason))
        return sorted(rows)
