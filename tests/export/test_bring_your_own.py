"""Bring your own models: a Keras softmax classifier, a Keras logits model, an ONNX file written
by skl2onnx and a pickled scikit-learn pipeline, each exported with `quorum export` as a user
would run it, served by the real server, and answering what the source model answers.

Expected probabilities are computed here from the source models themselves and the
manifest's temperature: softmax(source_logits / T), with log-probabilities standing in for
the logits of a model that only gives probabilities (softmax(log p / T) is what temperature
scaling of such a model means).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tests.helpers import ROOT
from tests.server import running_server

LABELS = ("benign", "malignant")
ERROR = "quorum export: error: "


def quorum(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """stderr must be exactly one line, `quorum export: error: ...`; returns the message."""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), done.stderr
    return lines[0][len(ERROR):]


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_probs(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(p, dtype=np.float64))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Breast-cancer data, 341/114/114, labels as strings (what `y` of a user's data often is)."""
    bc = load_breast_cancer()
    x = bc.data.astype(np.float32)
    y = np.asarray(LABELS)[bc.target]
    idx = np.random.default_rng(7).permutation(len(x))
    tr, va, te = idx[:341], idx[341:455], idx[455:]
    folder = tmp_path_factory.mktemp("byom")
    npz = folder / "splits.npz"
    np.savez(npz, x_train=x[tr], y_train=y[tr], x_val=x[va], y_val=y[va], val_indices=va)
    mean, std = x[tr].mean(axis=0), x[tr].std(axis=0)
    return {"folder": folder, "npz": npz, "x_train": x[tr], "y_train": y[tr], "x_test": x[te],
            "y_int": (y[tr] == "malignant").astype(np.int64), "xn_train": (x[tr] - mean) / std}


@pytest.fixture(scope="module")
def sources(data) -> dict:
    """The four models, trained the way their users would, saved as their users would."""
    import keras

    folder, xn, y = data["folder"], data["xn_train"], data["y_int"]
    keras.utils.set_random_seed(3)
    soft = keras.Sequential([keras.Input((30,), name="features"), keras.layers.Dense(16, activation="relu"),
                             keras.layers.BatchNormalization(), keras.layers.Dense(2, activation="softmax")])
    soft.compile("adam", "sparse_categorical_crossentropy")
    soft.fit(xn, y, epochs=5, batch_size=32, verbose=0)
    soft.save(folder / "softmax.keras")
    inputs = keras.Input((30,), name="x")
    logits = keras.layers.Dense(2)(keras.layers.Dense(8, activation="relu")(inputs))
    raw = keras.Model(inputs, logits)
    raw.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    raw.fit(xn, y, epochs=5, batch_size=32, verbose=0)
    raw.save(folder / "logits.keras")

    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    forest = RandomForestClassifier(n_estimators=15, max_depth=4, random_state=0).fit(data["x_train"], data["y_train"])
    onnx_model = to_onnx(forest, initial_types=[("input", FloatTensorType([None, 30]))],
                         target_opset={"": 17, "ai.onnx.ml": 3})
    (folder / "forest.onnx").write_bytes(onnx_model.SerializeToString())
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(data["x_train"], data["y_train"])
    joblib.dump(pipeline, folder / "pipeline.joblib")
    return {"softmax": soft, "logits": raw, "forest": forest, "pipeline": pipeline}


def _source_logits(name: str, model, x_raw: np.ndarray, mean, std) -> np.ndarray:
    if name in ("softmax", "logits"):
        out = model.predict(((x_raw - mean) / std).astype(np.float32), verbose=0)
        return log_probs(out) if name == "softmax" else out
    return log_probs(model.predict_proba(x_raw))  # scikit-learn: classes_ order, probabilities


@pytest.fixture(scope="module")
def repo(data, sources) -> Path:
    repo = data["folder"] / "repo"
    npz = str(data["npz"])
    for name, args in (("softmax", ["--model", str(data["folder"] / "softmax.keras")]),
                       ("logits", ["--model", str(data["folder"] / "logits.keras"), "--format", "savedmodel",
                                   "--input-name", "features"]),
                       ("forest", ["--model", str(data["folder"] / "forest.onnx")]),
                       ("pipeline", ["--model", str(data["folder"] / "pipeline.joblib")])):
        done = quorum("export", *args, "--data", npz, "--repository", str(repo), "--name", name, check=True)
        assert f"exported {name} version 1" in done.stdout
    return repo


def manifest(repo: Path, name: str) -> dict:
    return json.loads((repo / name / "1" / "variant.json").read_text())


def test_export_says_what_it_took_as_logits(repo) -> None:
    kinds = {name: manifest(repo, name)["provenance"]["output"] for name in ("softmax", "logits", "forest", "pipeline")}
    assert kinds["softmax"].startswith("logits before the softmax head")
    assert kinds["logits"].startswith("logits (the model's own output)")
    assert kinds["forest"].startswith("log-probabilities")
    assert kinds["pipeline"].startswith("log-probabilities")
    inputs = {name: manifest(repo, name)["provenance"]["model_input"] for name in kinds}
    assert inputs == {"softmax": "normalised", "logits": "normalised", "forest": "raw", "pipeline": "raw"}
    for name in kinds:  # string labels, in the order the models output them
        assert tuple(manifest(repo, name)["labels"]) == LABELS
    assert manifest(repo, "logits")["inputs"][0]["name"] == "features"  # --input-name


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    created = quorum("ensemble", "create", "bc", "--repository", str(repo),
                     "--members", "softmax,logits,forest,pipeline", "--policy", "soft", check=True)
    assert "4 members" in created.stdout
    with running_server(tmp_path_factory.mktemp("byom-server"), repo) as s:
        yield s
        assert s.stop() == 0


@pytest.mark.parametrize("name", ["softmax", "logits", "forest", "pipeline"])
def test_served_probabilities_equal_the_source_models(name, server, repo, sources, data) -> None:
    x = data["x_test"]
    mean, std = data["x_train"].mean(axis=0), data["x_train"].std(axis=0)
    temperature = manifest(repo, name)["calibration"]["temperature"]
    expected = softmax(_source_logits(name, sources[name], x, mean, std), temperature)
    client = grpcclient.InferenceServerClient(server.address)
    served = []
    for part in np.array_split(x, 2):  # under the max batch size of 64
        inputs = grpcclient.InferInput(manifest(repo, name)["inputs"][0]["name"], list(part.shape), "FP32")
        inputs.set_data_from_numpy(part)
        result = client.infer(name, [inputs], outputs=[grpcclient.InferRequestedOutput("probabilities"),
                                                       grpcclient.InferRequestedOutput("label")])
        served.append(result.as_numpy("probabilities"))
    served = np.concatenate(served)
    assert np.max(np.abs(served - expected)) <= 1e-5
    assert np.mean(served.argmax(axis=1) == _test_truth(data)) > 0.85


def _test_truth(data) -> np.ndarray:
    bc = load_breast_cancer()
    idx = np.random.default_rng(7).permutation(len(bc.target))
    return (np.asarray(LABELS)[bc.target[idx[455:]]] == "malignant").astype(np.int64)


def test_the_created_ensemble_serves_every_member(server, data) -> None:
    client = grpcclient.InferenceServerClient(server.address)
    x = data["x_test"][:20]
    inputs = grpcclient.InferInput("features", list(x.shape), "FP32")
    inputs.set_data_from_numpy(x)
    result = client.infer("bc", [inputs], outputs=[grpcclient.InferRequestedOutput(n)
                                                   for n in ("label", "agreement", "probabilities")])
    labels = [v.decode() for v in result.as_numpy("label")]
    assert set(labels) <= set(LABELS) and len(labels) == 20
    assert np.all(result.as_numpy("agreement") >= 0.5)
    assert np.mean(np.asarray(labels) == np.asarray(LABELS)[_test_truth(data)[:20]]) >= 0.85


def test_ensemble_create_refuses_members_with_other_labels(repo, data) -> None:
    digits = ROOT / "models" / "digits_logreg"
    other = repo.parent / "mixed"
    other.mkdir()
    import shutil

    shutil.copytree(digits, other / "digits_logreg")
    shutil.copytree(repo / "pipeline", other / "pipeline")
    done = quorum("ensemble", "create", "mixed", "--repository", str(other), "--members", "pipeline,digits_logreg")
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("quorum ensemble create: error: ensemble 'mixed': ")
    assert ("member 'digits_logreg' predicts labels that 'pipeline' does not: ['0' at 0, '1' at 1, '2' at 2, "
            "'3' at 3, '4' at 4, '5' at 5, '6' at 6, '7' at 7, '8' at 8, '9' at 9] and lacks labels that "
            "'pipeline' predicts: ['benign' at 0, 'malignant' at 1]") in line
    assert "member 'digits_logreg' takes input float32 [64] per row but 'pipeline' takes float32 [30]" in line
    assert not (other / "mixed").exists()


# -- failures: one line each, nothing left behind ---------------------------------------------
def test_wrong_data_path_is_a_usage_error(data, tmp_path) -> None:
    repo = tmp_path / "repo"
    done = quorum("export", "--model", str(data["folder"] / "forest.onnx"), "--data", str(tmp_path / "splits.npz"),
                  "--repository", str(repo), "--name", "forest")
    assert done.returncode == 2
    assert one_error_line(done) == f"--data {tmp_path / 'splits.npz'}: no such file"
    assert not repo.exists()


def test_wrong_feature_width_names_the_array_and_the_input(data, sources, tmp_path) -> None:
    npz = tmp_path / "narrow.npz"
    with np.load(data["npz"]) as d:
        arrays = dict(d)
    arrays["x_val"] = arrays["x_val"][:, :20]
    np.savez(npz, **arrays)
    repo = tmp_path / "repo"
    (repo / "softmax").mkdir(parents=True)  # an existing model folder stays as it was
    done = quorum("export", "--model", str(data["folder"] / "softmax.keras"), "--data", str(npz),
                  "--repository", str(repo), "--name", "softmax")
    assert done.returncode == 1
    assert one_error_line(done) == ("--data: x_val has shape [114, 20], rows of 20 values, but the model's "
                                    "input 'features' takes [-1, 30], 30 values per row")
    assert list((repo / "softmax").iterdir()) == [] and sorted(p.name for p in repo.iterdir()) == ["softmax"]


def test_onnx_given_as_keras_is_named(data, sources, tmp_path) -> None:
    fake = tmp_path / "forest.keras"
    fake.write_bytes((data["folder"] / "forest.onnx").read_bytes())
    done = quorum("export", "--model", str(fake), "--data", str(data["npz"]), "--repository",
                  str(tmp_path / "repo"), "--name", "forest")
    assert done.returncode == 1
    assert one_error_line(done) == (f"--model {fake}: not a .keras archive (a .keras file is a zip); "
                                    "it is an ONNX model: name it .onnx")
    assert not (tmp_path / "repo").exists()


def test_unknown_model_file_and_format_mismatch_are_usage_errors(data, sources, tmp_path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 8)
    done = quorum("export", "--model", str(weights), "--data", str(data["npz"]), "--repository",
                  str(tmp_path / "repo"), "--name", "m")
    assert done.returncode == 2 and one_error_line(done).startswith(f"--model {weights}: unknown kind of file '.bin'")
    done = quorum("export", "--model", str(data["folder"] / "forest.onnx"), "--data", str(data["npz"]),
                  "--repository", str(tmp_path / "repo"), "--name", "m", "--format", "savedmodel")
    assert done.returncode == 2
    assert one_error_line(done) == "--format savedmodel: onnx models can be written as onnx only"
    assert not (tmp_path / "repo").exists()


def test_string_labels_unknown_to_the_model_are_named(data, sources, tmp_path) -> None:
    npz = tmp_path / "typo.npz"
    with np.load(data["npz"]) as d:
        arrays = dict(d)
    arrays["y_val"] = arrays["y_val"].copy()
    arrays["y_val"][3] = "malign"
    np.savez(npz, **arrays)
    done = quorum("export", "--model", str(data["folder"] / "pipeline.joblib"), "--data", str(npz),
                  "--repository", str(tmp_path / "repo"), "--name", "p")
    assert done.returncode == 1
    assert one_error_line(done) == ("--data: y_val holds the label 'malign', which is not among the "
                                    "model's classes [benign, malignant]")
    assert not (tmp_path / "repo").exists()


def test_missing_arrays_and_labels_count_are_named(data, sources, tmp_path) -> None:
    npz = tmp_path / "partial.npz"
    with np.load(data["npz"]) as d:
        np.savez(npz, x_train=d["x_train"], y_train=d["y_train"])
    done = quorum("export", "--model", str(data["folder"] / "forest.onnx"), "--data", str(npz),
                  "--repository", str(tmp_path / "repo"), "--name", "f")
    assert done.returncode == 1
    assert one_error_line(done) == f"--data {npz}: lacks the array(s) x_val, y_val (has x_train, y_train)"
    done = quorum("export", "--model", str(data["folder"] / "forest.onnx"), "--data", str(data["npz"]),
                  "--repository", str(tmp_path / "repo"), "--name", "f", "--labels", "a,b,c")
    assert done.returncode == 2
    assert one_error_line(done) == "--labels names 3 classes, but the model has 2 outputs"
    assert not (tmp_path / "repo").exists()


def test_a_failure_while_writing_leaves_nothing_behind(tmp_path) -> None:
    from service.export.exporter import _publish

    def write_then_fail(folder: Path) -> None:
        (folder / "model.onnx").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _publish(tmp_path / "new_repo", "m", 1, write_then_fail)
    assert not (tmp_path / "new_repo").exists()
    (tmp_path / "repo" / "m" / "1").mkdir(parents=True)
    with pytest.raises(OSError):
        _publish(tmp_path / "repo", "m", 2, write_then_fail)
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["m"]  # no staging folder
    assert sorted(p.name for p in (tmp_path / "repo" / "m").iterdir()) == ["1"]


def test_double_normalisation_is_warned_and_recorded(data, tmp_path) -> None:
    import keras

    keras.utils.set_random_seed(5)
    norm = keras.layers.Normalization()
    norm.adapt(data["x_train"])  # the model normalises its own (raw) inputs
    inputs = keras.Input((30,), name="features")
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(8, activation="relu")(norm(inputs))))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(data["x_train"], data["y_int"], epochs=5, verbose=0)
    path = tmp_path / "self_normalising.keras"
    model.save(path)
    repo = tmp_path / "repo"
    done = quorum("export", "--model", str(path), "--data", str(data["npz"]), "--repository", str(repo),
                  "--name", "twice", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(repo / "twice" / "1")  # --quiet: the folder only
    warnings = [line for line in done.stderr.splitlines() if line.startswith("quorum export: warning: ")]
    assert any("normalised twice" in w and "layer normalization" in w for w in warnings), done.stderr
    recorded = manifest(repo, "twice")["warnings"]
    assert [f"quorum export: warning: {w}" for w in recorded] == warnings
    fixed = quorum("export", "--model", str(path), "--data", str(data["npz"]), "--repository", str(repo),
                   "--name", "once", "--model-input", "raw", check=True)
    assert "warning" not in fixed.stderr and manifest(repo, "once")["warnings"] == []
    assert manifest(repo, "once")["normalization"]["std"] == [1.0] * 30


def test_validate_passes_the_exported_repository_and_names_what_it_refuses(repo, server, tmp_path) -> None:
    import shutil

    good = quorum("validate", str(repo))
    assert good.returncode == 0, good.stdout
    assert "0 with something the server would refuse" in good.stdout
    broken = tmp_path / "broken"
    shutil.copytree(repo, broken)
    (broken / "forest" / "1" / "model.onnx").write_bytes(b"not onnx")
    body = json.loads((broken / "pipeline" / "1" / "variant.json").read_text())
    body["labels"] = ["benign"]
    (broken / "pipeline" / "1" / "variant.json").write_text(json.dumps(body))
    done = quorum("validate", str(broken))
    assert done.returncode == 1
    out = done.stdout
    assert "REFUSED  forest (variant)" in out and "'model.onnx' fails onnx.checker" in out
    assert "REFUSED  pipeline (variant)" in out and "variant.json field 'labels'" in out
    assert "REFUSED  bc (ensemble)" in out and "member 'forest' has no loadable version" in out
    assert "ok       softmax (variant)" in out


# -- quorum predict for any model ------------------------------------------------------------
def _served_labels(server, model: str, x: np.ndarray) -> list[str]:
    client = grpcclient.InferenceServerClient(server.address)
    inputs = grpcclient.InferInput("features", list(x.shape), "FP32")
    inputs.set_data_from_numpy(x)
    result = client.infer(model, [inputs], outputs=[grpcclient.InferRequestedOutput("label")])
    return [v.decode() for v in result.as_numpy("label")]


def test_predict_any_model_from_values_file_and_stdin(server, data, tmp_path) -> None:
    rows = data["x_test"][:3]
    expected = _served_labels(server, "bc", rows)
    one = quorum("predict", "bc", "--values", ",".join(repr(float(v)) for v in rows[0]), "--address", server.address)
    assert one.returncode == 0, one.stderr
    lines = one.stdout.splitlines()
    assert lines[0].startswith(f"bc: {expected[0]}  confidence ") and "policy soft" in lines[0]
    assert lines[1].split()[:2] == ["member", "label"]
    assert sorted(line.split()[0] for line in lines[2:6]) == ["forest", "logits", "pipeline", "softmax"]
    np.save(tmp_path / "rows.npy", rows)
    header = ",".join(f"f{i}" for i in range(30))
    (tmp_path / "rows.csv").write_text(header + "\n" + "\n".join(",".join(repr(float(v)) for v in r) for r in rows) + "\n")
    for source in (["--file", str(tmp_path / "rows.npy")], ["--file", str(tmp_path / "rows.csv")]):
        done = quorum("predict", "bc", *source, "--json", "--address", server.address)
        assert done.returncode == 0, done.stderr
        answers = json.loads(done.stdout)
        assert [a["label"] for a in answers] == expected
        assert all(len(a["member_votes"]) == 4 and a["model"] == "bc" for a in answers)
        np.testing.assert_allclose([a["input"] for a in answers], rows, rtol=1e-6)
    piped = subprocess.run([sys.executable, "-m", "service.cli", "predict", "pipeline", "--json",
                            "--address", server.address], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, input=(tmp_path / "rows.csv").read_text())
    assert piped.returncode == 0, piped.stderr
    assert [a["label"] for a in json.loads(piped.stdout)] == _served_labels(server, "pipeline", rows)


def test_predict_names_the_input_a_row_does_not_fit(server) -> None:
    done = quorum("predict", "bc", "--values", "1,2,3", "--address", server.address)
    assert done.returncode == 2
    assert done.stderr == ("quorum predict: --values needs 30 numbers per row for model 'bc' input "
                           "'features' FP32 [-1, 30], got 3\n")


def test_ensemble_create_writes_policy_quorum_and_objective(repo) -> None:
    import jsonschema
    import yaml

    done = quorum("ensemble", "create", "bc_slo", "--repository", str(repo), "--members", "pipeline,forest,softmax",
                  "--policy", "majority", "--quorum", "2", "--objective-latency-p99-ms", "25")
    assert done.returncode == 0, done.stderr
    written = yaml.safe_load((repo / "bc_slo" / "ensemble.yaml").read_text())
    assert written == {"members": ["pipeline", "forest", "softmax"], "policy": "majority", "quorum": 2,
                       "objective": {"latency_p99_ms": 25.0}}
    schema = json.loads((ROOT / "docs" / "schemas" / "ensemble.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(written)
    again = quorum("ensemble", "create", "bc_slo", "--repository", str(repo), "--members", "pipeline,forest")
    assert again.returncode == 2 and "ensemble.yaml exists; pass --force to replace it" in again.stderr
    too_many = quorum("ensemble", "create", "bc_q", "--repository", str(repo), "--members", "pipeline,forest",
                      "--quorum", "3")
    assert too_many.returncode == 2
    assert too_many.stderr == "quorum ensemble create: error: quorum 3 exceeds the 2 members\n"
    assert not (repo / "bc_q").exists()
    (repo / "bc_slo" / "ensemble.yaml").unlink()
    (repo / "bc_slo").rmdir()


def test_a_savedmodel_ending_in_softmax_exports_its_logits(sources, data, tmp_path) -> None:
    import onnxruntime as ort
    import tensorflow as tf

    from service.export.exporter import export_model

    saved = tmp_path / "softmax_savedmodel"
    tf.saved_model.save(sources["softmax"], str(saved))  # the signature's input is named 'inputs'
    with np.load(data["npz"]) as d:
        arrays = {k: d[k] for k in ("x_train", "y_train", "x_val", "y_val")}
    result = export_model(str(saved), **arrays, val_indices=None, repository=tmp_path / "repo",
                          name="sm", progress=False)
    m = result.manifest
    assert m.provenance.output.startswith("logits before the Softmax head")
    assert m.input.name == "inputs" and m.labels == LABELS
    x = data["x_test"]
    xn = ((x - np.asarray(m.normalization.mean)) / np.asarray(m.normalization.std)).astype(np.float32)
    session = ort.InferenceSession(str(result.path / m.artifact), providers=["CPUExecutionProvider"])
    logits = session.run([m.output.name], {m.input.name: xn})[0]
    expected = sources["softmax"].predict(xn, verbose=0)
    np.testing.assert_allclose(softmax(logits, 1.0), expected, atol=1e-5)
    assert not np.allclose(logits.sum(axis=1), 1.0)  # logits, not probabilities
