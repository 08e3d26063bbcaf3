"""service.tf_protos in a fresh interpreter: TF Serving's protos import without TensorFlow,
and TensorFlow still works, once, for every thread that asks for it at the same time."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import ROOT

SCRIPT = textwrap.dedent("""
    import sys, threading
    from service import tf_protos
    tf_protos.install()
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    from tensorflow.core.framework import tensor_pb2
    assert "tensorflow.python" not in sys.modules and not tf_protos.tensorflow_loaded()
    request = predict_pb2.PredictRequest()
    request.inputs["x"].float_val.append(1.5)
    wire = request.SerializeToString()

    import tensorflow as tf
    results, errors = [], []
    def use():
        try:
            results.append(float(tf.constant([2.0]).numpy()[0]))
        except Exception as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert not errors and results == [2.0] * 4, (errors, results)
    assert tf_protos.tensorflow_loaded() and sys.modules["tensorflow"] is tf
    # the protos TensorFlow uses are the ones imported before it
    assert tf.make_tensor_proto([1.5]).__class__ is tensor_pb2.TensorProto
    assert predict_pb2.PredictRequest.FromString(wire).inputs["x"].float_val == [1.5]
    print("ok")
""")


def test_protos_without_tensorflow_then_tensorflow_on_demand():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
