"""TF Serving's API, spoken by the tensorflow-serving-api stubs, against a real server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2, get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
    predict_pb2, prediction_service_pb2_grpc)

from tests.e2e.fixtures import ENSEMBLE, MEMBER, Reference, as_text, vote_temperatures

ROWS = slice(0, 12)


@pytest.fixture(scope="module")
def predict_stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def reference(server):
    return Reference(vote_temperatures=vote_temperatures(server))


@pytest.fixture(scope="module")
def pixels(test_split):
    return test_split[0][ROWS]


def _predict(stub, model, pixels, version=None, output_filter=()):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "serving_default"
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels))
    request.output_filter.extend(output_filter)
    response = stub.Predict(request, timeout=30)
    return response, {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def test_predict_ensemble_matches_reference(predict_stub, reference, pixels, test_split):
    response, out = _predict(predict_stub, ENSEMBLE, pixels)
    expected = reference.outputs(ENSEMBLE, pixels)
    assert set(out) == set(expected)
    assert response.model_spec.name == ENSEMBLE
    assert response.model_spec.version.value == 1
    assert out["probabilities"].dtype == np.float32 and out["probabilities"].shape == (pixels.shape[0], 10)
    np.testing.assert_allclose(out["probabilities"], expected["probabilities"], atol=1e-6)
    np.testing.assert_allclose(out["confidence"], expected["confidence"], atol=1e-6)
    np.testing.assert_allclose(out["agreement"], expected["agreement"], atol=1e-6)
    np.testing.assert_array_equal(out["class_index"], expected["class_index"])
    assert as_text(out["label"]) == as_text(expected["label"])
    # And the ensemble is actually right on held-out digits.
    assert np.mean(out["class_index"] == test_split[1][ROWS]) >= 0.9


def test_predict_member_with_output_filter_and_version(predict_stub, reference, pixels):
    response, out = _predict(predict_stub, MEMBER, pixels, version=1, output_filter=["probabilities", "label"])
    assert set(out) == {"probabilities", "label"}
    assert response.model_spec.name == MEMBER and response.model_spec.version.value == 1
    expected = reference.outputs(MEMBER, pixels)
    np.testing.assert_allclose(out["probabilities"], expected["probabilities"], atol=1e-6)
    assert as_text(out["label"]) == as_text(expected["label"])


def test_predict_member_logits(predict_stub, reference, pixels):
    _, out = _predict(predict_stub, MEMBER, pixels, output_filter=["logits"])
    np.testing.assert_allclose(out["logits"], reference.member(MEMBER).logits(pixels), rtol=1e-5, atol=1e-5)


def test_classify_with_tf_examples(predict_stub, reference, pixels):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = ENSEMBLE
    for row in pixels:
        example = request.input.example_list.examples.add()
        example.features.feature["pixels"].float_list.value.extend(row.tolist())
    response = predict_stub.Classify(request, timeout=30)
    classifications = response.result.classifications
    assert len(classifications) == pixels.shape[0]
    expected = reference.vote(ENSEMBLE, pixels)
    labels = reference.labels(ENSEMBLE)
    for row, classification in enumerate(classifications):
        assert [c.label for c in classification.classes] == list(labels)
        scores = np.array([c.score for c in classification.classes])
        np.testing.assert_allclose(scores, expected.probabilities[row], atol=1e-6)
        best = classification.classes[int(np.argmax(scores))].label
        assert best == labels[expected.label_index[row]]


@pytest.mark.parametrize("model", [ENSEMBLE, MEMBER])
def test_get_model_metadata_signature_def(predict_stub, model):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = model
    request.metadata_field.append("signature_def")
    response = predict_stub.GetModelMetadata(request, timeout=10)
    assert response.model_spec.name == model and response.model_spec.version.value == 1
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    assert list(signature.inputs) == ["pixels"]
    pixels = signature.inputs["pixels"]
    assert pixels.dtype == tf.float32.as_datatype_enum
    assert [d.size for d in pixels.tensor_shape.dim] == [-1, 64]
    expected = {"probabilities": (tf.float32, [-1, 10]), "label": (tf.string, [-1]),
                "class_index": (tf.int64, [-1]), "confidence": (tf.float32, [-1])}
    expected["agreement" if model == ENSEMBLE else "logits"] = (
        (tf.float32, [-1]) if model == ENSEMBLE else (tf.float32, [-1, 10]))
    assert set(signature.outputs) == set(expected)
    for name, (dtype, shape) in expected.items():
        assert signature.outputs[name].dtype == dtype.as_datatype_enum, name
        assert [d.size for d in signature.outputs[name].tensor_shape.dim] == shape, name


@pytest.mark.parametrize("model", [ENSEMBLE, MEMBER])
def test_get_model_status_available(channel, model):
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    response = stub.GetModelStatus(request, timeout=10)
    [status] = response.model_version_status
    assert status.version == 1
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0


def test_get_model_status_unknown_model(channel):
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "no_such_model"
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelStatus(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no_such_model" in err.value.details()
