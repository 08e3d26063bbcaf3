"""`quorum predict`: image conversion, and the command run as a user would, against a real server."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest

from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from service.client.images import load_pixels, to_digit_scale
from tests.e2e.fixtures import Reference
from tests.helpers import ROOT
from tests.server import RunningServer, running_server

MEMBERS = Reference().ensemble_config("digits")["members"]  # of the server tests start


# -- writing test images (the reader is the code under test) ----------------------------------
def _paper(row: np.ndarray, scale: int = 4) -> np.ndarray:
    """A digit as a scan would show it: dark ink on white paper, each value v a uniformly
    grey scale x scale block of darkness v/16."""
    ink = np.kron(row.reshape(8, 8) / 16.0, np.ones((scale, scale)))
    return 1.0 - ink


def _png(path: Path, image: np.ndarray, color: int) -> None:
    """8-bit PNG of colour type 0 (grey), 2 (RGB) or 6 (RGBA), each row with a different filter."""
    gray = np.rint(image * 255).astype(np.int32)
    pixels = {0: gray[..., None], 2: np.stack([gray] * 3, -1),
              6: np.stack([gray] * 3 + [np.full_like(gray, 255)], -1)}[color]
    height, width, channels = pixels.shape
    lines, previous = [], np.zeros(width * channels, dtype=np.int32)
    for y in range(height):
        row = pixels[y].reshape(-1)
        left = np.concatenate([np.zeros(channels, np.int32), row[:-channels]])
        up_left = np.concatenate([np.zeros(channels, np.int32), previous[:-channels]])
        kind = y % 5
        if kind == 0:
            predicted = np.zeros_like(row)
        elif kind == 1:
            predicted = left
        elif kind == 2:
            predicted = previous
        elif kind == 3:
            predicted = (left + previous) // 2
        else:
            p = left + previous - up_left
            pa, pb, pc = np.abs(p - left), np.abs(p - previous), np.abs(p - up_left)
            predicted = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, previous, up_left))
        lines.append(bytes([kind]) + ((row - predicted) & 0xFF).astype(np.uint8).tobytes())
        previous = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"".join(lines))) + chunk(b"IEND", b""))


def _pgm(path: Path, image: np.ndarray, binary: bool) -> None:
    values = np.rint(image * 255).astype(np.uint8)
    height, width = values.shape
    if binary:
        path.write_bytes(f"P5\n# a scanned digit\n{width} {height}\n255\n".encode() + values.tobytes())
    else:
        path.write_text(f"P2\n{width} {height}\n255\n" + "\n".join(" ".join(map(str, r)) for r in values) + "\n")


@pytest.fixture(scope="module")
def rows(test_split) -> tuple[np.ndarray, np.ndarray]:
    """Test-split digits that use the full 0..16 range (so the contrast stretch is a no-op)."""
    x, y = test_split
    keep = [i for i in range(len(x)) if x[i].max() == 16 and x[i].min() == 0][:12]
    return x[keep], y[keep]


# -- conversion ----------------------------------------------------------------------------------
def test_a_scanned_digit_converts_back_to_its_dataset_values(rows):
    x, _ = rows
    for row in x:
        assert np.array_equal(to_digit_scale(_paper(row)), row)  # 4x4 block means, x16
        assert np.array_equal(to_digit_scale(1.0 - _paper(row)), row)  # light ink on dark: no inversion


def test_resizing_averages_areas_for_any_size():
    image = np.zeros((20, 13))
    image[:, 7:] = 1.0  # right part inked: light ink on a dark background
    out = to_digit_scale(image).reshape(8, 8)
    assert out.min() == 0 and out.max() == 16
    assert np.all(np.diff(out, axis=1) >= 0) and np.all(out == out[0])  # columns ramp, rows equal


@pytest.mark.parametrize("kind", ["png-grey", "png-rgb", "png-rgba", "pgm-binary", "pgm-ascii", "npy"])
def test_image_files_are_read(tmp_path, rows, kind):
    row = rows[0][1]
    image = _paper(row, scale=5)  # 40x40
    path = tmp_path / f"digit.{kind.split('-')[0]}"
    if kind.startswith("png"):
        _png(path, image, {"png-grey": 0, "png-rgb": 2, "png-rgba": 6}[kind])
    elif kind.startswith("pgm"):
        _pgm(path, image, binary=kind == "pgm-binary")
    else:
        np.save(path, row.reshape(8, 8))
    assert np.array_equal(load_pixels(path), row)


# -- the command against a real server -----------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("predict-cli")) as s:
        yield s
        assert s.stop() == 0


def quorum(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", "predict", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def _served_labels(server: RunningServer, x: np.ndarray) -> list[str]:
    with grpc.insecure_channel(server.address) as channel:
        response = pb_grpc.EnsembleServiceStub(channel).Predict(pb.PredictRequest(
            model="digits", inputs=pb.Tensor(dtype="FP32", shape=[len(x), 64], content=x.tobytes())), timeout=10)
    return [p.label for p in response.predictions]


def test_predict_digits_index_prints_the_vote_and_member_table(server, split, digits):
    x, y = digits
    test = np.asarray(split["test"])
    served = _served_labels(server, x[test[:20]])
    right = [int(i) for i, label in zip(test[:20], served) if label == str(y[i])][:2]
    assert len(right) == 2
    for index in right:
        done = quorum("--digits-index", str(index), "--address", server.address)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].startswith(f"digits: {y[index]}  confidence ")
        assert f"(expected {y[index]})" in lines[0]
        assert lines[1].split() == ["member", "label", "confidence", "weight", "latency", "ms", "in", "time"]
        members = [line.split() for line in lines[2:2 + len(MEMBERS)]]
        assert sorted(m[0] for m in members) == sorted(MEMBERS)
        assert all(m[-1] == "yes" for m in members)


def test_predict_json_has_every_member_vote(server, rows):
    x, _ = rows
    row = x[2]
    values = ",".join(str(int(v)) for v in row)
    done = quorum("--values", values, "--address", server.address, "--json", "--policy", "majority")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["label"] in [str(d) for d in range(10)] and answer["label"] == str(answer["class_index"])
    assert answer["policy"] == "majority" and answer["model"] == "digits"
    assert [v["member"] for v in answer["member_votes"]] == MEMBERS and answer["members_left_out"] == []
    assert all(v["in_time"] and v["latency_ms"] > 0 and 0 < v["confidence"] <= 1 for v in answer["member_votes"])
    assert abs(sum(answer["probabilities"]) - 1) < 1e-4
    assert answer["input"] == row.tolist()


def test_predict_an_image_file(server, rows, tmp_path):
    x, y = rows
    served = _served_labels(server, x)
    index = next(i for i, label in enumerate(served) if label == str(y[i]))
    path = tmp_path / "digit.png"
    _png(path, _paper(x[index], scale=6), color=2)
    done = quorum(str(path), "--address", server.address, "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["input"] == x[index].tolist()
    assert answer["label"] == str(y[index])


def test_predict_errors_exit_non_zero(server, tmp_path):
    bad = quorum("--values", "1,2,3", "--address", server.address)
    assert bad.returncode == 2
    assert bad.stderr == "quorum predict: --values needs 64 numbers per row for model 'digits' input 'pixels' FP32 [-1, 64], got 3\n"
    jpeg = tmp_path / "photo.jpg"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 16)
    unreadable = quorum(str(jpeg), "--address", server.address)
    assert unreadable.returncode == 2 and unreadable.stderr.startswith("quorum predict: ")
    missing = quorum("--digits-index", "0", "--model", "no_such_model", "--address", server.address)
    assert missing.returncode == 1 and missing.stderr.startswith("quorum predict: NOT_FOUND: ")


def test_the_readme_values_example_works_as_written(server):
    readme = (ROOT / "README.md").read_text()
    (line,) = [line for line in readme.splitlines() if line.startswith(".venv/bin/quorum predict") and "--values" in line]
    command = line.split("#")[0].split()[2:]  # drop `.venv/bin/quorum predict`
    done = quorum(*command, "--address", server.address)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("digits: 0  confidence ")  # the row is digits[0], a zero
