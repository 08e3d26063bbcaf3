"""KServe v2 / Open Inference Protocol REST, with Triton's binary tensor data extension
(what `tritonclient.http` speaks). Inference goes through service.api.inference like the
gRPC servicer's; everything else is answered by the gRPC servicer's own method and
written as JSON, so both fronts give the same answers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from service._proto.inference import grpc_service_pb2 as pb
from service.api import inference
from service.api.common import fraction_parameters
from service.api.http import bodies
from service.api.http.app import API, DECODER, MAX_BODY, SERVICERS, deadline, json_response, read_body
from service.api.http.bodies import HEADER_LENGTH, parse_json
from service.api.v2 import InferenceServicer
from service.errors import InvalidInput

if TYPE_CHECKING:  # the descriptors protobuf hands out at run time (upb's); types-protobuf tells them apart
    from google._upb._message import FieldDescriptor as UpbFieldDescriptor

MODEL = "/v2/models/{name:[^/]+}"
VERSIONED = MODEL + "/versions/{version:[0-9]+}"


def to_json(message: Message) -> dict[str, Any]:
    """A proto message as Triton's REST JSON: field names as in the proto, integers as
    numbers (proto JSON would quote 64-bit ones), enums by name, every field present."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.has_presence and not message.HasField(field.name):
            continue
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {str(k): _scalar(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_scalar(field, v) for v in value]
        else:
            out[field.name] = _scalar(field, value)
    return out


def _scalar(field: FieldDescriptor | UpbFieldDescriptor, value: Any) -> Any:
    if field.message_type is not None:
        return to_json(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if field.type == FieldDescriptor.TYPE_BYTES:
        return value.decode("utf-8", "replace")
    return value


def _servicer(request: web.Request) -> InferenceServicer:
    return request.app[SERVICERS]["v2"]


def _version(request: web.Request) -> str:
    return request.match_info.get("version", "")


async def live(request: web.Request) -> web.Response:
    return json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    answer = await _servicer(request).ServerReady(pb.ServerReadyRequest(), None)
    return json_response({"ready": answer.ready}, 200 if answer.ready else 503)


async def server_metadata(request: web.Request) -> web.Response:
    return json_response(to_json(await _servicer(request).ServerMetadata(pb.ServerMetadataRequest(), None)))


async def model_metadata(request: web.Request) -> web.Response:
    name, version = request.match_info["name"], _version(request)
    answer = await _servicer(request).ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), None)
    return json_response(to_json(answer))


async def model_ready(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    answer = await _servicer(request).ModelReady(pb.ModelReadyRequest(name=name, version=_version(request)), None)
    return json_response({"name": name, "ready": answer.ready}, 200 if answer.ready else 503)


async def model_config(request: web.Request) -> web.Response:
    answer = await _servicer(request).ModelConfig(
        pb.ModelConfigRequest(name=request.match_info["name"], version=_version(request)), None)
    return json_response(to_json(answer.config))


async def model_statistics(request: web.Request) -> web.Response:
    answer = await _servicer(request).ModelStatistics(
        pb.ModelStatisticsRequest(name=request.match_info.get("name", ""), version=_version(request)), None)
    return json_response(to_json(answer))


async def repository_index(request: web.Request) -> web.Response:
    body = await read_body(request, request.app[MAX_BODY])
    options = parse_json(body) if body else {}
    ready_only = bool(options.get("ready", False)) if isinstance(options, dict) else False
    answer = await _servicer(request).RepositoryIndex(pb.RepositoryIndexRequest(ready=ready_only), None)
    return json_response([to_json(m) for m in answer.models])


async def model_load(request: web.Request) -> web.Response:
    await _servicer(request).RepositoryModelLoad(
        pb.RepositoryModelLoadRequest(model_name=request.match_info["name"]), None)
    return json_response({})


async def model_unload(request: web.Request) -> web.Response:
    await _servicer(request).RepositoryModelUnload(
        pb.RepositoryModelUnloadRequest(model_name=request.match_info["name"]), None)
    return json_response({})


async def log_settings(request: web.Request) -> web.Response:
    settings = pb.LogSettingsRequest()
    if request.method == "POST":
        body = parse_json(await read_body(request, request.app[MAX_BODY]))
        if not isinstance(body, dict):
            raise InvalidInput("log settings must be a JSON object")
        for key, value in body.items():
            if isinstance(value, bool):
                settings.settings[key].bool_param = value
            elif isinstance(value, int) and value >= 0:
                settings.settings[key].uint32_param = value
            elif isinstance(value, str):
                settings.settings[key].string_param = value
            else:
                raise InvalidInput(f"log setting {key!r} must be a boolean, a non-negative integer or a string")
    answer = await _servicer(request).LogSettings(settings, None)
    return json_response({k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in answer.settings.items()})


async def trace_setting(request: web.Request) -> web.Response:
    await _servicer(request).TraceSetting(pb.TraceSettingRequest(), None)
    return json_response({})  # not reached: TraceSetting refuses


async def infer(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    version = int(request.match_info.get("version", 0)) or None
    request.app[API].data.info(name, version)  # an unknown model or version is NOT_FOUND before its inputs are read
    body = await read_body(request, request.app[MAX_BODY])
    header, binary = _split(request, body)
    decoded = await request.app[DECODER].run(len(body), bodies.v2_infer, header, binary)
    parameters, request_id, inputs = decoded.parameters, decoded.request_id, decoded.inputs
    outputs, binary_out = decoded.outputs, decoded.binary_out
    coverage, max_risk = fraction_parameters(parameters)
    answer = await inference.infer(
        request.app[API], name, inputs, version=version,
        deadline=deadline(request, parameters.get("timeout")), outputs=list(outputs), request_id=request_id,
        coverage=coverage, max_risk=max_risk, priority=parameters.get("priority"))
    result = answer.result
    response: dict[str, Any] = {"model_name": name, "model_version": str(result.version)}
    if request_id:
        response["id"] = request_id
    headers = {}
    if result.left_out:
        response["parameters"] = {"members_left_out": ",".join(result.left_out)}
        headers["Quorum-Members-Left-Out"] = ",".join(result.left_out)
    wanted = [(output, array, outputs.get(output, binary_out)) for output, array in answer.tensors.items()]
    head, chunks = await request.app[DECODER].run(bodies.json_size(answer.tensors.values()), bodies.v2_answer,
                                                  response, wanted)
    if not chunks:
        return web.Response(body=head, content_type="application/json", headers=headers)
    headers[HEADER_LENGTH] = str(len(head))
    return web.Response(body=b"".join([head, *chunks]), content_type="application/octet-stream", headers=headers)


def _split(request: web.Request, body: bytes) -> tuple[memoryview | bytes, memoryview | None]:
    """The JSON header and the binary part after it (None without the extension)."""
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return body, None
    if not value.isdigit():
        raise InvalidInput(f"{HEADER_LENGTH} {value!r} is not a non-negative integer")
    length = int(value)
    if length > len(body):
        raise InvalidInput(f"{HEADER_LENGTH} is {length} but the body has only {len(body)} bytes")
    view = memoryview(body)
    return view[:length], view[length:]


def add_routes(app: web.Application) -> None:
    app[SERVICERS]["v2"] = InferenceServicer(app[API])
    r = app.router
    r.add_get("/v2", server_metadata, name="kserve_v2.ServerMetadata")
    r.add_get("/v2/health/live", live, name="kserve_v2.ServerLive")
    r.add_get("/v2/health/ready", ready, name="kserve_v2.ServerReady")
    r.add_get("/v2/models/stats", model_statistics, name="kserve_v2.ModelStatistics_all")
    r.add_post("/v2/repository/index", repository_index, name="kserve_v2.RepositoryIndex")
    r.add_post("/v2/repository/models/{name}/load", model_load, name="kserve_v2.RepositoryModelLoad")
    r.add_post("/v2/repository/models/{name}/unload", model_unload, name="kserve_v2.RepositoryModelUnload")
    r.add_route("*", "/v2/logging", log_settings, name="kserve_v2.LogSettings")
    r.add_route("*", "/v2/trace/setting", trace_setting, name="kserve_v2.TraceSetting")
    for base, suffix in ((MODEL, ""), (VERSIONED, "_version")):
        r.add_get(base, model_metadata, name=f"kserve_v2.ModelMetadata{suffix}")
        r.add_get(base + "/ready", model_ready, name=f"kserve_v2.ModelReady{suffix}")
        r.add_get(base + "/config", model_config, name=f"kserve_v2.ModelConfig{suffix}")
        r.add_get(base + "/stats", model_statistics, name=f"kserve_v2.ModelStatistics{suffix}")
        r.add_post(base + "/infer", infer, name=f"kserve_v2.ModelInfer{suffix}")
