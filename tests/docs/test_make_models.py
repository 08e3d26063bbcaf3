"""`make models` (models/make_digits.py) and the committed repository agree on everything that
does not depend on training: the split, the two ensembles' ensemble.yaml, and models/README's
table of temperatures and validation figures is the committed manifests'. (Training itself,
about 80 s of both cores, is not run here; models/README.md says what a rerun reproduces.)"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from sklearn.datasets import load_digits

from tests.helpers import MODELS, VARIANTS


@pytest.fixture(scope="module")
def make_digits():
    spec = importlib.util.spec_from_file_location("make_digits", MODELS / "make_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_it_writes_the_committed_ensembles(make_digits):
    files = make_digits.ensemble_files()
    assert set(files) == {"digits/ensemble.yaml", "digits_slo/ensemble.yaml"}
    for path, text in files.items():
        assert (MODELS / path).read_text() == text, path
    assert "policy: stacked" in files["digits/ensemble.yaml"]  # README's accuracy tables: the bundled default


def test_it_writes_the_committed_split(make_digits):
    committed = json.loads((MODELS / "digits_split.json").read_text())
    split = make_digits.make_split(load_digits().target)
    assert committed == {"source": "sklearn.datasets.load_digits", "seed": make_digits.SPLIT_SEED, **split}


def test_it_makes_the_committed_variants(make_digits):
    assert sorted(v[0] for v in make_digits.VARIANTS) == VARIANTS
    for name, fmt, architecture, _, seed, _ in make_digits.VARIANTS:
        manifest = json.loads((MODELS / name / "1" / "variant.json").read_text())
        assert manifest["framework"] == fmt
        assert manifest["provenance"] | {"exported_at": None} == manifest["provenance"] | {
            "exported_at": None, "source": "models/make_digits.py", "architecture": architecture, "seed": seed}


def test_the_readme_table_is_the_committed_manifests():
    """models/README.md 'How it was made': T, validation accuracy, ECE and NLL per variant."""
    rows = re.findall(r"^\| `(digits_\w+)` \|.*$", (MODELS / "README.md").read_text(), re.M)
    assert sorted(rows) == VARIANTS
    for line in re.findall(r"^\| `digits_\w+` \|.*$", (MODELS / "README.md").read_text(), re.M):
        cells = [c.strip() for c in line.strip("|").split("|")]
        name, t, acc, ece_before, ece_after, nll_before, nll_after = cells[0].strip("`"), *cells[4:]
        manifest = json.loads((MODELS / name / "1" / "variant.json").read_text())
        validation = manifest["validation"]
        assert t == f"{manifest['calibration']['temperature']:.3f}", name
        assert acc == f"{validation['calibrated']['accuracy']:.1%}", name
        assert (ece_before, ece_after) == (f"{validation['uncalibrated']['ece']:.4f}",
                                           f"{validation['calibrated']['ece']:.4f}"), name
        assert (nll_before, nll_after) == (f"{validation['uncalibrated']['nll']:.4f}",
                                           f"{validation['calibrated']['nll']:.4f}"), name


def _shape(value):
    """A manifest's structure: its keys, nested, without the values."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [_shape(value[0])]
    return type(value).__name__


def test_the_export_it_calls_writes_manifests_shaped_like_the_committed_ones(make_digits, tmp_path):
    """The committed manifests are what today's export writes (models/README: a rerun gives
    manifests equal in every field but `exported_at`): the same fields, nested alike. The
    logistic regression, exported untrained as make_digits.py exports it."""
    import numpy as np

    name, fmt, architecture, build, seed, _ = next(v for v in make_digits.VARIANTS if v[0] == "digits_logreg")
    data = load_digits()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    split = make_digits.make_split(y)
    tr, va = np.asarray(split["train"]), np.asarray(split["val"])
    make_digits.keras.utils.set_random_seed(seed)
    folder = make_digits.export_variant(
        build(), x_train=x[tr], y_train=y[tr], x_val=x[va], y_val=y[va], val_indices=va, repository=tmp_path,
        name=name, labels=make_digits.LABELS, fmt=fmt, version=1, architecture=architecture, seed=seed,
        source="models/make_digits.py")
    written = json.loads((folder / "variant.json").read_text())
    committed = json.loads((MODELS / name / "1" / "variant.json").read_text())
    assert _shape(written) == _shape(committed)
