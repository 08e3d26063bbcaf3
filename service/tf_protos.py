"""TF Serving's protocol buffers without TensorFlow.

`tensorflow_serving.apis` imports `tensorflow.core.framework.tensor_pb2` and friends, and
importing any `tensorflow.*` module first runs `tensorflow/__init__`: the whole framework
(about 600 MB of RSS and 3 s here) for a server whose models may all be ONNX. `install()`
puts a stand-in `tensorflow` package in `sys.modules` whose submodules (the generated
`*_pb2` files, empty `__init__`s) import on their own (65 ms, 34 MB). The first attribute
asked of the package itself (`tf.saved_model`, `tf.config`: a SavedModel runtime, Keras,
a test) runs the real `tensorflow/__init__` into that same module object, so everything
that imported it, and the protos already loaded, stay the ones TensorFlow uses.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from importlib.machinery import ModuleSpec

_lock = threading.RLock()
_loading = threading.local()  # set while this thread runs tensorflow/__init__


class _TensorFlowOnDemand(types.ModuleType):
    """The `tensorflow` package before its `__init__` ran: real attributes (`__path__`,
    `__spec__`, submodules once imported) answer as usual; any other runs `__init__` once."""

    def __getattr__(self, name: str):
        with _lock:  # a second thread waits for the first one's import to finish
            if type(self) is _TensorFlowOnDemand and not getattr(_loading, "active", False):
                _loading.active = True
                try:
                    self.__spec__.loader.exec_module(self)  # type: ignore[union-attr]
                finally:
                    _loading.active = False
                module: types.ModuleType = self  # from here on a plain module, without this __getattr__
                module.__class__ = types.ModuleType
        try:
            return object.__getattribute__(self, name)
        except AttributeError:  # also while __init__ runs: a partly initialised module
            raise AttributeError(f"module 'tensorflow' has no attribute '{name}'") from None


def install() -> None:
    """Make `tensorflow.*` protobuf imports cheap from now on (no-op once TensorFlow, or the
    stand-in, is imported; without TensorFlow installed, imports fail as they would anyway)."""
    with _lock:
        if "tensorflow" in sys.modules:
            return
        spec = importlib.util.find_spec("tensorflow")  # finds it without running it
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            return
        module = _TensorFlowOnDemand("tensorflow")
        _copy_spec(module, spec)
        sys.modules["tensorflow"] = module


def _copy_spec(module: types.ModuleType, spec: ModuleSpec) -> None:
    module.__spec__ = spec
    module.__loader__ = spec.loader
    module.__file__ = spec.origin
    module.__path__ = list(spec.submodule_search_locations or ())
    module.__package__ = "tensorflow"


def tensorflow_loaded() -> bool:
    """Whether TensorFlow itself (not only its protos) is imported in this process."""
    module = sys.modules.get("tensorflow")
    return module is not None and type(module) is not _TensorFlowOnDemand
