#!/usr/bin/env bash
# The one prepared command on the GPU host: install the carried wheels, check the GPU and ONNX
# Runtime's CUDA provider, run the GPU tests, bench/gpu_suite.py and a strict batch-invariance
# check, everything into $OUT.
#
#   bash scripts/gpu_run.sh                  # on the GPU host, in the call that carries the last part
#   OUT=/tmp/gpu-run PYTHON=/tmp/hostsim/bin/python bash scripts/gpu_run.sh --device cpu   # dry run, no GPU
#
# The carried parts are read from .gpu-carry/partNN/ (scripts/gpu_carry.py pack; the call
# sequence is in docs/performance.md, "Carrying onnxruntime-gpu to the GPU host") and installed
# into /tmp/site, first on PYTHONPATH. `--device cpu` (or QUORUM_GPU_RUN_DEVICE=cpu) runs the
# same steps on the CPU: the CUDA provider check is skipped with a note, the servers and
# the strict check run on the CPU. Each step has its own timeout, cut to what is left of
# GPU_RUN_BUDGET_S (default 470 s) so the whole ends within about 8 minutes.
#
# What comes back (at most 8 files, 2 folders deep): $OUT/summary.md (one row per step and the
# headline figures), run.log (everything printed), nvidia-smi.txt, strict.json, and
# gpu-suite/{results.json,results.md,runs.tar.gz}. bench/gpu_suite.py writes under /tmp/gpu-suite,
# not $OUT/gpu-suite: it copies the digits repository and one log per server and run under
# --out, far more than 8 files; its results and a tarball of its logs are copied over after.
#
# Environment: PYTHON (default python3, the host's /opt/torch/.venv/bin/python3), OUT (default
# /tmp/gpu-run), GPU_CARRY_PARTS (default .gpu-carry), GPU_CARRY_SITE (default /tmp/site),
# GPU_RUN_BUDGET_S, GPU_SUITE_ARGS (default "--duration 2 --warmup 0.5 --runs 1").

set -uo pipefail
DEVICE=${QUORUM_GPU_RUN_DEVICE:-gpu}
unset QUORUM_GPU_RUN_DEVICE  # not a server setting: the servers it starts refuse unknown QUORUM_* variables
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=${2:-}; shift 2 ;;
        --device=*) DEVICE=${1#*=}; shift ;;
        *) echo "usage: $0 [--device gpu|cpu]" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in gpu|cpu) ;; *) echo "--device must be gpu or cpu, got '$DEVICE'" >&2; exit 2 ;; esac

cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-run}
PARTS=${GPU_CARRY_PARTS:-.gpu-carry}
SITE=${GPU_CARRY_SITE:-/tmp/site}
BUDGET=${GPU_RUN_BUDGET_S:-470}
SUITE_ARGS=${GPU_SUITE_ARGS:---duration 2 --warmup 0.5 --runs 1}
SUITE_TMP=/tmp/gpu-suite
export DEVICE PY OUT SUITE_ARGS SUITE_TMP  # the steps below run as functions in `timeout bash -c`
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
START=$SECONDS
FAILED=0
SUMMARY="$OUT/summary.md"
{
    echo "# scripts/gpu_run.sh --device $DEVICE ($(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname))"
    echo
    echo "| step | status | seconds | note |"
    echo "|---|---|---|---|"
} > "$SUMMARY"

row() {  # row STEP STATUS SECONDS NOTE
    echo "| $1 | $2 | $3 | ${4//|//} |" >> "$SUMMARY"
}

step() {  # step NAME TIMEOUT_S COMMAND...: runs it under what is left of the budget, records a row
    local name=$1 limit=$2 left t0 rc status
    shift 2
    left=$(( BUDGET - (SECONDS - START) ))
    if (( left < 15 )); then
        echo "=== $name: skipped, ${left}s of the ${BUDGET}s budget left"
        row "$name" skipped 0 "no time left in the budget"
        FAILED=$(( FAILED + 1 ))
        return 1
    fi
    (( limit > left )) && limit=$left
    echo
    echo "=== $name (timeout ${limit}s, $(( SECONDS - START ))s into the run)"
    t0=$SECONDS
    # SIGINT, not SIGTERM: Python turns it into KeyboardInterrupt, so gpu_suite.py and pytest stop
    # the servers they started (in sessions of their own, out of reach of timeout's signal).
    timeout -s INT -k 15 "$limit" "$@"
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timed out (${limit}s)" ;;
        *) status="failed (exit $rc)" ;;
    esac
    (( rc != 0 )) && FAILED=$(( FAILED + 1 ))
    echo "=== $name: $status in $(( SECONDS - t0 ))s"
    row "$name" "$status" "$(( SECONDS - t0 ))" "${NOTE:-}"
    NOTE=
    return $rc
}

echo "gpu_run.sh: device $DEVICE, python $PY ($("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)' 2>&1)),"\
     "budget ${BUDGET}s"

# 1. The carried wheels, verified part by part and installed into $SITE.
NOTE="parts from $PARTS into $SITE"
if ! step unpack 150 "$PY" scripts/gpu_carry.py unpack "$PARTS" "$SITE"; then
    echo "gpu_run.sh: the wheels are not installed, nothing else can run (see the unpack line above)"
    exit 1
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# onnxruntime-gpu loads cuBLAS, cuDNN, cuFFT, cuRAND and the CUDA runtime by their sonames: the
# host has them as nvidia-* pip packages (torch's), whose lib folders are not on the loader's path.
NVLIB=$("$PY" - <<'EOF'
import importlib.util, os
spec = importlib.util.find_spec("nvidia")
dirs = set()
for root in (list(spec.submodule_search_locations or []) if spec else []):
    for folder, _, files in os.walk(root):
        if any(f.endswith(".so") or ".so." in f for f in files):
            dirs.add(folder)
print(":".join(sorted(dirs)))
EOF
)
if [ -n "$NVLIB" ]; then
    export LD_LIBRARY_PATH="$NVLIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "LD_LIBRARY_PATH += the nvidia-* packages' $(tr ':' '\n' <<< "$NVLIB" | wc -l) lib folders: $NVLIB"
else
    echo "no nvidia-* package lib folders found for $PY"
fi

# 2. The GPU as the driver sees it.
if [ "$DEVICE" = gpu ] || command -v nvidia-smi > /dev/null; then
    NOTE="$OUT/nvidia-smi.txt"
    QUERY=name,driver_version,memory.total,memory.used,compute_cap,clocks.sm
    step nvidia-smi 30 bash -c "nvidia-smi --query-gpu=$QUERY --format=csv && echo && nvidia-smi" \
        > "$OUT/nvidia-smi.txt" 2>&1
    cat "$OUT/nvidia-smi.txt"
else
    echo "no nvidia-smi here (--device cpu): skipped" | tee "$OUT/nvidia-smi.txt"
    row nvidia-smi skipped 0 "--device cpu, no nvidia-smi on this machine"
fi

# 3. ONNX Runtime from $SITE, its providers, and one session that really runs on CUDA.
providers() {
    GPU_RUN_DEVICE=$DEVICE "$PY" - <<'EOF'
import os, sys
import numpy as np
import onnxruntime as ort

device = os.environ["GPU_RUN_DEVICE"]
available = ort.get_available_providers()
print(f"onnxruntime {ort.__version__} from {os.path.dirname(ort.__file__)}; device {ort.get_device()}; "
      f"available providers {available}")
model = "models/digits_mlp_a/1/model.onnx"
rows = np.random.default_rng(0).uniform(0, 16, (64, 64)).astype(np.float32)
cpu = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
name = cpu.get_inputs()[0].name
expected = cpu.run(None, {name: rows})[0]
if device != "gpu":
    print("device cpu: the CUDAExecutionProvider check is skipped (a dry run without a GPU); "
          f"CUDAExecutionProvider {'is' if 'CUDAExecutionProvider' in available else 'is not'} among the "
          "providers this onnxruntime was built with")
    sys.exit(0)
if "CUDAExecutionProvider" not in available:
    print("FAIL: CUDAExecutionProvider is not among the available providers: not onnxruntime-gpu?")
    sys.exit(1)
session = ort.InferenceSession(model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
got = session.get_providers()
print(f"session providers {got}; CUDA options {session.get_provider_options().get('CUDAExecutionProvider')}")
if got[0] != "CUDAExecutionProvider":
    print("FAIL: the session fell back to the CPU (CUDA, cuDNN or cuBLAS libraries not found?); "
          f"LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH')}")
    if hasattr(ort, "preload_dlls"):  # diagnosis only: would ONNX Runtime's own search find them?
        try:
            ort.preload_dlls()
            retry = ort.InferenceSession(model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            print(f"after onnxruntime.preload_dlls(): session providers {retry.get_providers()}")
        except Exception as exc:
            print(f"onnxruntime.preload_dlls() failed: {exc}")
    sys.exit(1)
out = session.run(None, {name: rows})[0]
print(f"CUDA vs CPU on 64 rows: max |difference| {float(np.abs(out - expected).max()):.3g}")
EOF
}
NOTE="onnxruntime from $SITE; CUDAExecutionProvider listed and a session on it"
[ "$DEVICE" = cpu ] && NOTE="--device cpu: CUDA provider check skipped"
export -f providers
step providers 90 bash -c providers

# 4. Strict batch invariance on the device: each ONNX variant's rows alone vs. in a shuffled batch
#    of 64, the same batch twice, and the ONNX ensemble's concurrent 1-3 row requests (merged by
#    the batchers) vs. the same rows alone, through the data plane. Bitwise in strict mode.
strict() {
    GPU_RUN_DEVICE=$DEVICE OUT=$OUT "$PY" - <<'EOF'
import asyncio, json, os, shutil, sys, tempfile, time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from service.dataplane import DataPlane
from service.monitoring.statistics import Statistics
from service.repository.manager import ModelManager
from service.repository.manifest import load_manifest
from service.runtimes import RuntimeOptions, create_runtime
from service.settings import Settings

device = os.environ["GPU_RUN_DEVICE"]
concrete = "gpu:0" if device == "gpu" else "cpu"
MEMBERS = ["digits_mlp_a", "digits_cnn_a", "digits_logreg"]
x = load_digits().data.astype(np.float32)
rows = x[:64]
report: dict = {"device": device, "variants": {}, "ensemble": {}}
ok = True


def load(folder: Path, device: str, mode: str):
    runtime = create_runtime(folder, load_manifest(folder), RuntimeOptions(device=device, batch_invariance=mode,
                                                                          max_batch_size=64))
    asyncio.run(runtime.load())
    return runtime


def deviation(predict, rows: np.ndarray) -> float:
    alone = np.concatenate([predict(rows[i:i + 1]) for i in range(len(rows))])
    order = np.random.default_rng(0).permutation(len(rows))
    together = np.empty_like(alone)
    together[order] = predict(rows[order])
    return float(np.max(np.abs(alone.astype(np.float64) - together.astype(np.float64))))


for name in MEMBERS:
    folder = Path("models") / name / "1"
    reference = load(folder, "cpu", "strict")
    on_cpu = reference.predict_sync(rows)
    asyncio.run(reference.unload())
    for mode in ("strict", "tolerant"):
        runtime = load(folder, concrete, mode)
        session = getattr(runtime, "_session", None)
        first, second = runtime.predict_sync(rows), runtime.predict_sync(rows)
        entry = {"device": getattr(runtime, "device", "?"),
                 "providers": session.get_providers() if session is not None else None,
                 "cuda_options": (session.get_provider_options().get("CUDAExecutionProvider")
                                  if session is not None else None),
                 "alone_vs_batched_max_abs": deviation(runtime.predict_sync, rows),
                 "same_batch_twice_bitwise": bool(np.array_equal(first, second)),
                 "vs_cpu_max_abs": float(np.abs(first.astype(np.float64) - on_cpu).max())}
        asyncio.run(runtime.unload())
        report["variants"][f"{name}/{mode}"] = entry
        if entry["device"] != concrete:
            ok = False
        if mode == "strict" and (entry["alone_vs_batched_max_abs"] != 0.0 or not entry["same_batch_twice_bitwise"]):
            ok = False
        print(f"{name:14s} {mode:8s} on {entry['device']:6s} alone vs batched {entry['alone_vs_batched_max_abs']:.3g}, "
              f"same batch twice bitwise {entry['same_batch_twice_bitwise']}, vs CPU {entry['vs_cpu_max_abs']:.3g}",
              flush=True)


async def ensemble(repo: Path) -> dict:
    statistics = Statistics()
    manager = ModelManager(Settings(model_repository=repo, poll_interval_s=0, device=device,
                                    batch_invariance="strict"), statistics)
    await manager.start()
    data = DataPlane(manager)
    sizes = np.random.default_rng(0).integers(1, 4, 120)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) % (len(x) - 3)
    requests = [x[s:s + n] for s, n in zip(starts, sizes)]
    try:
        devices = {m: manager.resolve(m).device for m in MEMBERS}
        alone = [(await data.infer("digits_onnx", r)).vote.probabilities for r in requests]
        statistics.models.clear()
        t0 = time.perf_counter()
        together = await asyncio.gather(*(data.infer("digits_onnx", r) for r in requests))
        seconds = time.perf_counter() - t0
    finally:
        await manager.stop()
    batches = [size for stats in statistics.models.values() for size in getattr(stats, "batches", [])]
    return {"member_devices": devices, "requests": len(requests), "largest_batch": max(batches, default=0),
            "concurrent_s": round(seconds, 4),
            "alone_vs_merged_max_abs": max(float(np.abs(a - t.vote.probabilities).max())
                                           for a, t in zip(alone, together))}


with tempfile.TemporaryDirectory() as tmp:
    repo = Path(tmp)
    for name in MEMBERS:
        shutil.copytree(Path("models") / name, repo / name)
    (repo / "digits_onnx").mkdir()
    (repo / "digits_onnx" / "ensemble.yaml").write_text(f"members: [{', '.join(MEMBERS)}]\n")
    try:
        report["ensemble"] = asyncio.run(ensemble(repo))
    except Exception as exc:  # e.g. members that could not load on the device
        report["ensemble"] = {"error": f"{type(exc).__name__}: {exc}"}
e = report["ensemble"]
if "error" in e:
    print(f"digits_onnx strict: {e['error']}")
    ok = False
else:
    print(f"digits_onnx strict, {e['requests']} concurrent requests of 1-3 rows (largest batch {e['largest_batch']}) "
          f"vs alone: max |difference| {e['alone_vs_merged_max_abs']:.3g}; members on {e['member_devices']}")
    if (e["alone_vs_merged_max_abs"] != 0.0 or e["largest_batch"] <= 3
            or set(e["member_devices"].values()) != {concrete}):
        ok = False
report["bitwise_in_strict_mode"] = ok
Path(os.environ["OUT"], "strict.json").write_text(json.dumps(report, indent=1) + "\n")
print("strict batch invariance:", "bitwise on " + concrete if ok else "FAILED (see strict.json)")
sys.exit(0 if ok else 1)
EOF
}
NOTE="$OUT/strict.json"
export -f strict
step strict 90 bash -c strict

# 5. The suite: floor, Quorum on both engines with --device, the ONNX digits ensemble, MobileNetV2
#    where bench/repo travelled, and the in-process ONNX Runtime ceiling on the same provider.
suite() {
    rm -rf "$SUITE_TMP"
    # shellcheck disable=SC2086  # GPU_SUITE_ARGS is a list of arguments
    "$PY" bench/gpu_suite.py --out "$SUITE_TMP" --device "$DEVICE" $SUITE_ARGS
    local rc=$?
    mkdir -p "$OUT/gpu-suite"
    cp "$SUITE_TMP"/results.json "$SUITE_TMP"/results.md "$OUT/gpu-suite/" 2>/dev/null
    [ -d "$SUITE_TMP/runs" ] && tar -czf "$OUT/gpu-suite/runs.tar.gz" -C "$SUITE_TMP" runs
    return $rc
}
NOTE="$OUT/gpu-suite/results.md ($SUITE_ARGS)"
export -f suite
step gpu-suite 200 bash -c suite

# 6. The tests whose outcome depends on a GPU (each takes its GPU branch where one is visible):
#    placement (device=gpu lands on gpu:0), the GPU series in /metrics, QUORUM_DEVICE_OVERRIDES
#    placing one variant on the GPU in a real server, and the placement rules.
NOTE="placement, GPU metrics, device overrides end to end"
step gpu-tests 150 "$PY" -m pytest -q -p no:randomly -p no:cacheprovider --timeout 120 -rs \
    tests/repository/test_placement.py \
    tests/monitoring/test_metrics.py::test_gpu_metrics_are_there_with_a_gpu_and_absent_without \
    tests/e2e/test_user_paths.py::test_device_overrides_place_one_variant \
    tests/runtimes/test_runtimes.py::test_device_placement_spreads_over_gpus_and_falls_back_to_cpu

# What comes back: at most 8 files, no deeper than $OUT/a/b/file.
{
    echo
    [ -f "$OUT/strict.json" ] && \
        echo "Strict batch invariance: $(grep -o '"bitwise_in_strict_mode": [a-z]*' "$OUT/strict.json")"
    if [ -f "$OUT/gpu-suite/results.md" ]; then
        echo
        cat "$OUT/gpu-suite/results.md"
    fi
} >> "$SUMMARY"
echo
echo "=== summary ($(( SECONDS - START ))s, $FAILED step(s) not ok)"
cat "$SUMMARY"
FILES=$(find "$OUT" -type f | wc -l)
echo "$FILES files under $OUT (at most 8 come back):"
find "$OUT" -type f -printf '  %P %s bytes\n'
(( FILES > 8 )) && echo "warning: more than 8 files under $OUT: some will not come back"
(( FAILED == 0 ))
