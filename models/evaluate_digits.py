"""Evaluate the bundled digits repository on its saved test split, through Quorum's own
runtimes and data plane, and print the README tables.

    python models/evaluate_digits.py [--repository models] [--batch-invariance strict]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a plain checkout

import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from service.dataplane import DataPlane  # noqa: E402
from service.evaluation import POLICIES, _chunked, member_scores  # noqa: E402
from service.export.calibration import accuracy, ece  # noqa: E402
from service.repository.manager import ModelManager  # noqa: E402
from service.settings import Settings  # noqa: E402


def test_split(repository: Path) -> tuple[np.ndarray, np.ndarray]:
    split = json.loads((repository / "digits_split.json").read_text())
    data = load_digits()
    index = np.asarray(split["test"])
    return data.data[index].astype(np.float32), data.target[index]


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


async def evaluate(repository: Path, batch_invariance: str) -> str:
    manager = ModelManager(Settings(model_repository=repository, poll_interval_s=0, device="cpu",
                                    batch_invariance=batch_invariance))
    await manager.start()
    try:
        data = DataPlane(manager)
        rows, labels = test_split(repository)
        members = await member_scores(data, "digits", rows, labels)
        member_probs = {m.name: await _chunked(data, m.name, rows, 64) for m in members}
        votes = {policy: await _chunked(data, "digits", rows, 64, policy=policy) for policy in POLICIES}
        calibration = manager.ensemble("digits").calibration.policies
    finally:
        await manager.stop()
    lines = [f"Test split: {len(labels)} images (models/digits_split.json).", "",
             "| variant | format | T | test accuracy | ECE before | ECE after | NLL |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {m.name} | {m.framework} | {m.temperature:.3f} | {m.accuracy:.2%} | "
              f"{m.ece_uncalibrated:.4f} | {m.ece_calibrated:.4f} | {_nll(member_probs[m.name], labels):.4f} |"
              for m in members]
    best = max(members, key=lambda m: m.accuracy)
    lines += ["", "| policy | vote T | test accuracy | ECE | NLL | validation ECE before -> after | "
              "validation NLL before -> after |", "|---|---|---|---|---|---|---|",
              f"| best single member ({best.name}) | | {best.accuracy:.2%} | {best.ece_calibrated:.4f} | "
              f"{_nll(member_probs[best.name], labels):.4f} | | |"]
    for policy, probs in votes.items():
        c = calibration[policy]
        lines.append(f"| {policy} | {c.temperature:.3f} | {accuracy(probs, labels):.2%} | {ece(probs, labels):.4f} | "
                     f"{_nll(probs, labels):.4f} | {c.ece_before:.4f} -> {c.ece_after:.4f} | "
                     f"{c.nll_before:.4f} -> {c.nll_after:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--batch-invariance", choices=["strict", "tolerant"], default="tolerant")
    args = parser.parse_args()
    print(asyncio.run(evaluate(args.repository, args.batch_invariance)))


if __name__ == "__main__":
    main()
