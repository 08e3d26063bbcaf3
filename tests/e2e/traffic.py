"""Well-formed traffic that runs beside the hostile and outage tests: every answer checked."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import tensorflow as tf
import tritonclient.grpc as grpcclient
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tests.e2e.fixtures import ENSEMBLE


class GoodClient(threading.Thread):
    """Valid requests in a loop over its own connections, each answer checked."""

    def __init__(self, address: str, pixels: np.ndarray, expected: np.ndarray, model: str = ENSEMBLE,
                 token: str | None = None) -> None:
        super().__init__(daemon=True, name="good-client")
        self.address, self.pixels, self.expected, self.model = address, pixels, expected, model
        self.token = token
        """The bearer token of a server that asks for one."""
        self.stopping = threading.Event()
        self.successes = 0
        self.failures: list[str] = []

    def finish(self, min_successes: int = 1) -> None:
        """Stop and check: nothing but right answers, and at least `min_successes` of them
        (called at a module's end: an assertion here fails the module's last test)."""
        self.stopping.set()
        self.join(timeout=60)
        assert not self.is_alive()
        assert self.failures == []
        assert self.successes >= min_successes

    def run(self) -> None:
        triton = grpcclient.InferenceServerClient(self.address)
        channel = grpc.insecure_channel(self.address)
        tf_stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model
        request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(self.pixels))
        request.output_filter.append("class_index")
        tensor = grpcclient.InferInput("pixels", list(self.pixels.shape), "FP32")
        tensor.set_data_from_numpy(self.pixels)
        metadata = [("authorization", f"Bearer {self.token}")] if self.token else None
        i = 0
        try:
            while not self.stopping.is_set():
                try:
                    if i % 2:
                        got = tf.make_ndarray(tf_stub.Predict(request, timeout=30, metadata=metadata)
                                              .outputs["class_index"])
                    else:
                        got = triton.infer(self.model, [tensor], client_timeout=30,
                                           headers=dict(metadata) if metadata else None).as_numpy("class_index")
                    if not np.array_equal(got, self.expected):
                        self.failures.append(f"request {i}: wrong answer {got}")
                    else:
                        self.successes += 1
                except Exception as exc:  # every failure is recorded, none stops the loop
                    self.failures.append(f"request {i}: {exc!r}")
                i += 1
                self.stopping.wait(0.02)
        finally:
            triton.close()
            channel.close()
