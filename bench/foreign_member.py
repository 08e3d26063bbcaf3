"""A member served by a server this project did not write (MLServer 1.7.1), with a local manifest:

    python bench/foreign_member.py [--requests 200]

Needs bench/.venv-mlserver (bench/setup_mlserver.sh, as `make bench` makes it): MLServer serves
digits_mlp_a with bench/mlserver_runtime (the same frozen normalisation and ONNX Runtime as
Quorum's runtime). Server B (Quorum) serves digits_cnn_a and digits_logreg; server C serves the
ensemble `trio` of the three, digits_mlp_a named at MLServer's gRPC port with the variant.json
that `quorum export` wrote for it (`manifest:`); server L serves the same ensemble with every
member in process. It prints whether C answers the digits test split as L does (class indices,
the largest difference of the probabilities, members left out, accuracy), then the median and
p99 latency of one-row requests, one at a time, to each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from sklearn.datasets import load_digits

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.remote_servers import infer, left_out, repository, server_on  # noqa: E402
from tests.helpers import MODELS, SPLIT, free_port  # noqa: E402

MLSERVER = BENCH / ".venv-mlserver" / "bin" / "mlserver"
TRIO = ("digits_mlp_a", "digits_cnn_a", "digits_logreg")


def _latencies(client: grpcclient.InferenceServerClient, rows: np.ndarray, n: int) -> tuple[float, float]:
    seconds = []
    for i in range(n):
        start = time.perf_counter()
        infer(client, "trio", rows[i % len(rows)][None])
        seconds.append(time.perf_counter() - start)
    ms = np.asarray(seconds) * 1e3
    return float(np.median(ms)), float(np.percentile(ms, 99))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200, help="one-row requests timed per server")
    args = p.parse_args()
    if not MLSERVER.is_file():
        raise SystemExit(f"{MLSERVER} is missing: run bench/setup_mlserver.sh first")
    root = Path(tempfile.mkdtemp(prefix="quorum-foreign-"))
    port = free_port()
    mlserver = subprocess.Popen([str(MLSERVER), "start", str(BENCH / "mlserver_runtime")],
                                cwd=BENCH / "mlserver_runtime", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "MLSERVER_GRPC_PORT": str(port),
                                     "MLSERVER_HTTP_PORT": str(free_port()), "MLSERVER_METRICS_PORT": str(free_port())})
    try:
        rb = repository(root / "b", {"digits_cnn_a": "digits_cnn_a", "digits_logreg": "digits_logreg"})
        rl = repository(root / "l", {m: m for m in TRIO}, ensembles={"trio": {"members": list(TRIO), "policy": "stacked"}})
        shutil.copy(MODELS / "digits_mlp_a" / "1" / "variant.json", root / "digits_mlp_a.json")
        with server_on(root, rb, free_port()) as b, server_on(root, rl, free_port()) as local:
            members = [{"name": "digits_mlp_a", "endpoint": f"127.0.0.1:{port}", "version": 1,
                        "manifest": str(root / "digits_mlp_a.json")},
                       {"name": "digits_cnn_a", "endpoint": b.address}, {"name": "digits_logreg", "endpoint": b.address}]
            rc = repository(root / "c", ensembles={"trio": {"members": members, "policy": "stacked"}})
            with server_on(root, rc, free_port()) as c, grpcclient.InferenceServerClient(c.address) as far, \
                    grpcclient.InferenceServerClient(local.address) as near:
                x, y = load_digits(return_X_y=True)
                test = json.loads(SPLIT.read_text())["test"]
                pixels, truth = x[test].astype(np.float32), y[test]
                end = time.monotonic() + 60  # MLServer may start after C first looked: C's watch retries
                while left_out(infer(far, "trio", pixels[:1])) and time.monotonic() < end:
                    time.sleep(0.5)
                got, want = infer(far, "trio", pixels), infer(near, "trio", pixels)
                same = np.array_equal(got.as_numpy("class_index"), want.as_numpy("class_index"))
                gap = float(np.abs(got.as_numpy("probabilities") - want.as_numpy("probabilities")).max())
                print(f"test split ({len(test)} rows): class indices equal: {same}; largest |probability difference|: "
                      f"{gap:.3g}; members left out: {left_out(got) or 'none'}; accuracy with MLServer's member "
                      f"{(got.as_numpy('class_index') == truth).mean():.4f}, all in process "
                      f"{(want.as_numpy('class_index') == truth).mean():.4f}")
                print("| trio, one row at a time | p50 ms | p99 ms |\n|---|---|---|")
                for name, client in (("all members in process", near), ("digits_mlp_a on MLServer, 2 on Quorum B", far)):
                    p50, p99 = _latencies(client, pixels, args.requests)
                    print(f"| {name} | {p50:.2f} | {p99:.2f} |")
                return 0 if same and not left_out(got) else 1
    finally:
        mlserver.terminate()
        mlserver.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
