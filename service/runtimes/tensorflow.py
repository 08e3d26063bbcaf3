"""TensorFlow SavedModel: the manifest's serving signature, run as a prepared graph call.

Calling the signature (a ConcreteFunction, eagerly) costs 250-420 us of Python and TF dispatch
per batch for the bundled digits members, whose maths takes a few dozen. On the CPU the
signature's graph is frozen (variables to constants) and run by a TF1-style session, as TF
Serving runs a SavedModel: 82-238 us wall, a quarter to a half of the CPU (bench/savedmodel_call.py;
figures in docs/performance.md).
The session's graph rewrites are off, so its kernels are the signature's: the answers are
bitwise the same, and a load checks it on probe rows, keeping the signature call for a model
where they are not (or whose graph does not freeze). A GPU keeps the signature call, placed
with tf.device.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from service.errors import ModelLoadError
from service.runtimes.base import Runtime
from service.runtimes.devices import gpu_index

log = logging.getLogger(__name__)

_configured = threading.Lock()
_done = False


def _configure_tensorflow(intra_op_threads: int):
    """Process-wide TF settings, applied once before TF initialises its devices."""
    global _done
    import tensorflow as tf

    with _configured:
        if not _done:
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)  # share GPUs with ORT
            if intra_op_threads:
                tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
            _done = True
    return tf


class SavedModelRuntime(Runtime):
    framework = "savedmodel"

    def _load(self) -> None:
        tf = _configure_tensorflow(self.options.intra_op_threads)
        index = gpu_index(self.options.device)
        has_gpu = index is not None and index < len(tf.config.list_physical_devices("GPU"))
        self.device = f"gpu:{index}" if has_gpu else "cpu"
        self._tf_device = f"/GPU:{index}" if has_gpu else "/CPU:0"
        if index is not None and not has_gpu:
            log.warning("%s: TensorFlow sees no GPU %d, running on the CPU", self.name, index)
        path = self.folder / self.manifest.artifact
        try:
            with tf.device(self._tf_device):
                self._model = tf.saved_model.load(str(path))
        except Exception as exc:  # TF raises many types for a bad SavedModel
            raise ModelLoadError(str(self.folder), f"'{self.manifest.artifact}' is not a loadable SavedModel: {exc}") from exc
        signature = self.manifest.signature
        if signature not in self._model.signatures:
            raise ModelLoadError(str(self.folder), f"signature '{signature}' not in {sorted(self._model.signatures)}")
        self._fn = self._model.signatures[signature]
        inputs = set(self._fn.structured_input_signature[1])
        if self.manifest.input.name not in inputs:
            raise ModelLoadError(str(self.folder), f"manifest input '{self.manifest.input.name}' not in signature inputs {sorted(inputs)}")
        self._input = self.manifest.input.name
        self._output = self.manifest.output.name
        self._tf = tf
        self._session, self._call = None, None
        if not has_gpu:
            self._prepare()

    def _signature_call(self, rows: np.ndarray) -> np.ndarray:
        with self._tf.device(self._tf_device):
            return self._fn(**{self._input: self._tf.constant(rows)})[self._output].numpy()

    def _run(self, rows: np.ndarray) -> np.ndarray:
        call = self._call
        return call(rows) if call is not None else self._signature_call(rows)

    def _prepare(self) -> None:
        """Use the prepared graph call when it answers probe rows bitwise as the signature does."""
        try:
            session, call = _prepared_call(self._tf, self._fn, self._input, self._output, self.options.intra_op_threads)
        except Exception as exc:  # a graph that does not freeze (tables, resources...): keep the signature
            log.info("%s: running its signature call (its graph does not freeze: %s)", self.name, exc)
            return
        shape, dtype = self.manifest.input.shape[1:], self.manifest.input.dtype
        rng = np.random.default_rng(0)
        try:
            if dtype == "string" or any(d < 0 for d in shape):
                raise ValueError("no fixed numeric row to probe with")
            probes = [rng.integers(0, 16, size=(n, *shape)).astype(dtype) for n in (1, 3)]
            if not all(np.array_equal(call(p), self._signature_call(p)) for p in probes):
                raise ValueError("it answers probe rows otherwise")
        except Exception as exc:  # the signature call stays the model's
            session.close()
            log.info("%s: running its signature call (the prepared graph call: %s)", self.name, exc)
            return
        self._session, self._call = session, call

    def _unload(self) -> None:
        if self._session is not None:
            self._session.close()
        self._session, self._call = None, None
        self._fn = None
        self._model = None


def _prepared_call(tf, fn, input_name: str, output_name: str, intra_op_threads: int):
    """(session, callable rows -> output) for the signature `fn`: its graph with the variables
    frozen to constants, run without graph rewrites (so with the signature's kernels)."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    frozen = convert_variables_to_constants_v2(fn)
    # A signature's inputs and outputs are dicts, flattened in key order (the probe rows check it).
    placeholder = frozen.inputs[sorted(fn.structured_input_signature[1]).index(input_name)]
    output = frozen.outputs[sorted(fn.structured_outputs).index(output_name)]
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(frozen.graph.as_graph_def(), name="")
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=intra_op_threads,
                                      inter_op_parallelism_threads=tf.config.threading.get_inter_op_parallelism_threads())
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    config.graph_options.optimizer_options.opt_level = -1  # L0: no constant folding, no fusion
    config.graph_options.optimizer_options.do_constant_folding = False
    config.graph_options.optimizer_options.do_function_inlining = False
    session = tf.compat.v1.Session(graph=graph, config=config)
    feed, fetch = graph.get_tensor_by_name(placeholder.name), graph.get_tensor_by_name(output.name)
    run, extend = getattr(session, "_call_tf_sessionrun", None), getattr(session, "_extend_graph", None)
    if run is None or extend is None:  # another TensorFlow: its public prepared callable
        return session, session.make_callable(fetch, [feed])
    # Session.run's last step, called directly: make_callable with a feed list runs the whole of
    # Session.run per call (its feed and fetch handlers), some 70 us of Python for these models.
    extend()  # the graph into the session's runtime, as Session.run does first
    dtype, feeds, fetches = feed.dtype.as_numpy_dtype, feed._as_tf_output(), [fetch._as_tf_output()]
    return session, lambda rows: run(None, {feeds: np.ascontiguousarray(rows, dtype)}, fetches, [], None)[0]
