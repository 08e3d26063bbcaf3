"""What the manager keeps of a member served by another server: the link it is asked over
(an interface; the gRPC client is service.remote, handed in by the wiring), the remote model
and the version of it the ensembles vote with.

A RemoteModel sits among the manager's models under its name, so an ensemble resolves it as
it resolves a local member: its RemoteVersion has the manifest (from the endpoint, or a local
file), a lease, and `infer`, which asks the endpoint once per batch, with the batch's deadline,
instead of a runtime behind a batcher (the other server batches)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from service.batching.queue import Keep
from service.errors import DeadlineExceeded, ModelNotReady
from service.repository.config import RemoteMember
from service.repository.manifest import VariantManifest
from service.repository.served import ServedVersion, State, VariantModel


class RemoteFailure(Exception):
    """Why a remote member cannot be had now, in one line (the endpoint does not answer or
    resolve, refuses the credentials, has no such model or no manifest for it)."""


@dataclass(frozen=True)
class Served:
    """What one watch call learns: the version the endpoint serves and, when it is not the one
    known already, its manifest (None: unchanged) and the largest batch it takes whole."""

    version: int
    manifest: VariantManifest | None
    max_batch_size: int


class RemoteLink(Protocol):
    """One open channel to one endpoint, for one member."""

    async def watch(self, model: str, version: int | None, known: int | None) -> Served:
        """The version served (`version`, or the newest), with its manifest unless it is
        `known`; RemoteFailure when the model is not ready there or cannot be had."""
        ...

    async def infer(self, manifest: VariantManifest, rows: np.ndarray, timeout_s: float | None) -> np.ndarray:
        """The logits of `rows` (all of a batch's, in one request) from the model and version
        `manifest` names (its input's name, its output's); the endpoint's refusal as a
        domain error (ModelNotReady for UNAVAILABLE, DeadlineExceeded, Overloaded...)."""
        ...

    async def close(self) -> None: ...


Connector = Callable[[RemoteMember, Path], RemoteLink]
"""Opens the link of a member (`Path`: the ensemble's folder, which relative files are in)."""


class RemotePeer:
    """The runtime's place in a remote version: where it computes, as status and selection read it."""

    def __init__(self, manifest: VariantManifest, endpoint: str, latency_s: float) -> None:
        self.framework = manifest.framework
        self.device = f"remote {endpoint}"
        self.warmup_latency_s = latency_s  # the watch call's round trip: until calls are measured
        self.artifact_mb = 0.0  # no memory here
        self.manifest = manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version


class RemoteCalls:
    """The batcher's place in a remote version: the calls in flight (the queue is the endpoint's)."""

    queue_depth = 0

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.in_flight = 0  # rows

    async def stop(self, timeout: float) -> None:
        return None


@dataclass(eq=False)
class RemoteVersion(ServedVersion):
    link: RemoteLink | None = None
    endpoint: str = ""
    on_unavailable: Callable[[], None] | None = None
    """Called when a call finds the endpoint not ready: the watch looks again at once."""

    async def infer(self, rows: np.ndarray, deadline: float | None = None,
                    arrivals: Sequence[float] | None = None, keep: Keep | None = None) -> np.ndarray:
        """The batch's rows in one request, with what is left of its deadline."""
        calls: RemoteCalls = self.batcher  # type: ignore[assignment]
        with self.lease():
            timeout = None
            if deadline is not None:
                timeout = deadline - calls.clock()
                if timeout <= 0:
                    raise DeadlineExceeded(f"member '{self.name}' at {self.endpoint}: the deadline passed before the call")
            calls.in_flight += rows.shape[0]
            assert self.link is not None
            try:
                return await self.link.infer(self.manifest, rows, timeout)
            except ModelNotReady:
                if self.on_unavailable is not None:
                    self.on_unavailable()
                raise
            finally:
                calls.in_flight -= rows.shape[0]

    async def drain_and_unload(self, grace_s: float) -> None:
        """Retired: the calls running finish (within the grace period); nothing is loaded here."""
        self.state = State.UNLOADING
        if self._leases:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
            except asyncio.TimeoutError:
                pass
        self.state = State.END


@dataclass(eq=False)
class RemoteModel(VariantModel):
    spec: RemoteMember | None = None
    folder: Path = Path()
    """The folder of the ensemble that names it (its relative files are there)."""
    link: RemoteLink | None = None
    problem: str = ""
    """Why it serves nothing now ("" while it serves)."""
    refused: dict[int, str] = field(default_factory=dict)
    """Versions the endpoint served that the ensemble contract refused, with why."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    def outage(self) -> str:
        return self.problem

    def current(self) -> RemoteVersion | None:
        """The version the ensembles vote with (serving or not), the newest held."""
        return self.versions[max(self.versions)] if self.versions else None  # type: ignore[return-value]

    def unavailable(self) -> None:
        """A call found the endpoint not ready: the watch looks again now, not at its next turn."""
        self.wake.set()


def where(spec: RemoteMember) -> str:
    return f"at {spec.endpoint}"


def not_ready(model: RemoteModel, cause: str) -> str:
    """The outage line of a member (what the ensemble's status and the log name)."""
    assert model.spec is not None
    return f"{where(model.spec)}: {cause}"


__all__ = ["Connector", "RemoteCalls", "RemoteFailure", "RemoteLink", "RemoteModel", "RemotePeer",
           "RemoteVersion", "Served"]
