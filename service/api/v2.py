"""KServe v2 / Open Inference Protocol: inference.GRPCInferenceService (what tritonclient speaks)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc

from service import __version__
from service._proto.inference import grpc_service_pb2 as pb
from service._proto.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.common import check_declared, deadline_of, model_rows
from service.api.context import ApiContext
from service.api.limits import short
from service.codecs import v2 as codec
from service.dataplane import output_names, result_tensors
from service.errors import InvalidInput, QuorumError
from service.repository.manager import State

log = logging.getLogger(__name__)

PLATFORM = {"ensemble": "quorum_ensemble", "onnx": "onnxruntime_onnx", "savedmodel": "tensorflow_savedmodel"}
OUTPUT_META = {
    "probabilities": ("FP32", (-1, None)), "label": ("BYTES", (-1,)), "class_index": ("INT64", (-1,)),
    "confidence": ("FP32", (-1,)), "agreement": ("FP32", (-1,)), "logits": ("FP32", (-1, None)),
}


def _version(text: str) -> int | None:
    """A request's model_version: "" for the newest, else a positive integer."""
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) == 0:
        raise InvalidInput(f"model_version {short(text)!r} is not a positive integer (or empty for the newest)")
    return int(text)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, api: ApiContext) -> None:
        self.api = api

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.api.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        ready = self.api.manager.is_ready(request.name)
        if ready and _version(request.version) and self.api.manager.ensemble(request.name) is not None:
            ready = int(request.version) == 1  # an ensemble has only version 1, as its metadata says
        elif ready and _version(request.version):
            ready = any(s.version == int(request.version) and s.state == State.AVAILABLE
                        for s in self.api.manager.statuses(request.name))
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="quorum", version=__version__,
            extensions=["model_repository", "statistics", "ensemble_voting"])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        info = self.api.data.info(request.name)
        platform = PLATFORM["ensemble"] if info.kind == "ensemble" else PLATFORM[
            self.api.manager.resolve(request.name).runtime.framework]
        classes = len(info.labels)
        outputs = []
        for name in output_names(info.kind):
            dtype, shape = OUTPUT_META[name]
            outputs.append(pb.ModelMetadataResponse.TensorMetadata(
                name=name, datatype=dtype, shape=[classes if d is None else d for d in shape]))
        return pb.ModelMetadataResponse(
            name=info.name, versions=[str(v) for v in info.versions], platform=platform,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(
                name=info.input.name, datatype=codec.from_numpy(info.input.dtype).v2,
                shape=list(info.input.shape))],
            outputs=outputs)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await self._infer(request, deadline_of(context))

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        start = time.perf_counter()
        name = request.model_name
        info = self.api.data.info(name)
        check_declared(info, codec.declared_inputs(request))  # before decoding anything
        rows = model_rows(info, codec.decode_inputs(request))
        try:
            result = await self.api.data.infer(name, rows, version=_version(request.model_version), deadline=deadline)
        except QuorumError:
            self.api.on_failure(name, time.perf_counter() - start)
            raise
        tensors = result_tensors(result, [o.name for o in request.outputs])
        response = pb.ModelInferResponse(model_name=name, model_version=str(result.version), id=request.id)
        codec.encode_outputs(response, tensors, raw=codec.wants_raw_outputs(request))
        if result.left_out:
            response.parameters["members_left_out"].string_param = ",".join(result.left_out)
        if request.id:
            self.api.feedback.record(request.id, result)
        self.api.on_inference(result, rows.shape[0], time.perf_counter() - start)
        return response

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # One response per request, in order; a bad request gets an error message on the
        # stream and the stream goes on, as Triton does.
        async for request in request_iterator:
            try:
                response = await self._infer(request, deadline_of(context))
                yield pb.ModelStreamInferResponse(infer_response=response)
            except QuorumError as exc:
                yield pb.ModelStreamInferResponse(
                    error_message=str(exc),
                    infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id))

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for entry in self.api.repository_index():
            if request.ready and entry[2] != "READY":
                continue
            name, version, state, reason = entry
            response.models.add(name=name, version=version, state=state, reason=reason)
        return response

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext) -> pb.RepositoryModelLoadResponse:
        await self.api.manager.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext) -> pb.RepositoryModelUnloadResponse:
        await self.api.manager.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        response = pb.ModelStatisticsResponse()
        wanted = _version(request.version)
        if request.name and not (request.name in self.api.manager.variants or self.api.manager.ensemble(request.name)):
            self.api.data.info(request.name)  # raises NOT_FOUND with the usual message
        for (name, version), stats in sorted(self.api.statistics.models.items()):
            if (request.name and name != request.name) or (wanted and version != wanted):
                continue
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
