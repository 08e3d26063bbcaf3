"""What prediction sets cost: the same in-process load with and without a coverage asked,
side by side in one process, rounds alternating:

    python bench/uncertainty_cost.py [--model digits] [--concurrency 64] [--calls 6400] [--rounds 3]

Each round measures v2 ModelInfer calls through the wrapped servicer (bench/inprocess.py's
`measure`: the server's own objects, no transport) from --concurrency callers at once, so
requests batch as at that concurrency; first plain, then with `coverage` 0.9, then with
`coverage` 0.9 and `max_risk` 0.05. Prints each mean time per request and its ratio to the
plain one of the same round (1.05 would be 5% slower).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inprocess import measure  # noqa: E402

ASKS = {"plain": None, "coverage 0.9": {"coverage": 0.9}, "coverage 0.9 + max_risk 0.05": {"coverage": 0.9,
                                                                                           "max_risk": 0.05}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--calls", type=int, default=6400)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    ratios: dict[str, list[float]] = {name: [] for name in ASKS}
    print(f"| round | asked | us per request | x plain |\n|---|---|---|---|")
    for round_no in range(args.rounds):
        plain = None
        for name, parameters in ASKS.items():
            result = asyncio.run(measure(args.model, args.calls, 1, False, args.concurrency, parameters))
            us = result["median_us"]
            plain = us if plain is None else plain
            ratios[name].append(us / plain)
            print(f"| {round_no + 1} | {name} | {us:.1f} | {us / plain:.3f} |", flush=True)
    print()
    for name, values in ratios.items():
        print(f"{name}: median x plain {statistics.median(values):.3f} over {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
