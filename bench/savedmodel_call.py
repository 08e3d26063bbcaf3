"""What a SavedModel member costs per batch as a prepared graph call against its signature call,
side by side in one process, rounds alternating:

    python bench/savedmodel_call.py [--model-repository models] [--model digits] [--calls 600] [--rounds 4]

Serves the repository on the CPU in this process (the data plane, no transport) and times
lone one-row requests to --model, once with every SavedModel member on its prepared call
(service/runtimes/tensorflow.py) and once with the same members on their signature call,
the order alternating by round; prints the median wall and CPU microseconds per request of
each, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.dataplane import DataPlane  # noqa: E402
from service.repository.manager import ModelManager  # noqa: E402
from service.settings import Settings  # noqa: E402


async def measure(args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    manager = ModelManager(Settings(model_repository=args.model_repository, poll_interval_s=0, device="cpu"))
    data = DataPlane(manager)
    await manager.start()
    try:
        served = [v for m in manager.variants.values() for v in m.versions.values()
                  if v.runtime.framework == "savedmodel"]
        prepared = {id(v): v.runtime._call for v in served}
        print("SavedModel members:", ", ".join(f"{v.manifest.name} (prepared: {prepared[id(v)] is not None})"
                                               for v in served) or "none")
        row = np.random.default_rng(0).random((1, 64), dtype=np.float32) * 16
        results: dict[str, list[tuple[float, float]]] = {"prepared": [], "signature": []}
        for round_no in range(args.rounds):
            for mode in ("prepared", "signature") if round_no % 2 == 0 else ("signature", "prepared"):
                for v in served:
                    v.runtime._call = prepared[id(v)] if mode == "prepared" else None
                for _ in range(args.calls // 10):  # warm
                    await data.infer(args.model, row)
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(args.calls):
                    await data.infer(args.model, row)
                results[mode].append(((time.perf_counter() - wall) / args.calls * 1e6,
                                      (time.process_time() - cpu) / args.calls * 1e6))
        for v in served:
            v.runtime._call = prepared[id(v)]
        return results
    finally:
        await manager.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="digits")
    p.add_argument("--calls", type=int, default=600, help="lone requests per mode and round")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    results = asyncio.run(measure(args))
    print("| call | wall us/request | CPU us/request |\n|---|---|---|")
    medians = {}
    for mode, values in results.items():
        medians[mode] = (statistics.median(w for w, _ in values), statistics.median(c for _, c in values))
        print(f"| {mode} | {medians[mode][0]:.0f} | {medians[mode][1]:.0f} |")
    wall = medians["prepared"][0] / medians["signature"][0]
    cpu = medians["prepared"][1] / medians["signature"][1]
    print(f"\nprepared / signature: wall {wall:.3f}, CPU {cpu:.3f} (medians over {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
