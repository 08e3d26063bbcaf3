"""The gRPC link to one member served elsewhere (service.repository.remote.RemoteLink): one
channel kept open, KServe v2 ModelInfer with raw tensors for each batch (all its rows, the
batch's deadline as the call's), and a watch call: quorum.v1 GetManifest on a Quorum endpoint,
or v2 ModelReady beside a local manifest (made by quorum export) for any other server."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
from pydantic import ValidationError

from service._proto.inference import grpc_service_pb2 as v2
from service._proto.inference import grpc_service_pb2_grpc as v2_grpc
from service._proto.quorum.v1 import ensemble_pb2 as qpb
from service._proto.quorum.v1 import ensemble_pb2_grpc as qpb_grpc
from service.codecs.dtypes import from_numpy
from service.codecs.v2 import decode_input
from service.errors import DeadlineExceeded, InvalidInput, ModelNotReady, Overloaded, QuorumError
from service.repository.config import RemoteMember
from service.repository.manifest import SCHEMA_VERSION, VariantManifest
from service.repository.remote import RemoteFailure, Served

MESSAGE_BYTES = 64 * 2**20
QUORUM_OUTPUT = "logits"  # what a Quorum endpoint answers a single model with, before calibration
OPTIONS = [("grpc.max_receive_message_length", MESSAGE_BYTES), ("grpc.max_send_message_length", MESSAGE_BYTES),
           ("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
           ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 5_000),
           ("grpc.lb_policy_name", "round_robin")]  # every address of a dns:/// name (a headless Service's pods)
BY_CODE = {grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
           grpc.StatusCode.INVALID_ARGUMENT: InvalidInput}


def _path(folder: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else folder / path


def _one_line(text: str) -> str:
    return " ".join(text.split())


class GrpcLink:
    def __init__(self, member: RemoteMember, folder: Path) -> None:
        self.member = member
        self.folder = folder
        self.endpoint = member.endpoint
        self._problem = ""  # a local file that cannot be read: every watch says so
        self._metadata: tuple[tuple[str, str], ...] = ()
        credentials = None
        try:
            if member.token_file:
                token = _path(folder, member.token_file).read_text().strip()
                if not token:
                    raise OSError(f"token_file {member.token_file} is empty")
                self._metadata = (("authorization", f"Bearer {token}"),)
            if member.tls:
                ca = _path(folder, member.ca_file).read_bytes() if member.ca_file else None
                credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        except OSError as exc:
            self._problem = f"cannot read its credentials ({exc})"
        self._channel = (grpc.aio.secure_channel(member.endpoint, credentials, OPTIONS) if credentials
                         else grpc.aio.insecure_channel(member.endpoint, OPTIONS))
        self._v2 = v2_grpc.GRPCInferenceServiceStub(self._channel)
        self._quorum = qpb_grpc.EnsembleServiceStub(self._channel)
        self._local: VariantManifest | None = None

    # -- the watch -------------------------------------------------------------------------
    async def watch(self, model: str, version: int | None, known: int | None) -> Served:
        if self._problem:
            raise RemoteFailure(self._problem)
        try:
            if self.member.manifest:
                return await self._watch_foreign(model, version, known)
            answer = await self._quorum.GetManifest(
                qpb.GetManifestRequest(model=model, version=version or 0, known_version=known or 0),
                timeout=self.member.timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise RemoteFailure(self._cause(exc, model)) from None
        manifest = None
        if answer.manifest_json:
            manifest = _manifest(answer.manifest_json, f"its manifest of '{model}'")
        return Served(int(answer.version), manifest, answer.max_batch_size or 64)

    async def _watch_foreign(self, model: str, version: int | None, known: int | None) -> Served:
        if self._local is None:
            path = _path(self.folder, self.member.manifest or "")
            try:
                text = path.read_text()
            except OSError as exc:
                raise RemoteFailure(f"its manifest {path} cannot be read ({exc})") from None
            self._local = _manifest(text, f"its manifest {path}")
        served = version or self._local.version
        ready = await self._v2.ModelReady(v2.ModelReadyRequest(name=model, version=str(version or "")),
                                          timeout=self.member.timeout_s, metadata=self._metadata)
        if not ready.ready:
            raise RemoteFailure(f"model '{model}' is not ready there")
        return Served(served, None if known == served else self._local, self._local.max_batch_size)

    def _cause(self, exc: grpc.aio.AioRpcError, model: str) -> str:
        code, details = exc.code(), _one_line(exc.details() or "")
        if code == grpc.StatusCode.UNAVAILABLE:
            return f"it does not answer (UNAVAILABLE: {details})"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"no answer within {self.member.timeout_s:g} s (timeout_s)"
        if code == grpc.StatusCode.NOT_FOUND:
            return f"it serves no model '{model}' (NOT_FOUND: {details})"
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return ("its manifest cannot be had: it serves no quorum.v1 GetManifest (not a Quorum server); "
                    "give the member a manifest made by quorum export (manifest: FILE)")
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return f"it refuses this server's credentials ({code.name}: {details}); see token_file and tls"
        return f"{code.name}: {details}"

    # -- the calls -------------------------------------------------------------------------
    async def infer(self, manifest: VariantManifest, rows: np.ndarray, timeout_s: float | None) -> np.ndarray:
        rows = np.ascontiguousarray(rows)
        request = v2.ModelInferRequest(model_name=manifest.name, model_version=str(manifest.version))
        request.inputs.add(name=manifest.input.name, datatype=from_numpy(rows.dtype).v2, shape=rows.shape)
        output = manifest.output.name if self.member.manifest else QUORUM_OUTPUT
        request.outputs.add(name=output)
        request.raw_input_contents.append(rows.tobytes())
        try:
            answer = await self._v2.ModelInfer(request, timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            what = f"member '{manifest.name}' at {self.endpoint}: {exc.code().name}: {_one_line(exc.details() or '')}"
            raise BY_CODE.get(exc.code(), ModelNotReady)(what) from None
        raw = answer.raw_output_contents  # a Quorum's and Triton's; MLServer may answer typed contents
        for i, tensor in enumerate(answer.outputs):
            if tensor.name == output:
                return decode_input(tensor, raw[i] if i < len(raw) else None)
        raise QuorumError(f"member '{manifest.name}' at {self.endpoint}: its answer has no output '{output}'")

    async def close(self) -> None:
        await self._channel.close(None)


def _manifest(text: str, what: str) -> VariantManifest:
    try:
        raw = json.loads(text)
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise RemoteFailure(f"{what} has schema version {raw.get('schema_version')!r}, "
                                f"this server reads {SCHEMA_VERSION}")
        return VariantManifest.model_validate(raw)
    except (ValueError, AttributeError, ValidationError) as exc:
        raise RemoteFailure(f"{what} is not a valid variant.json ({_one_line(str(exc))[:300]})") from None


def connect(member: RemoteMember, folder: Path) -> GrpcLink:
    """service.repository.remote.Connector: a member's link, its channel opened."""
    return GrpcLink(member, folder)
