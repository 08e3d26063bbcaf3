"""TF Serving's REST API: /v1/models/<name>[/versions/<v>|/labels/<l>][:predict|:classify|:regress],
model status and /metadata. Row (`instances`) and columnar (`inputs`) formats, as TF Serving
documents them; values take the model's input dtype. Status and metadata are the gRPC
servicers' answers in proto JSON, as TF Serving writes them."""

from __future__ import annotations

from typing import Any

import numpy as np
from aiohttp import web
from google.protobuf import json_format

from service.api import inference
from service.api.http import bodies
from service.api.priority import HEADER
from service.api.http.app import API, DECODER, MAX_BODY, SERVICERS, deadline, json_response, read_body
from service.api.tfserving import ModelServicer, PredictionServicer, check_signature, classifications, regress_refusal
from service.codecs import rest
from service.errors import InvalidInput

NAME = "/v1/models/{name:[^/:]+}"
BASES = {"": NAME, "_version": NAME + "/versions/{version:[0-9]+}", "_label": NAME + "/labels/{label:[^/:]+}"}


def _version(request: web.Request) -> int | None:
    info = request.match_info
    if "version" in info:
        return int(info["version"]) or None
    if "label" in info:
        return inference.labelled_version(request.app[API], info["name"], info["label"])
    return None


def _spec(request: web.Request, spec) -> None:
    spec.name = request.match_info["name"]
    version = _version(request)
    if version:
        spec.version.value = version


async def _body(request: web.Request) -> dict[str, Any]:
    data = await read_body(request, request.app[MAX_BODY])
    body = await request.app[DECODER].run(len(data), bodies.tf_object, data)
    check_signature(request.match_info["name"], body.get("signature_name", "") or "")
    return body


async def status(request: web.Request) -> web.Response:
    from tensorflow_serving.apis import get_model_status_pb2

    query = get_model_status_pb2.GetModelStatusRequest()
    _spec(request, query.model_spec)
    answer = await request.app[SERVICERS]["tf_models"].GetModelStatus(query, None)
    return json_response(json_format.MessageToDict(
        answer, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))


async def metadata(request: web.Request) -> web.Response:
    from tensorflow_serving.apis import get_model_metadata_pb2

    query = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    _spec(request, query.model_spec)
    answer = await request.app[SERVICERS]["tf_predict"].GetModelMetadata(query, None)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    answer.metadata["signature_def"].Unpack(signatures)
    return json_response({
        "model_spec": json_format.MessageToDict(answer.model_spec, preserving_proto_field_name=True),
        "metadata": {"signature_def": json_format.MessageToDict(signatures, preserving_proto_field_name=True)}})


async def predict(request: web.Request) -> web.Response:
    api, name = request.app[API], request.match_info["name"]
    version = _version(request)
    info = api.data.info(name, version)  # an unknown model or version is NOT_FOUND before its body is read
    data = await read_body(request, request.app[MAX_BODY])
    decoded = await request.app[DECODER].run(len(data), bodies.tf_predict, data, info.name, info.input.name,
                                             np.dtype(info.input.dtype).str)
    check_signature(name, decoded.signature_name)
    rows, row_format = decoded.rows, decoded.row_format
    answer = await inference.infer(api, name, {info.input.name: rows}, version=version,
                                   deadline=deadline(request), priority=request.headers.get(HEADER))
    body = await request.app[DECODER].run(bodies.json_size(answer.tensors.values()), bodies.tf_answer,
                                          answer.tensors, row_format)
    return web.Response(body=body, content_type="application/json", headers=_left_out(answer))


async def classify(request: web.Request) -> web.Response:
    api, name = request.app[API], request.match_info["name"]
    version = _version(request)
    info = api.data.info(name, version)
    body = await _body(request)
    examples, context = body.get("examples"), body.get("context") or {}
    if not isinstance(examples, list) or not examples or not all(isinstance(e, dict) for e in examples):
        raise InvalidInput("'examples' must be a non-empty list of objects, one per row")
    if not isinstance(context, dict):
        raise InvalidInput("'context' must be an object")
    feature = info.input.name
    values = []
    for i, example in enumerate(examples):
        merged = {**context, **example}
        if feature not in merged:
            raise InvalidInput(f"model '{name}': example {i} needs feature '{feature}'")
        values.append(merged[feature])
    rows = rest.tf_rows(f"model '{name}' feature '{feature}'", values, np.dtype(info.input.dtype))
    answer = await inference.infer(api, name, {feature: rows}, version=version, deadline=deadline(request),
                                   outputs=["probabilities"], priority=request.headers.get(HEADER))
    return json_response({"result": [[[label, score] for label, score in row] for row in classifications(answer)]},
                         headers=_left_out(answer))


async def regress(request: web.Request) -> web.Response:
    # an unknown model or version is NOT_FOUND first
    request.app[API].data.info(request.match_info["name"], _version(request))
    raise InvalidInput(regress_refusal(request.match_info["name"]))


def _left_out(answer: inference.Answer) -> dict[str, str]:
    left_out = answer.result.left_out
    return {"Quorum-Members-Left-Out": ",".join(left_out)} if left_out else {}


def add_routes(app: web.Application) -> None:
    app[SERVICERS].update(tf_predict=PredictionServicer(app[API]), tf_models=ModelServicer(app[API]))
    r = app.router
    for suffix, base in BASES.items():
        r.add_get(base, status, name=f"tfserving.GetModelStatus{suffix}")
        r.add_get(base + "/metadata", metadata, name=f"tfserving.GetModelMetadata{suffix}")
        r.add_post(base + ":predict", predict, name=f"tfserving.Predict{suffix}")
        r.add_post(base + ":classify", classify, name=f"tfserving.Classify{suffix}")
        r.add_post(base + ":regress", regress, name=f"tfserving.Regress{suffix}")
