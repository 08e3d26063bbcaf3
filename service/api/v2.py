"""KServe v2 / Open Inference Protocol: inference.GRPCInferenceService (what tritonclient speaks)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from service import __version__
from service._proto.inference import grpc_service_pb2 as pb
from service._proto.inference import grpc_service_pb2_grpc as pb_grpc
from service._proto.inference import model_config_pb2 as mc
from service.api import inference
from service.api.common import UNCERTAINTY_PARAMETERS, check_declared, deadline_of, fraction_parameters
from service.api.context import ApiContext
from service.api.limits import short
from service.codecs import v2 as codec
from service.codecs.v2_response import encode_raw_response
from service.outputs import outputs_of
from service.errors import InvalidInput, ModelNotReady, QuorumError, Unimplemented
from service.monitoring.statistics import ModelStats
from service.repository.served import State

log = logging.getLogger(__name__)

PLATFORM = {"ensemble": "quorum_ensemble", "onnx": "onnxruntime_onnx", "savedmodel": "tensorflow_savedmodel"}


TRACING_REFUSAL = ("TraceSetting is not served: Quorum does not trace requests; it reports per-stage "
                   "latency as Prometheus histograms on the metrics port and per-model counters "
                   "through ModelStatistics")
LOG_KEYS = ("log_file", "log_info", "log_warning", "log_error", "log_verbose_level", "log_format")
DATA_TYPE = {"BYTES": mc.TYPE_STRING}


def _data_type(dtype) -> int:
    v2 = codec.from_numpy(dtype).v2
    return DATA_TYPE.get(v2) or mc.DataType.Value(f"TYPE_{v2}")


def model_config(api: ApiContext, name: str, version: int | None) -> mc.ModelConfig:
    """Triton's view of a model: batch size, tensors without the batch dimension, the
    batcher, where its instances run, and for an ensemble its members as steps."""
    info = api.data.info(name, version)  # NOT_FOUND for an unknown model or version
    ensemble = info.kind == "ensemble"
    served = None if ensemble else api.manager.resolve(name, version)
    config = mc.ModelConfig(
        name=name, platform="ensemble" if served is None else PLATFORM[served.runtime.framework],
        max_batch_size=info.max_batch_size)
    config.input.add(name=info.input.name, data_type=_data_type(info.input.dtype), dims=list(info.input.shape[1:]))
    classes = len(info.labels)
    for output in outputs_of(info.kind, info.default_coverage is not None):
        config.output.add(name=output.name, data_type=_data_type(output.dtype), dims=output.shape(classes)[1:])
    config.parameters["labels"].string_value = ",".join(info.labels)
    config.parameters["voting_policy"].string_value = info.policy
    if served is None:  # the ensemble
        for member in info.members:
            step = config.ensemble_scheduling.step.add(model_name=member, model_version=-1)
            step.input_map[info.input.name] = info.input.name
            try:
                outputs = api.manager.resolve(member).manifest.outputs
            except QuorumError:  # a member not serving now is still a step of the ensemble
                continue
            for tensor in outputs:
                step.output_map[tensor.name] = f"{member}.{tensor.name}"
        return config
    config.version_policy.specific.versions.extend(info.versions)
    batching = served.batching
    config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
    config.dynamic_batching.preserve_ordering = True
    group = config.instance_group.add(name=f"{name}_0", count=1)  # one batch at a time
    if served.device.startswith("gpu"):
        group.kind = mc.ModelInstanceGroup.KIND_GPU
        group.gpus.append(int(served.device.partition(":")[2] or 0))
    else:
        group.kind = mc.ModelInstanceGroup.KIND_CPU
    config.default_model_filename = served.manifest.artifact
    return config


def log_settings(changes: dict[str, object]) -> dict[str, object]:
    """Apply Triton-style log settings to the root logger; the settings now in force."""
    unknown = sorted(set(changes) - set(LOG_KEYS))
    if unknown:
        raise InvalidInput(f"unknown log setting {unknown[0]!r}; settings are {', '.join(LOG_KEYS)}")
    root = logging.getLogger()
    if changes.get("log_file"):
        raise InvalidInput("log_file cannot be set: Quorum logs to stderr (collected by the container runtime)")
    if changes.get("log_format") not in (None, "", "default"):
        raise InvalidInput("log_format must be 'default'")
    level = root.getEffectiveLevel()
    wanted = [("log_verbose_level", logging.DEBUG), ("log_info", logging.INFO),
              ("log_warning", logging.WARNING), ("log_error", logging.ERROR)]
    for key, threshold in wanted:
        if key in changes and changes[key] is not None:
            on = bool(changes[key])
            if on and level > threshold:
                level = threshold
            elif not on and level <= threshold:
                level = threshold + 10
    root.setLevel(level)
    return {"log_file": "", "log_info": level <= logging.INFO, "log_warning": level <= logging.WARNING,
            "log_error": level <= logging.ERROR, "log_verbose_level": int(level <= logging.DEBUG),
            "log_format": "default"}


def _version(text: str) -> int | None:
    """A request's model_version: "" for the newest, else a positive integer."""
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) == 0:
        raise InvalidInput(f"model_version {short(text)!r} is not a positive integer (or empty for the newest)")
    return int(text)


READ_PARAMETERS = (*UNCERTAINTY_PARAMETERS, "priority")


def _plain(parameters, keys: tuple[str, ...] = READ_PARAMETERS) -> dict[str, object]:
    """The request parameters Quorum reads, as plain values (whichever field each one set)."""
    return {key: getattr(parameters[key], parameters[key].WhichOneof("parameter_choice") or "string_param")
            for key in keys if key in parameters}


def _parameters(answer: inference.Answer) -> dict[str, str]:
    left_out = answer.result.left_out
    return {"members_left_out": ",".join(left_out)} if left_out else {}


def _response(request: pb.ModelInferRequest, answer: inference.Answer, *, raw: bool) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=str(answer.result.version),
                                     id=request.id)
    codec.encode_outputs(response, answer.tensors, raw=raw)
    for key, value in _parameters(answer).items():
        response.parameters[key].string_param = value
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The v2 gRPC service. Its methods other than inference never read `context`: the HTTP
    front (service.api.http.v2) calls them with None."""

    def __init__(self, api: ApiContext) -> None:
        self.api = api

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext | None) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.api.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext | None) -> pb.ModelReadyResponse:
        self.api.manager.check_known(request.name, _version(request.version))  # NOT_FOUND, not "not ready"
        ready = self.api.manager.is_ready(request.name)
        if ready and _version(request.version) and self.api.manager.ensemble(request.name) is not None:
            ready = int(request.version) == 1  # an ensemble has only version 1, as its metadata says
        elif ready and _version(request.version):
            ready = any(s.version == int(request.version) and s.state == State.AVAILABLE
                        for s in self.api.manager.statuses(request.name))
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext | None) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="quorum", version=__version__,
            extensions=["model_repository", "statistics", "ensemble_voting"])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext | None) -> pb.ModelMetadataResponse:
        version = _version(request.version)
        info = self.api.data.info(request.name, version)  # NOT_FOUND for an unknown model or version
        if version and version not in info.versions:  # known: loading, or failed to load
            raise ModelNotReady(f"model '{request.name}' version {version} is not loaded")
        platform = PLATFORM["ensemble"] if info.kind == "ensemble" else PLATFORM[
            self.api.manager.resolve(request.name).runtime.framework]
        classes = len(info.labels)
        outputs = []
        for output in outputs_of(info.kind, info.default_coverage is not None):
            outputs.append(pb.ModelMetadataResponse.TensorMetadata(
                name=output.name, datatype=codec.from_numpy(output.dtype).v2, shape=output.shape(classes)))
        return pb.ModelMetadataResponse(
            name=info.name, versions=[str(v) for v in info.versions], platform=platform,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(
                name=info.input.name, datatype=codec.from_numpy(info.input.dtype).v2,
                shape=list(info.input.shape))],
            outputs=outputs)

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse | bytes:
        answer = await self._answer(request, deadline_of(context))
        if codec.wants_raw_outputs(request):  # the common case, written as bytes (the wrapper passes them on)
            return encode_raw_response(request.model_name, str(answer.result.version), request.id,
                                       answer.tensors, _parameters(answer))
        return _response(request, answer, raw=False)

    async def _answer(self, request: pb.ModelInferRequest, deadline: float | None) -> inference.Answer:
        version = _version(request.model_version)
        info = self.api.data.info(request.model_name, version)  # NOT_FOUND before the inputs are decoded
        check_declared(info, codec.declared_inputs(request))  # before decoding anything
        parameters = _plain(request.parameters) if request.parameters else {}  # read once: a protobuf map
        coverage, max_risk = fraction_parameters(parameters) if parameters else (None, None)
        return await inference.infer(
            self.api, request.model_name, codec.decode_inputs(request), version=version,
            deadline=deadline, outputs=[o.name for o in request.outputs], request_id=request.id, info=info,
            declared_checked=True, coverage=coverage, max_risk=max_risk, priority=parameters.get("priority"))

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # One response per request, in order; a bad request gets an error message on the
        # stream and the stream goes on, as Triton does.
        async for request in request_iterator:
            try:
                answer = await self._answer(request, deadline_of(context))
                yield pb.ModelStreamInferResponse(
                    infer_response=_response(request, answer, raw=codec.wants_raw_outputs(request)))
            except QuorumError as exc:
                yield pb.ModelStreamInferResponse(
                    error_message=str(exc),
                    infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id))

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext | None) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for entry in self.api.repository_index():
            if request.ready and entry[2] != "READY":
                continue
            name, version, state, reason = entry
            response.models.add(name=name, version=version, state=state, reason=reason)
        return response

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext | None) -> pb.RepositoryModelLoadResponse:
        await self.api.manager.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext | None) -> pb.RepositoryModelUnloadResponse:
        await self.api.manager.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext | None) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=model_config(self.api, request.name, _version(request.version)))

    async def TraceSetting(self, request: pb.TraceSettingRequest, context: grpc.aio.ServicerContext | None) -> pb.TraceSettingResponse:
        raise Unimplemented(TRACING_REFUSAL)

    async def LogSettings(self, request: pb.LogSettingsRequest, context: grpc.aio.ServicerContext | None) -> pb.LogSettingsResponse:
        changes = {}
        for key, value in request.settings.items():
            kind = value.WhichOneof("parameter_choice")
            changes[key] = None if kind is None else getattr(value, kind)
        response = pb.LogSettingsResponse()
        for key, setting in log_settings(changes).items():
            field = {bool: "bool_param", int: "uint32_param", str: "string_param"}[type(setting)]
            setattr(response.settings[key], field, setting)
        return response

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext | None) -> pb.ModelStatisticsResponse:
        response = pb.ModelStatisticsResponse()
        wanted = _version(request.version)
        if request.name and not (request.name in self.api.manager.variants or self.api.manager.ensemble(request.name)):
            self.api.data.info(request.name)  # raises NOT_FOUND with the usual message
        if request.name and wanted:
            self.api.manager.check_known(request.name, wanted)
        recorded = self.api.statistics.models
        # Every serving model version and every ready ensemble is listed, at zero before its
        # first request, as Triton lists them; and whatever has counts (retired versions too).
        keys = set(recorded)
        for name, model in self.api.manager.variants.items():
            keys.update((name, version) for version, served in model.versions.items() if served.state == State.AVAILABLE)
        keys.update((name, 1) for name in self.api.manager.ensembles if self.api.manager.is_ready(name))
        for name, version in sorted(keys):
            if (request.name and name != request.name) or (wanted and version != wanted):
                continue
            stats = recorded.get((name, version)) or ModelStats()
            entry = response.model_stats.add(
                name=name, version=str(version), last_inference=stats.last_inference_ms,
                inference_count=stats.inference_count, execution_count=stats.execution_count)
            s = entry.inference_stats
            s.success.count, s.success.ns = stats.success.count, stats.success.ns
            s.fail.count, s.fail.ns = stats.fail.count, stats.fail.ns
            s.queue.count, s.queue.ns = stats.queue.count, stats.queue.ns
            s.compute_infer.count, s.compute_infer.ns = stats.compute.count, stats.compute.ns
            for size, duration in sorted(stats.batches.items()):
                b = entry.batch_stats.add(batch_size=size)
                b.compute_infer.count, b.compute_infer.ns = duration.count, duration.ns
        return response
