"""Bytes for the shared store: a prediction awaiting its label and a labelled row, each one
Redis value (a JSON header line, then the arrays' raw little-endian bytes), so that one GET
or LRANGE reads it whole and decoding costs one json.loads and a few np.frombuffer."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np

from service.objectives.store import LiveRow


@dataclass(frozen=True)
class StoredPrediction:
    model: str
    version: int
    labels: tuple[str, ...]
    predicted: np.ndarray
    """(n,) the answer's class index per row."""
    members: dict[str, tuple[int, np.ndarray]]
    """member -> (version, (n, C) calibrated probabilities)."""


def encode_prediction(p: StoredPrediction) -> bytes:
    n, classes = len(p.predicted), len(p.labels)
    members = tuple((name, version) for name, (version, _) in p.members.items())
    parts = [_header(p.model, p.version, p.labels, members, n), np.ascontiguousarray(p.predicted, dtype="<i8").tobytes()]
    for _, probs in p.members.values():
        parts.append(np.ascontiguousarray(probs, dtype="<f4").reshape(n, classes).tobytes())
    return b"".join(parts)


@functools.lru_cache(maxsize=1024)
def _header(model: str, version: int, labels: tuple[str, ...], members: tuple[tuple[str, int], ...], n: int) -> bytes:
    """A prediction's header line; the same for every request of a model, its versions and row count."""
    header = {"m": model, "v": version, "l": list(labels), "n": n, "s": [list(m) for m in members]}
    return json.dumps(header, separators=(",", ":")).encode() + b"\n"


def decode_prediction(blob: bytes) -> StoredPrediction:
    head, _, body = blob.partition(b"\n")
    header = json.loads(head)
    n, labels = header["n"], tuple(header["l"])
    predicted = np.frombuffer(body, dtype="<i8", count=n)
    offset, size = 8 * n, 4 * n * len(labels)
    members = {}
    for name, version in header["s"]:
        probs = np.frombuffer(body, dtype="<f4", count=n * len(labels), offset=offset).reshape(n, len(labels))
        members[name] = (version, probs)
        offset += size
    return StoredPrediction(header["m"], header["v"], labels, predicted, members)


def encode_row(live: LiveRow, correct: bool, separate: bool) -> bytes:
    """A labelled row as the fleet's window keeps it: the truth, whether the model's answer
    was right, whether members count on their own, and each member's probabilities."""
    classes = len(next(iter(live.members.values()))[1]) if live.members else 0
    header = [live.truth, int(correct), int(separate), classes,
              [[name, version] for name, (version, _) in live.members.items()]]
    body = b"".join(np.ascontiguousarray(probs, dtype="<f4").tobytes() for _, probs in live.members.values())
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + body


def decode_row(blob: bytes) -> tuple[LiveRow, bool, bool]:
    head, _, body = blob.partition(b"\n")
    truth, correct, separate, classes, names = json.loads(head)
    members = {}
    for i, (name, version) in enumerate(names):
        members[name] = (version, np.frombuffer(body, dtype="<f4", count=classes, offset=4 * classes * i))
    return LiveRow(truth, members), bool(correct), bool(separate)


def window_accuracy(model: str, rows: list[tuple[LiveRow, bool, bool]]) -> dict[str, tuple[float | None, int]]:
    """Live accuracy over the window's rows, keyed as the in-process store keys it: the model,
    and "model/member" for each member's own vote."""
    hits: dict[str, list[int]] = {}
    for live, correct, separate in rows:
        model_hits = hits.setdefault(model, [0, 0])
        model_hits[0] += correct
        model_hits[1] += 1
        if separate:
            for member, (_, probs) in live.members.items():
                member_hits = hits.setdefault(f"{model}/{member}", [0, 0])
                member_hits[0] += int(probs.argmax()) == live.truth
                member_hits[1] += 1
    return {key: (right / seen if seen else None, seen) for key, (right, seen) in hits.items()}
