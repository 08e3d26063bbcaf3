"""Per-model configuration files: optional `model.yaml` beside a model's version folders, and
`ensemble.yaml` for an ensemble folder. Both are written by hand, so errors name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.json_schema import SkipJsonSchema

from service.errors import ModelLoadError

MODEL_CONFIG = "model.yaml"
ENSEMBLE_CONFIG = "ensemble.yaml"

Policy = Literal["majority", "soft", "confidence", "confidence_entropy", "accuracy", "stacked"]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Latest(_Strict):
    num_versions: int = Field(1, ge=1)


class Specific(_Strict):
    versions: tuple[int, ...] = Field(min_length=1)


class VersionPolicy(_Strict):
    """TF Serving's model_version_policy: exactly one of latest (default: the newest
    version), all, or specific versions."""

    latest: Latest | None = None
    all: dict[str, Any] | None = None
    specific: Specific | None = None

    @model_validator(mode="after")
    def _one(self) -> "VersionPolicy":
        chosen = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"choose one of latest, all, specific (got {chosen})")
        return self

    def select(self, available: set[int]) -> set[int]:
        """Versions to serve among those present on disk."""
        if self.all is not None:
            return set(available)
        if self.specific is not None:
            return set(self.specific.versions) & available
        keep = (self.latest or Latest()).num_versions
        return set(sorted(available)[-keep:])


class Batching(_Strict):
    """Dynamic batching knobs (see service.batching.config.BatchingConfig)."""

    max_batch_size: int | None = Field(None, ge=1)
    max_queue_delay_us: int = Field(0, ge=0)
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = Field(1024, ge=1)


class UncertaintyDefaults(_Strict):
    """What a request that asks for no coverage gets (a TF Serving Predict cannot ask)."""

    coverage: float | None = Field(None, gt=0, lt=1, description=(
        "default coverage of the prediction sets: answers carry prediction_set and set_size"))
    score: Literal["lac", "aps"] = Field("lac", description="conformity score: lac (smallest sets) or aps (adaptive)")
    class_conditional: bool = Field(False, description="coverage per class (Mondrian; lac only)")

    @model_validator(mode="after")
    def _check(self) -> "UncertaintyDefaults":
        if self.class_conditional and self.score != "lac":
            raise ValueError("class_conditional sets are computed for score lac only")
        return self


class _Priorities(_Strict):
    """Priority levels of the requests queued at a model or ensemble (Triton's names)."""

    priority_levels: int = Field(1, ge=1, le=1000, description=(
        "priority classes of requests (1 is the highest): under contention a batch is formed "
        "from the highest first and the queue refuses the lowest first; 1: one class"))
    default_priority_level: int | None = Field(None, ge=1, description=(
        "the level of a request that asks none (priority 0 or unset); default: the lowest, priority_levels"))
    priority_reserve: float = Field(0.25, ge=0, lt=1, description=(
        "share of the queue kept for the highest level: level L of N may fill only "
        "1 - priority_reserve * (L - 1) / (N - 1) of it"))

    @model_validator(mode="after")
    def _check_priorities(self) -> "_Priorities":
        if self.default_priority_level is not None and self.default_priority_level > self.priority_levels:
            raise ValueError(f"default_priority_level {self.default_priority_level} exceeds "
                             f"priority_levels {self.priority_levels}")
        return self


class ModelConfig(_Priorities):
    version_policy: VersionPolicy = VersionPolicy()
    version_labels: dict[str, int] = Field(default_factory=dict, description="e.g. stable: 1, canary: 2")
    device: str | None = None
    batching: Batching | None = None
    uncertainty: UncertaintyDefaults = UncertaintyDefaults()


class Objective(_Strict):
    """Maximise accuracy subject to satisficing constraints (each optional)."""

    optimize: Literal["accuracy"] = "accuracy"
    latency_p99_ms: float | None = Field(None, gt=0, description="p99 end-to-end latency budget")
    device_memory_mb: float | None = Field(None, gt=0, description="memory budget per device")
    latency_window: int = Field(1000, ge=10, description="requests in the latency windows")
    latency_window_s: float = Field(60.0, gt=0, description="oldest observation the windows keep")
    min_latency_samples: int = Field(20, ge=1, description="below this, warm-up timings stand in")
    prior_strength: int = Field(200, ge=1, description="validation accuracy counts as this many live rows")
    hysteresis: float = Field(0.005, ge=0, description="accuracy gain needed to switch subsets")
    explore_fraction: float = Field(0.05, ge=0, le=1, description=(
        "share of requests that also ask the members left out, in the background (shadow), "
        "so their live accuracy and latency stay measured"))


class RemoteMember(_Strict):
    """A member served by another server (another Quorum, or any KServe v2 gRPC server),
    asked once per batch over KServe v2 gRPC (service.repository.remote)."""

    name: str = Field(min_length=1, description="the model's name on that server (and the member's here)")
    endpoint: str = Field(pattern=r"^(dns:///)?[^\s/]+:[0-9]{1,5}$", description=(
        "HOST:PORT of its gRPC port; dns:///HOST:PORT spreads the calls over every address the name "
        "resolves to (a headless Service: each pod of the member)"))
    version: int | None = Field(None, ge=1, description="pin a version; default: the newest it serves")
    tls: bool = Field(False, description="TLS to the endpoint (system roots, or ca_file)")
    ca_file: str | None = Field(None, description="CA bundle for tls (relative: to the ensemble's folder)")
    token_file: str | None = Field(None, description="bearer token sent to the endpoint (relative: to the ensemble's folder)")
    manifest: str | None = Field(None, description=(
        "variant.json made by quorum export, for a server that does not serve Quorum's GetManifest "
        "(relative: to the ensemble's folder); a Quorum endpoint provides it"))
    watch_interval_s: float = Field(1.0, gt=0, le=60, description=(
        "how often its readiness and version are asked (sooner after a failed call)"))
    timeout_s: float = Field(5.0, gt=0, description="deadline of a watch call (connect included)")


def _member_name(member: Any) -> Any:
    return member.get("name") if isinstance(member, dict) else member


class EnsembleConfig(_Priorities):
    members: tuple[str, ...] = Field(min_length=1, json_schema_extra={"items": {"anyOf": [
        {"type": "string"}, RemoteMember.model_json_schema()]}}, description=(
        "member models: a name (a model of this repository) or {name, endpoint, ...} (a model served "
        "elsewhere: RemoteMember)"))
    remote: SkipJsonSchema[tuple[RemoteMember, ...]] = Field((), exclude=True)
    """The members with an endpoint (written in `members`, never as a field of their own)."""
    policy: Policy = "confidence"
    batching: Batching | None = Field(None, description="applied to members without their own")
    quorum: int | None = Field(None, ge=1, description=(
        "fewest members whose answers make a vote, and that must be serving for the ensemble "
        "to be ready; default (unset): a majority of the configured members, len(members) // 2 + 1, "
        "so that one member alone never passes for the vote of five"))
    deadline_margin_ms: float = Field(5.0, ge=0, description="safety margin before a deadline (vote and reply)")
    objective: Objective | None = Field(None, description="without one, every member votes")
    uncertainty: UncertaintyDefaults = UncertaintyDefaults()

    @model_validator(mode="before")
    @classmethod
    def _split_members(cls, data: Any) -> Any:
        """members as written: names and {name, endpoint, ...} mappings; kept as names, the
        endpoints' settings in `remote`. A member listed twice is named, with where each is."""
        if not isinstance(data, dict) or not isinstance(data.get("members"), (list, tuple)):
            return data
        if "remote" in data:
            raise ValueError("'remote' is not a field: write a member served elsewhere in members, "
                             "as {name: MODEL, endpoint: HOST:PORT}")
        members = list(data["members"])
        seen: dict[Any, str] = {}
        for member in members:
            name = _member_name(member)
            where = f"at {member.get('endpoint')}" if isinstance(member, dict) else "in this repository"
            if name in seen:
                raise ValueError(f"member '{name}' is listed twice ({seen[name]} and {where}); "
                                 "a member is one model")
            seen[name] = where
        remote = [m for m in members if isinstance(m, dict)]
        return {**data, "members": [_member_name(m) for m in members], "remote": remote}

    @model_validator(mode="after")
    def _check(self) -> "EnsembleConfig":
        if len(set(self.members)) != len(self.members):
            raise ValueError("members must be distinct")
        if self.quorum is not None and self.quorum > len(self.members):
            raise ValueError(f"quorum {self.quorum} exceeds the {len(self.members)} members")
        return self

    @property
    def min_members(self) -> int:
        """The quorum in effect: the configured one, or a majority of the members."""
        return self.quorum if self.quorum is not None else len(self.members) // 2 + 1


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ModelLoadError(str(path), f"not readable YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(str(path), "must hold a mapping")
    return data


def _validate(cls: type[_Strict], path: Path) -> Any:
    try:
        return cls.model_validate(_read_yaml(path))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise ModelLoadError(str(path), f"field '{field}': {first['msg']}") from exc


def load_model_config(model_dir: Path) -> ModelConfig:
    path = model_dir / MODEL_CONFIG
    return _validate(ModelConfig, path) if path.is_file() else ModelConfig()


def load_ensemble_config(model_dir: Path) -> EnsembleConfig:
    return _validate(EnsembleConfig, model_dir / ENSEMBLE_CONFIG)
