"""The HTTP/REST port of the real server, spoken by clients written by others:
tritonclient.http (KServe v2 REST, JSON and binary tensors), `requests` for TF Serving's
REST API, compared with what the same server answers over gRPC (tritonclient.grpc and the
tensorflow-serving-api stubs); ModelConfig, MultiInference, Regress, reflection v1."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from grpc_reflection.v1alpha import reflection_pb2
from tensorflow_serving.apis import (classification_pb2, inference_pb2, predict_pb2,
                                     prediction_service_pb2_grpc, regression_pb2)
from tritonclient.utils import InferenceServerException

from tests.e2e.fixtures import ENSEMBLE, MEMBER, as_text, module_server
from tests.helpers import ONNX_VARIANTS, ROOT, onnx_models

MAX_BODY = 1 << 20  # the module's server refuses bodies beyond 1 MiB (QUORUM_MAX_MESSAGE_BYTES)


@pytest.fixture(scope="module")
def server(tmp_path_factory, grpc_engine):
    with module_server(tmp_path_factory, "http", env={"QUORUM_MAX_MESSAGE_BYTES": str(MAX_BODY)}) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}", concurrency=4)
    yield c
    c.close()


@pytest.fixture(scope="module")
def pixels(test_split):
    return test_split[0][:8].astype(np.float32)


def _grpc_outputs(client, model: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    result = client.infer(model, [tensor])
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response(as_json=True)["outputs"]}


def _same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        if value.dtype == object:
            assert as_text(got[name]) == as_text(value), name
        else:
            np.testing.assert_allclose(np.asarray(got[name], dtype=value.dtype), value, rtol=1e-6, atol=1e-7,
                                       err_msg=name)


# -- KServe v2 REST with tritonclient.http ----------------------------------------------------
@pytest.mark.parametrize("model", [ENSEMBLE, MEMBER])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_http_answers_as_grpc_does(http, client, model, binary, pixels):
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    names = [o["name"] for o in client.get_model_metadata(model, as_json=True)["outputs"]]
    result = http.infer(model, [tensor], outputs=[httpclient.InferRequestedOutput(n, binary_data=binary)
                                                  for n in names])
    response = result.get_response()
    assert response["model_name"] == model and response["model_version"] == "1"
    if binary:
        assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    else:
        assert all("data" in o for o in response["outputs"])
    _same({n: result.as_numpy(n) for n in names}, _grpc_outputs(client, model, pixels))


def test_tritonclient_http_default_outputs_are_binary_and_complete(http, client, pixels):
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    result = http.infer(ENSEMBLE, [tensor], request_id="row-block-1")
    assert result.get_response()["id"] == "row-block-1"
    expected = _grpc_outputs(client, ENSEMBLE, pixels)
    _same({n: result.as_numpy(n) for n in expected}, expected)


def test_tritonclient_http_metadata_and_health(http, client):
    assert http.is_server_live() and http.is_server_ready()
    assert http.is_model_ready(ENSEMBLE) and http.is_model_ready(MEMBER, "1")
    assert not http.is_model_ready("no_such_model")
    assert http.get_server_metadata()["name"] == client.get_server_metadata(as_json=True)["name"] == "quorum"
    for model in (ENSEMBLE, MEMBER):
        ours = http.get_model_metadata(model)
        theirs = client.get_model_metadata(model, as_json=True)  # proto JSON: int64 as strings
        for kind in ("inputs", "outputs"):
            assert [(t["name"], t["datatype"], t["shape"]) for t in ours[kind]] == [
                (t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in theirs[kind]]
        assert ours["platform"] == theirs["platform"] and ours["versions"] == theirs["versions"]
    with pytest.raises(InferenceServerException, match="no_such_model"):
        http.get_model_metadata("no_such_model")
    with pytest.raises(InferenceServerException, match="no version 9"):
        http.get_model_metadata(MEMBER, "9")


def test_tritonclient_http_statistics_and_repository(http, pixels):
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    http.infer(ENSEMBLE, [tensor])  # its own inference: in random order it may run first
    stats = http.get_inference_statistics(ENSEMBLE)["model_stats"]
    assert stats and stats[0]["name"] == ENSEMBLE and stats[0]["inference_count"] > 0
    index = {m["name"]: m["state"] for m in http.get_model_repository_index()}
    assert index[ENSEMBLE] == "READY" and index[MEMBER] == "READY"


# -- ModelConfig (gRPC and HTTP), LogSettings, TraceSetting ---------------------------------------
def test_get_model_config_shows_an_ensemble_and_its_members(client, http):
    members = yaml.safe_load((onnx_models() / ENSEMBLE / "ensemble.yaml").read_text())["members"]
    config = client.get_model_config(ENSEMBLE).config
    assert config.name == ENSEMBLE and config.platform == "ensemble" and config.max_batch_size > 0
    assert [(i.name, list(i.dims)) for i in config.input] == [("pixels", [64])]
    assert {o.name for o in config.output} == {"probabilities", "label", "class_index", "confidence", "agreement"}
    assert [s.model_name for s in config.ensemble_scheduling.step] == members
    assert all(dict(s.input_map) == {"pixels": "pixels"} for s in config.ensemble_scheduling.step)
    assert config.WhichOneof("scheduling_choice") == "ensemble_scheduling"
    assert http.get_model_config(ENSEMBLE)["ensemble_scheduling"]["step"][0]["model_name"] == members[0]


@pytest.mark.parametrize("model", ONNX_VARIANTS)
def test_get_model_config_of_a_single_model(client, http, model):
    manifest = json.loads((onnx_models() / model / "1" / "variant.json").read_text())
    config = client.get_model_config(model).config
    assert config.platform == {"onnx": "onnxruntime_onnx", "savedmodel": "tensorflow_savedmodel"}[manifest["framework"]]
    assert config.max_batch_size > 0 and config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert [i.name for i in config.input] == [manifest["inputs"][0]["name"]]
    assert list(config.input[0].dims) == list(manifest["inputs"][0]["shape"][1:])
    assert config.input[0].data_type == grpcclient.model_config_pb2.TYPE_FP32
    assert config.instance_group[0].kind == grpcclient.model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert list(config.version_policy.specific.versions) == [1]
    over_http = http.get_model_config(model)
    assert (over_http["name"], over_http["max_batch_size"]) == (model, config.max_batch_size)
    with pytest.raises(InferenceServerException, match="NOT_FOUND|not found|no version"):
        client.get_model_config(model, model_version="7")


def test_log_settings_answer_and_change_trace_settings_refused(server, client, http):
    settings = client.get_log_settings(as_json=True)["settings"]
    assert settings["log_info"]["bool_param"] is True and settings["log_file"]["string_param"] == ""
    assert http.update_log_settings({"log_verbose_level": 1})["log_verbose_level"] == 1
    assert client.update_log_settings({"log_verbose_level": 0}, as_json=True)["settings"][
        "log_verbose_level"]["uint32_param"] == 0
    with pytest.raises(InferenceServerException, match="unknown log setting 'log_colour'"):
        client.update_log_settings({"log_colour": True})
    with pytest.raises(InferenceServerException) as refused:
        client.get_trace_settings()
    assert refused.value.status() == "StatusCode.UNIMPLEMENTED" and "Prometheus" in refused.value.message()
    over_http = requests.get(f"{server.http_url}/v2/trace/setting", timeout=10)
    assert over_http.status_code == 501 and "does not trace" in over_http.json()["error"]


# -- TF Serving REST with requests ---------------------------------------------------------------
def _tf_predict(channel, model: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels))
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    return {name: tf.make_ndarray(t) for name, t in response.outputs.items()}


@pytest.mark.parametrize("model", [ENSEMBLE, MEMBER])
def test_tf_rest_predict_row_and_columnar_answer_as_grpc_does(server, channel, model, pixels):
    expected = _tf_predict(channel, model, pixels)
    rows = pixels.tolist()
    row = requests.post(f"{server.http_url}/v1/models/{model}:predict", json={"instances": rows}, timeout=30)
    assert row.status_code == 200, row.text
    predictions = row.json()["predictions"]
    assert len(predictions) == len(rows)
    _same({n: np.asarray([p[n] for p in predictions], dtype=object if expected[n].dtype == object else None)
           for n in expected}, expected)
    named = requests.post(f"{server.http_url}/v1/models/{model}/versions/1:predict",
                          json={"signature_name": "serving_default", "instances": [{"pixels": r} for r in rows]},
                          timeout=30)
    assert named.json()["predictions"] == predictions
    columnar = requests.post(f"{server.http_url}/v1/models/{model}:predict", json={"inputs": {"pixels": rows}},
                             timeout=30)
    assert columnar.status_code == 200, columnar.text
    outputs = columnar.json()["outputs"]
    _same({n: np.asarray(v, dtype=object if expected[n].dtype == object else None) for n, v in outputs.items()},
          expected)


def test_tf_rest_classify_answers_as_grpc_classify(server, channel, pixels):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = ENSEMBLE
    for row in pixels:
        request.input.example_list.examples.add().features.feature["pixels"].float_list.value.extend(row.tolist())
    expected = prediction_service_pb2_grpc.PredictionServiceStub(channel).Classify(request, timeout=30)
    got = requests.post(f"{server.http_url}/v1/models/{ENSEMBLE}:classify",
                        json={"examples": [{"pixels": r} for r in pixels.tolist()]}, timeout=30)
    assert got.status_code == 200, got.text
    result = got.json()["result"]
    assert len(result) == len(expected.result.classifications)
    for ours, theirs in zip(result, expected.result.classifications):
        assert [label for label, _ in ours] == [c.label for c in theirs.classes]
        np.testing.assert_allclose([score for _, score in ours], [c.score for c in theirs.classes], rtol=1e-6)


def test_tf_rest_status_and_metadata(server):
    status = requests.get(f"{server.http_url}/v1/models/{MEMBER}", timeout=10).json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    assert status["model_version_status"][0]["status"]["error_code"] == "OK"
    metadata = requests.get(f"{server.http_url}/v1/models/{MEMBER}/versions/1/metadata", timeout=10).json()
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["pixels"]["dtype"] == "DT_FLOAT"
    assert metadata["model_spec"] == {"name": MEMBER, "version": "1"}
    missing = requests.get(f"{server.http_url}/v1/models/{MEMBER}/versions/9", timeout=10)
    assert missing.status_code == 404 and "version 9" in missing.json()["error"]


def test_regress_is_refused_with_the_reason_on_both_fronts(server, channel, pixels):
    over_http = requests.post(f"{server.http_url}/v1/models/{ENSEMBLE}:regress",
                              json={"examples": [{"pixels": pixels[0].tolist()}]}, timeout=10)
    assert over_http.status_code == 400 and "classifiers" in over_http.json()["error"]
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = ENSEMBLE
    with pytest.raises(grpc.RpcError) as refused:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Regress(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "classifiers" in refused.value.details()


def test_multi_inference_classifies_for_each_task(channel, pixels):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = inference_pb2.MultiInferenceRequest()
    for row in pixels[:3]:
        request.input.example_list.examples.add().features.feature["pixels"].float_list.value.extend(row.tolist())
    for model in (ENSEMBLE, MEMBER):
        task = request.tasks.add(method_name="tensorflow/serving/classify")
        task.model_spec.name = model
    response = stub.MultiInference(request, timeout=30)
    assert [r.model_spec.name for r in response.results] == [ENSEMBLE, MEMBER]
    for result, model in zip(response.results, (ENSEMBLE, MEMBER)):
        single = classification_pb2.ClassificationRequest(input=request.input)
        single.model_spec.name = model
        expected = stub.Classify(single, timeout=30).result
        assert result.classification_result == expected
    request.tasks.add(method_name="tensorflow/serving/regress").model_spec.name = ENSEMBLE
    with pytest.raises(grpc.RpcError) as refused:
        stub.MultiInference(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Regress does not apply" in refused.value.details()


# -- errors, limits, deadlines, metrics -----------------------------------------------------------
def _raw_http(port: int, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Send a hand-made request (its headers may lie) and read the status and JSON answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head_part, _, payload = data.partition(b"\r\n\r\n")
    return int(head_part.split()[1]), json.loads(payload[:_length(data)] or b"{}")


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return int(value)
    return 0


def _v2(pixels: np.ndarray, datatype: str = "FP32", shape=None) -> dict:
    return {"inputs": [{"name": "pixels", "datatype": datatype, "shape": list(shape or pixels.shape),
                        "data": pixels.ravel().tolist()}]}


def test_bad_input_gets_its_status_and_a_json_error_while_others_are_served(server, pixels):
    url, infer = server.http_url, f"{server.http_url}/v2/models/{ENSEMBLE}/infer"
    good = _v2(pixels[:2])
    expected = requests.post(infer, json=good, timeout=30).json()["outputs"]
    stop, statuses, answers = threading.Event(), [], []

    def well_formed() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                response = session.post(infer, json=good, timeout=60)
                statuses.append(response.status_code)
                answers.append(response.json().get("outputs"))

    workers = [threading.Thread(target=well_formed) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        header = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 64],
                                         "parameters": {"binary_data_size": 512}}]}).encode()
        raw = pixels[:2].tobytes()
        cases = [
            ("malformed JSON", requests.post(infer, data=b'{"inputs": [', timeout=30), 400, "not valid JSON"),
            ("JSON not an object", requests.post(infer, json=[1, 2], timeout=30), 400, "JSON object"),
            ("wrong shape", requests.post(infer, json=_v2(pixels[:2], shape=[2, 32, 2]), timeout=30), 400, "shape"),
            ("shape and data disagree", requests.post(infer, json=_v2(pixels[:2], shape=[4, 64]), timeout=30),
             400, "needs 256"),
            ("wrong dtype", requests.post(infer, json=_v2(pixels[:2].astype(np.int32), "INT32"), timeout=30),
             400, "must be float32"),
            ("strings for numbers", requests.post(infer, json={"inputs": [{"name": "pixels", "datatype": "FP32",
                                                                            "shape": [1, 2], "data": ["a", "b"]}]},
                                                  timeout=30), 400, "strings"),
            ("unknown datatype", requests.post(infer, json=_v2(pixels[:2], "FP99"), timeout=30), 400, "FP99"),
            ("header length beyond the body", requests.post(
                infer, data=header + raw, headers={"Inference-Header-Content-Length": str(len(header) + 10**6)},
                timeout=30), 400, "Inference-Header-Content-Length"),
            ("header length cutting the JSON", requests.post(
                infer, data=header + raw, headers={"Inference-Header-Content-Length": str(len(header) - 5)},
                timeout=30), 400, "not valid JSON"),
            ("binary size beyond the body", requests.post(
                infer, data=header + raw[:256], headers={"Inference-Header-Content-Length": str(len(header))},
                timeout=30), 400, "runs past the end"),
            ("bytes left over", requests.post(
                infer, data=header + raw + b"xx", headers={"Inference-Header-Content-Length": str(len(header))},
                timeout=30), 400, "bytes after"),
            ("unknown model", requests.post(f"{url}/v2/models/nope/infer", json=good, timeout=30), 404, "nope"),
            ("unknown version", requests.post(f"{url}/v2/models/{MEMBER}/versions/9/infer", json=good, timeout=30),
             404, "9"),
            ("TF: both formats", requests.post(f"{url}/v1/models/{ENSEMBLE}:predict",
                                               json={"instances": [[0] * 64], "inputs": [[0] * 64]}, timeout=30),
             400, "exactly one"),
            ("TF: ragged rows", requests.post(f"{url}/v1/models/{ENSEMBLE}:predict",
                                              json={"instances": [[0] * 64, [0] * 63]}, timeout=30), 400,
             "rectangular"),
            ("TF: booleans", requests.post(f"{url}/v1/models/{ENSEMBLE}:predict",
                                           json={"instances": [[True] * 64]}, timeout=30), 400, "booleans"),
            ("TF: unknown signature", requests.post(f"{url}/v1/models/{ENSEMBLE}:predict",
                                                    json={"signature_name": "x", "instances": [[0] * 64]},
                                                    timeout=30), 400, "signature"),
            ("bad timeout header", requests.post(infer, json=good, headers={"grpc-timeout": "soon"}, timeout=30),
             400, "grpc-timeout"),
            ("oversized body", requests.post(infer, data=b" " * (MAX_BODY + 1), timeout=30), 413, "limit"),
            ("no such route", requests.get(f"{url}/v3/anything", timeout=30), 404, "Not Found"),
        ]
        declared, answer = _raw_http(server.http_port, "\r\n".join([
            f"POST /v2/models/{ENSEMBLE}/infer HTTP/1.1", "Host: x", "Content-Type: application/json",
            f"Content-Length: {10 ** 12}", ""]))  # a body it never sends: refused before reading
        for what, response, status, text in cases:
            assert response.status_code == status, (what, response.text)
            assert text in response.json()["error"], (what, response.text)
        assert declared == 413 and "limit" in answer["error"]
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert statuses and set(statuses) == {200}
    for answer in answers:  # batched with each other: equal up to float rounding (tolerant batching)
        assert [o["name"] for o in answer] == [o["name"] for o in expected]
        for got, want in zip(answer, expected):
            if want["datatype"] == "BYTES":
                assert got["data"] == want["data"]
            else:
                np.testing.assert_allclose(got["data"], want["data"], rtol=1e-5, atol=1e-6)


def test_deadlines_over_http(server, pixels):
    infer = f"{server.http_url}/v2/models/{ENSEMBLE}/infer"
    late = requests.post(infer, json=_v2(pixels[:1]), headers={"grpc-timeout": "1n"}, timeout=30)
    assert late.status_code == 504 and late.json()["code"] == "DEADLINE_EXCEEDED"
    body = _v2(pixels[:1])
    body["parameters"] = {"timeout": 1}  # Triton's request parameter, microseconds
    assert requests.post(infer, json=body, timeout=30).status_code == 504
    ample = requests.post(infer, json=_v2(pixels[:1]), headers={"grpc-timeout": "60S"}, timeout=30)
    assert ample.status_code == 200
    tf_late = requests.post(f"{server.http_url}/v1/models/{ENSEMBLE}:predict", json={"instances": pixels[:1].tolist()},
                            headers={"grpc-timeout": "1n"}, timeout=30)
    assert tf_late.status_code == 504 and "deadline" in tf_late.json()["error"]


def test_http_requests_are_counted_by_api_and_code(server, pixels):
    requests.post(f"{server.http_url}/v2/models/{ENSEMBLE}/infer", json=_v2(pixels[:1]), timeout=30)
    requests.post(f"{server.http_url}/v1/models/{ENSEMBLE}:predict", json={"instances": [[0] * 3]}, timeout=30)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()

    def count(**labels) -> float:
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("quorum_requests_total{") and all(w in line for w in wanted))

    assert count(api="kserve_v2_rest", method="ModelInfer", model=ENSEMBLE, code="OK") >= 1
    assert count(api="tfserving_rest", method="Predict", model=ENSEMBLE, code="INVALID_ARGUMENT") >= 1


# -- reflection v1 --------------------------------------------------------------------------------
def test_reflection_v1_lists_and_describes_services(server):
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        answers = list(call(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")]),
            timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection",
            "inference.GRPCInferenceService", "tensorflow.serving.PredictionService"} <= names
    assert answers[1].file_descriptor_response.file_descriptor_proto


def test_grpcurl_lists_and_describes_the_v1_reflection_service(server):
    import subprocess

    grpcurl = str(ROOT / ".venv" / "bin" / "grpcurl")
    listed = subprocess.run([grpcurl, "-plaintext", server.address, "list"], capture_output=True, text=True,
                            timeout=60, check=True).stdout.split()
    assert "grpc.reflection.v1.ServerReflection" in listed
    described = subprocess.run([grpcurl, "-plaintext", server.address, "describe",
                                "grpc.reflection.v1.ServerReflection"], capture_output=True, text=True, timeout=60)
    assert described.returncode == 0, described.stderr
    assert "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest )" in described.stdout
    config = subprocess.run([grpcurl, "-plaintext", "-d", json.dumps({"name": MEMBER}), server.address,
                             "inference.GRPCInferenceService/ModelConfig"], capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stderr
    assert json.loads(config.stdout)["config"]["platform"] == "onnxruntime_onnx"
