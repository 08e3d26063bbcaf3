"""Members served elsewhere, kept in step: each ensemble's remote members registered under their
names, their links opened and watched (readiness and version), a new version checked against
the ensembles and swapped in (the vote recalibrated), an endpoint that is not ready treated as
an unloaded member (the ensemble answers without it while its quorum holds)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from service.batching.config import BatchingConfig
from service.errors import ModelLoadError
from service.repository.config import ModelConfig, RemoteMember
from service.repository.loading import VersionLoading
from service.repository.remote import (
    Connector, RemoteCalls, RemoteFailure, RemoteModel, RemotePeer, RemoteVersion, Served, not_ready)
from service.repository.scan import ModelEntry
from service.repository.served import State

# The manager's lines keep the logger they always had: operators filter the logs on it.
log = logging.getLogger("service.repository.manager")

RETRY_MAX_S = 10.0
"""Longest wait between two looks at an endpoint that does not answer (it doubles up to this)."""


class RemoteMembers(VersionLoading):
    """ModelManager's remote members (a part of it: ModelManager.__init__ sets the state)."""

    remotes: dict[str, RemoteModel]
    _connect: Connector | None
    _remote_conflicts: dict[str, str]

    async def _sync_remotes(self, entries: dict[str, ModelEntry]) -> None:
        """Register, replace or drop the remote members the ensembles name now; a new one is
        looked at once before this returns (together, each within its timeout_s), then watched."""
        wanted: dict[str, tuple[RemoteMember, Path, str]] = {}
        conflicts: dict[str, str] = {}
        for name in sorted(self.ensembles):
            ensemble = self.ensembles[name]
            for member in ensemble.config.remote if ensemble.config else ():
                cause = None
                if member.name in entries:
                    cause = f"this repository has a model '{member.name}' of its own (a server has one model of a name)"
                elif member.name in wanted and _same(wanted[member.name][:2]) != _same((member, ensemble.entry.path)):
                    other = wanted[member.name]
                    cause = (f"ensemble '{other[2]}' names it at {other[0].endpoint} with other settings "
                             "(a server has one model of a name)")
                elif self._connect is None:
                    cause = "this server makes no remote calls"
                if cause is None:
                    wanted[member.name] = (member, ensemble.entry.path, name)
                else:
                    conflicts.setdefault(name, f"member '{member.name}' at {member.endpoint}: {cause}")
        self._remote_conflicts = conflicts
        for name, model in list(self.remotes.items()):
            if name not in wanted or _same((model.spec, model.folder)) != _same(wanted[name][:2]):
                await self._drop_remote(model)
        new = [self._add_remote(member, folder) for name, (member, folder, _) in wanted.items()
               if name not in self.remotes]
        await asyncio.gather(*(self._look(model) for model in new))
        for model in new:
            model.task = asyncio.create_task(self._watch(model), name=f"remote-{model.entry.name}")

    def _add_remote(self, member: RemoteMember, folder: Path) -> RemoteModel:
        assert self._connect is not None
        model = RemoteModel(ModelEntry(member.name, folder, "variant"), ModelConfig(), spec=member, folder=folder,
                            link=self._connect(member, folder), problem=not_ready_yet(member))
        self.remotes[member.name] = self.variants[member.name] = model
        return model

    async def _drop_remote(self, model: RemoteModel, why: str = "no ensemble names it now") -> None:
        name = model.entry.name
        del self.remotes[name]
        if self.variants.get(name) is model:
            del self.variants[name]
        if model.task is not None:
            model.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await model.task
        await self._retire(model)
        if model.link is not None:
            await model.link.close()
        log.info("remote member %s at %s: %s, closed", name, model.spec.endpoint if model.spec else "", why)

    async def _stop_remotes(self) -> None:
        for model in list(self.remotes.values()):
            await self._drop_remote(model, "the server stops")

    async def _watch(self, model: RemoteModel) -> None:
        """Look at the endpoint every watch_interval_s (sooner when a call found it not ready;
        backing off to RETRY_MAX_S while it does not answer)."""
        assert model.spec is not None
        wait = model.spec.watch_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await model.wake.wait()
            model.wake.clear()
            try:
                await self._look(model)
            except Exception:  # a bug of ours must not stop the watch
                log.exception("remote member %s: watch failed", model.entry.name)
            wait = model.spec.watch_interval_s if not model.problem else min(RETRY_MAX_S, max(wait * 2, model.spec.watch_interval_s))

    async def _look(self, model: RemoteModel) -> None:
        """One watch call, and what it changes: up, down, or a new version checked and swapped in."""
        spec, link = model.spec, model.link
        assert spec is not None and link is not None
        current = model.current()
        start = time.perf_counter()
        try:
            served = await link.watch(spec.name, spec.version, current.version if current else None)
            if current is not None and served.version != current.version and served.version in model.refused:
                # the newer version was refused: the one voting goes on while the endpoint serves it
                try:
                    await link.watch(spec.name, current.version, current.version)
                except RemoteFailure as exc:
                    raise RemoteFailure(f"{model.refused[served.version]}; and version {current.version}: {exc}") from exc
                served = Served(current.version, None, current.batching.max_batch_size)
            elif current is None and served.version in model.refused:
                raise RemoteFailure(model.refused[served.version])
        except RemoteFailure as exc:
            self._remote_state(model, str(exc))
            return
        if current is not None and served.version == current.version:
            self._remote_state(model, "")
            return
        if served.manifest is None:  # a version we did not hold, answered as known: ask again next time
            return
        self._swap_in(model, served, time.perf_counter() - start)

    def _swap_in(self, model: RemoteModel, served: Served, latency_s: float) -> None:
        spec = model.spec
        assert spec is not None and served.manifest is not None
        manifest = served.manifest.model_copy(update={  # as served there: its name, version and batch size
            "name": spec.name, "version": served.version, "max_batch_size": max(1, served.max_batch_size)})
        try:
            self._check_new_member_version(manifest)
        except ModelLoadError as exc:
            model.refused[served.version] = f"version {served.version} {exc.args[-1] if exc.args else exc}"
            self._report(f"remote {spec.name}", served.version,
                         f"remote member {spec.name} at {spec.endpoint}: {exc}", model=spec.name)
            asyncio.get_running_loop().call_soon(model.wake.set)  # look again: the older version may still serve
            return
        batching = BatchingConfig(max_batch_size=manifest.max_batch_size)
        version = RemoteVersion(manifest, model.folder, RemotePeer(manifest, spec.endpoint, latency_s),  # type: ignore[arg-type]
                                RemoteCalls(self.clock), batching, link=model.link,  # type: ignore[arg-type]
                                endpoint=spec.endpoint, on_unavailable=model.unavailable)
        version.state = State.AVAILABLE
        old = [v for v in model.versions if v != served.version]
        model.versions[served.version] = version
        model.entry = ModelEntry(spec.name, model.folder, "variant", frozenset({served.version}))
        model.last_manifest = manifest
        model.problem = ""
        self._cleared(f"remote {spec.name}")
        log.info("remote member %s at %s: serving version %d", spec.name, spec.endpoint, served.version)
        for v in old:
            asyncio.ensure_future(self._retire_version(model, v))
        if self._started:  # in the same step: the ensembles recalibrate at once
            self._check_ensembles()  # (at startup the sync checks them once every member was looked at)

    def _remote_state(self, model: RemoteModel, cause: str) -> None:
        """The member serves ("") or not (why), and the ensembles log what that changes."""
        spec = model.spec
        assert spec is not None
        problem = not_ready(model, cause) if cause else ""
        current = model.current()
        if current is not None and current.state in (State.AVAILABLE, State.START):
            current.state = State.START if cause else State.AVAILABLE
        if problem == model.problem or (problem and _kind(problem) == _kind(model.problem)):
            return  # the same cause in other words (gRPC's details vary from one failed call to the next)
        model.problem = problem
        if cause:
            self._report(f"remote {spec.name}", 0, f"remote member {spec.name} at {spec.endpoint} is not ready: {cause}",
                         model=spec.name)
        else:
            self._cleared(f"remote {spec.name}")
            log.info("remote member %s at %s: ready again", spec.name, spec.endpoint)
        if self._started:
            self._check_ensembles()

    def _check_ensemble(self, ensemble) -> None:
        """An ensemble whose remote members clash with a model of the same name is not ready,
        naming the member, its endpoint and the clash; otherwise the contract decides."""
        conflict = self._remote_conflicts.get(ensemble.entry.name)
        if conflict is None:
            super()._check_ensemble(ensemble)
            return
        if ensemble.contract_error != conflict:
            log.error("ensemble %s FAILED to load: %s", ensemble.entry.name, conflict)
            self._count_failure(ensemble.entry.name, 1)
        ensemble.spec, ensemble.contract_error, ensemble.checked = None, conflict, ()


def _kind(problem: str) -> str:
    """A problem without its details (what is in parentheses): what is logged once per change."""
    return problem.split(" (", 1)[0]


def _same(named: tuple) -> tuple:
    """What makes two ensembles' remote members one: their settings, and the folder only when
    a file is named relative to it."""
    member, folder = named
    files = (member.token_file, member.ca_file, member.manifest)
    return member, folder if any(f and not Path(f).is_absolute() for f in files) else None


def not_ready_yet(member: RemoteMember) -> str:
    return f"at {member.endpoint}: not looked at yet"
