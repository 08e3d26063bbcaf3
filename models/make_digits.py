"""Regenerate the bundled demo repository: five digits classifiers and their ensemble.

    python models/make_digits.py [--out DIR]

scikit-learn's digits (1797 8x8 images, pixels 0..16, 10 classes) are split 60/20/20
(train/val/test, stratified, fixed seed). Every variant trains on train only, with its
own random one-pixel shifts added (augmentation); the export tool fits its temperature on val; test is left for the server's end-to-end evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from service.export.exporter import export_variant, normalization_stats, normalize  # noqa: E402

SPLIT_SEED = 20240601
AUGMENT_COPIES = 2
LABELS = [str(d) for d in range(10)]
ENSEMBLE = "digits"
L = keras.layers


def _mlp(widths: tuple[int, ...], dropout: float) -> Callable[[], keras.Model]:
    def build() -> keras.Model:
        inputs = keras.Input((64,), name="pixels")
        x = inputs
        for width in widths:
            x = L.Dense(width, activation="relu")(x)
            if dropout:
                x = L.Dropout(dropout)(x)
        return keras.Model(inputs, L.Dense(10, name="logits")(x))
    return build


def _cnn(filters: tuple[int, ...], pool: bool) -> Callable[[], keras.Model]:
    def build() -> keras.Model:
        inputs = keras.Input((64,), name="pixels")
        x = L.Reshape((8, 8, 1))(inputs)  # the served input stays a flat 64-vector
        for i, n in enumerate(filters):
            x = L.Conv2D(n, 3, padding="same", use_bias=False)(x)
            x = L.BatchNormalization()(x)
            x = L.ReLU()(x)
            if pool and i == 0:
                x = L.MaxPooling2D()(x)
        x = L.Dropout(0.3)(L.Flatten()(x))
        return keras.Model(inputs, L.Dense(10, name="logits")(x))
    return build


def _logreg() -> keras.Model:
    inputs = keras.Input((64,), name="pixels")
    dense = L.Dense(10, kernel_regularizer=keras.regularizers.l2(1e-3), name="logits")
    return keras.Model(inputs, dense(inputs))


# name, format, architecture, builder, seed, epochs
VARIANTS = [
    ("digits_mlp_a", "onnx", "MLP 64-64-10, ReLU", _mlp((64,), 0.0), 11, 40),
    ("digits_mlp_b", "savedmodel", "MLP 64-128-64-10, ReLU, dropout 0.2", _mlp((128, 64), 0.2), 12, 40),
    ("digits_cnn_a", "onnx", "CNN conv16-conv32 (BN, ReLU), dropout 0.3, dense 10", _cnn((16, 32), False), 13, 40),
    ("digits_cnn_b", "savedmodel", "CNN conv8-pool-conv16 (BN, ReLU), dropout 0.3, dense 10", _cnn((8, 16), True), 14, 40),
    ("digits_logreg", "onnx", "multinomial logistic regression (L2 1e-3)", _logreg, 15, 40),
]


def augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, copies: int = AUGMENT_COPIES
            ) -> tuple[np.ndarray, np.ndarray]:
    """The rows plus `copies` randomly shifted copies (up to one pixel each way, zero fill)."""
    images = x.reshape(-1, 8, 8)
    out = [x]
    for _ in range(copies):
        shifted = np.zeros_like(images)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                pick = rng.integers(0, 9, len(images)) == (dy + 1) * 3 + (dx + 1)
                moved = np.roll(images[pick], (dy, dx), axis=(1, 2))
                if dy:
                    moved[:, 0 if dy > 0 else -1, :] = 0
                if dx:
                    moved[:, :, 0 if dx > 0 else -1] = 0
                shifted[pick] = moved
        out.append(shifted.reshape(-1, 64))
    return np.concatenate(out), np.tile(y, copies + 1)


def make_split(y: np.ndarray) -> dict[str, list[int]]:
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=0.2, stratify=y, random_state=SPLIT_SEED)
    train, val = train_test_split(rest, test_size=0.25, stratify=y[rest], random_state=SPLIT_SEED)
    return {"train": sorted(map(int, train)), "val": sorted(map(int, val)), "test": sorted(map(int, test))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="repository to (re)write (default: this folder)")
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    tf.config.experimental.enable_op_determinism()
    # On the CPU only: a GPU's kernels round differently, and the bundled weights were made on a CPU.
    tf.config.set_visible_devices([], "GPU")
    tf.get_logger().setLevel("ERROR")  # one tf.function per variant trips a retracing warning

    data = load_digits()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    split = make_split(y)
    (out / "digits_split.json").write_text(json.dumps(
        {"source": "sklearn.datasets.load_digits", "seed": SPLIT_SEED, **split}))
    tr, va = np.asarray(split["train"]), np.asarray(split["val"])
    mean, std = normalization_stats(x[tr])  # the same statistics the exporter writes

    for name, fmt, architecture, build, seed, epochs in VARIANTS:
        start = time.perf_counter()
        keras.backend.clear_session()  # layer names (hence graph node names) restart per variant
        keras.utils.set_random_seed(seed)
        model = build()
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        # Each variant trains on the training split plus its own random one-pixel shifts of
        # it: the variants' errors differ more, so a vote has something to combine. (Chosen
        # on the validation split over plain training and bagging, where the ensemble did
        # not beat its best member.)
        x_fit, y_fit = augment(x[tr], y[tr], np.random.default_rng(seed))
        model.fit(normalize(x_fit, mean, std, (-1, 64)), y_fit, batch_size=32, epochs=epochs,
                  shuffle=True, verbose=0)
        shutil.rmtree(out / name / "1", ignore_errors=True)
        export_variant(model, x_train=x[tr], y_train=y[tr], x_val=x[va], y_val=y[va],
                       val_indices=va, repository=out, name=name, labels=LABELS, fmt=fmt,
                       version=1, architecture=architecture, seed=seed,
                       source="models/make_digits.py")
        print(f"{name}: {fmt}, {time.perf_counter() - start:.1f} s", file=sys.stderr)

    for path, text in ensemble_files().items():
        (out / path).parent.mkdir(exist_ok=True)
        (out / path).write_text(text)
    return 0


def ensemble_files() -> dict[str, str]:
    """The two ensembles' ensemble.yaml, by path in the repository."""
    members = ", ".join(v[0] for v in VARIANTS)
    return {
        # `stacked`: member weights fitted on the validation replay when the ensemble loads, the
        # policy whose calibrated vote beats its best member on the test split (README).
        f"{ENSEMBLE}/ensemble.yaml": f"members: [{members}]\npolicy: stacked\n",
        # The same members under a latency objective: the server picks the most accurate
        # subset whose p99 stays within budget (satisficing).
        f"{ENSEMBLE}_slo/ensemble.yaml":
            f"members: [{members}]\npolicy: confidence\nobjective:\n  optimize: accuracy\n  latency_p99_ms: 20\n",
    }


if __name__ == "__main__":
    sys.exit(main())
