"""Runtimes: one per framework behind one interface (base.Runtime)."""

from __future__ import annotations

from pathlib import Path

from service.repository.manifest import VariantManifest
from service.runtimes.base import Runtime, RuntimeOptions


def create_runtime(folder: Path, manifest: VariantManifest, options: RuntimeOptions) -> Runtime:
    """The runtime for the manifest's framework (imports the framework lazily)."""
    if manifest.framework == "onnx":
        from service.runtimes.onnx import OnnxRuntime

        return OnnxRuntime(folder, manifest, options)
    from service.runtimes.tensorflow import SavedModelRuntime

    return SavedModelRuntime(folder, manifest, options)


__all__ = ["Runtime", "RuntimeOptions", "create_runtime"]
