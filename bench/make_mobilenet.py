"""Build the compute-heavy bench repository: three MobileNetV2 variants and their ensemble.

    python bench/make_mobilenet.py [--out bench/repo]

keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3), classes=10), one per
seed, exported as ONNX by Quorum's own export tool (service.export.exporter.export_variant).
The training data are a few random images: the point is compute, not accuracy, so the
variants are not trained at all (random initial weights, BatchNormalization in inference
mode).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

ENSEMBLE = "mobilenets"
SEEDS = (101, 102, 103)
MEMBERS = [f"mobilenet_v2_{chr(ord('a') + i)}" for i in range(len(SEEDS))]
SHAPE = (224, 224, 3)
MAX_BATCH = 8  # on the CPU bigger batches do not speed MobileNetV2 up (ANCHORS.md)


def build(out: Path) -> None:
    import keras

    from service.export.exporter import export_variant

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, size=(12, *SHAPE)).astype(np.float32)
    y = np.arange(12) % 10
    for name, seed in zip(MEMBERS, SEEDS):
        if (out / name / "1" / "variant.json").is_file():
            print(f"{name}: exists")
            continue
        keras.utils.set_random_seed(seed)
        model = keras.applications.MobileNetV2(weights=None, input_shape=SHAPE, classes=10,
                                               classifier_activation=None)
        export_variant(model, x_train=x[:8], y_train=y[:8], x_val=x[8:], y_val=y[8:],
                       val_indices=None, repository=out, name=name, labels=None, fmt="onnx",
                       version=1, architecture="MobileNetV2 224x224x3, 10 classes, untrained",
                       seed=seed, source="keras")
        (out / name / "model.yaml").write_text(f"batching:\n  max_batch_size: {MAX_BATCH}\n")
    (out / ENSEMBLE).mkdir(exist_ok=True)
    (out / ENSEMBLE / "ensemble.yaml").write_text(
        f"members: [{', '.join(MEMBERS)}]\npolicy: soft\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "repo")
    args = parser.parse_args()
    build(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
