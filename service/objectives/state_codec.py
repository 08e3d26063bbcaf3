"""Bytes for the shared store: a prediction awaiting its label and a labelled row, each one
Redis value (a JSON header line, then the arrays' raw little-endian bytes), so that one GET
or LRANGE reads it whole and decoding costs one json.loads and a few np.frombuffer."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.objectives.store import LiveRow, Uncertain, UncertainOutcome


@dataclass(frozen=True)
class StoredPrediction:
    model: str
    version: int
    labels: tuple[str, ...]
    predicted: np.ndarray
    """(n,) the answer's class index per row."""
    members: dict[str, tuple[int, np.ndarray]]
    """member -> (version, (n, C) calibrated probabilities)."""
    uncertain: Uncertain | None = None
    """The prediction sets and abstentions the answer carried, when asked."""


def stored(result: Any) -> StoredPrediction:
    """What a prediction keeps: the answer and each member's probabilities, shadow members'
    included once their call has answered."""
    versions = {m.name: m.version for m in result.members}
    members = {name: (versions[name], result.member_probabilities[i]) for i, name in enumerate(result.vote.members)}
    for name, (version, task) in result.shadow.items():
        if task.done() and not task.cancelled() and task.exception() is None and task.result() is not None:
            members[name] = (version, task.result())
    return StoredPrediction(result.model, result.version, result.labels, result.vote.label_index, members,
                            result.uncertain)


def encode_prediction(p: StoredPrediction) -> bytes:
    n, classes = len(p.predicted), len(p.labels)
    members = tuple((name, version) for name, (version, _) in p.members.items())
    u = p.uncertain
    asked = (None, None) if u is None else (u.coverage if u.sets is not None else None,
                                            u.max_risk if u.abstained is not None else None)
    parts = [_header(p.model, p.version, p.labels, members, n, *asked),
             np.ascontiguousarray(p.predicted, dtype="<i8").tobytes()]
    for _, probs in p.members.values():
        parts.append(np.ascontiguousarray(probs, dtype="<f4").reshape(n, classes).tobytes())
    if asked[0] is not None:  # the sets, then the abstentions, one byte a value
        parts.append(np.ascontiguousarray(u.sets, dtype=np.uint8).tobytes())  # type: ignore[union-attr]
    if asked[1] is not None:
        parts.append(np.ascontiguousarray(u.abstained, dtype=np.uint8).tobytes())  # type: ignore[union-attr]
    return b"".join(parts)


@functools.lru_cache(maxsize=1024)
def _header(model: str, version: int, labels: tuple[str, ...], members: tuple[tuple[str, int], ...], n: int,
            coverage: float | None = None, max_risk: float | None = None) -> bytes:
    """A prediction's header line; the same for every request of a model, its versions, row
    count and the coverage and risk it asked."""
    header: dict = {"m": model, "v": version, "l": list(labels), "n": n, "s": [list(m) for m in members]}
    if coverage is not None or max_risk is not None:
        header["u"] = [coverage, max_risk]
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
    uncertain = None
    if "u" in header:
        coverage, max_risk = header["u"]
        sets = abstained = None
        if coverage is not None:
            sets = np.frombuffer(body, dtype=np.uint8, count=n * len(labels), offset=offset).reshape(n, -1).astype(bool)
            offset += n * len(labels)
        if max_risk is not None:
            abstained = np.frombuffer(body, dtype=np.uint8, count=n, offset=offset).astype(bool)
        uncertain = Uncertain(coverage, sets, max_risk, abstained)
    return StoredPrediction(header["m"], header["v"], labels, predicted, members, uncertain)


def encode_row(live: LiveRow, correct: bool, separate: bool) -> bytes:
    """A labelled row as the fleet's window keeps it: the truth, whether the model's answer
    was right, whether members count on their own, and each member's probabilities."""
    classes = len(next(iter(live.members.values()))[1]) if live.members else 0
    header = [live.truth, int(correct), int(separate), classes,
              [[name, version] for name, (version, _) in live.members.items()]]
    u = live.uncertain
    if u is not None:  # the row's set and abstention, scored (older rows have no sixth field)
        header.append([u.coverage, int(u.covered), u.max_risk, int(u.answered), int(u.wrong)])
    body = b"".join(np.ascontiguousarray(probs, dtype="<f4").tobytes() for _, probs in live.members.values())
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + body


def decode_row(blob: bytes) -> tuple[LiveRow, bool, bool]:
    head, _, body = blob.partition(b"\n")
    truth, correct, separate, classes, names, *rest = json.loads(head)
    members = {}
    for i, (name, version) in enumerate(names):
        members[name] = (version, np.frombuffer(body, dtype="<f4", count=classes, offset=4 * classes * i))
    uncertain = None
    if rest:
        coverage, covered, max_risk, answered, wrong = rest[0]
        uncertain = UncertainOutcome(coverage, bool(covered), max_risk, bool(answered), bool(wrong))
    return LiveRow(truth, members, uncertain), bool(correct), bool(separate)


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
