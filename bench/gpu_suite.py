"""The benchmark suite on a GPU host: `python bench/gpu_suite.py` (needs onnxruntime-gpu).

    python bench/gpu_suite.py [--duration 5] [--runs 2] [--out bench/results-gpu] [--device gpu]

Side by side in one run, as bench/run_suite.py does on the CPU: the bare grpc.aio floor,
Quorum on the native and the grpcio engine serving the ONNX digits variants with
`--device gpu`, Quorum serving the MobileNetV2 ensemble (bench/make_mobilenet.py; skipped
with a note where bench/repo is missing: building it needs TensorFlow), and the in-process
ceiling, ONNX Runtime on CUDA with no RPC (bench/ceiling.py --provider cuda). The digits
repository is the bundled ONNX variants only (digits_mlp_a, digits_cnn_a, digits_logreg and
their ensemble `digits_onnx`): a GPU host need not have TensorFlow, and SavedModels run on
the CPU anyway. Each server's `quorum_model_info` says which device each variant runs on;
the report lists it. Writes results.json and results.md under --out.

`--device cpu` runs the same suite on the CPU (to try the command on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_suite import (IMAGE_SHAPE, MOBILENET_REPO, MOBILENETS, PY, ROOT, Config, Server,  # noqa: E402
                       free_port, machine, median_ceiling, median_result, mobilenet_input_name, run_ceiling,
                       run_load, start_all)

ONNX_MEMBERS = ["digits_mlp_a", "digits_cnn_a", "digits_logreg"]
ENSEMBLE = "digits_onnx"


def onnx_repository(where: Path) -> Path:
    """The bundled ONNX digits variants and an ensemble of them, as a repository of its own."""
    repo = where / "repo-digits-onnx"
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    for name in ONNX_MEMBERS:
        shutil.copytree(ROOT / "models" / name, repo / name)
    (repo / ENSEMBLE).mkdir()
    (repo / ENSEMBLE / "ensemble.yaml").write_text(f"members: [{', '.join(ONNX_MEMBERS)}]\n")
    return repo


def devices(metrics_port: int) -> dict[str, str]:
    """Which device each loaded variant runs on, from the server's own quorum_model_info."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("quorum_model_info{"):
            labels = dict(kv.split("=", 1) for kv in line[line.index("{") + 1:line.index("}")].split(","))
            labels = {k: v.strip('"') for k, v in labels.items()}
            found[f"{labels['model']}/{labels['version']}"] = f"{labels['device']} ({labels['framework']})"
    return found


def gpu_name() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return done.stdout.strip() or done.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi unavailable: {exc}"


def ratio(num: dict | None, den: dict | None, key: str = "throughput_rps") -> float | None:
    if not num or not den or "failed" in num or "failed" in den or not den.get(key):
        return None
    return round(num[key] / den[key], 3)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, GPU {report['gpu']}; onnxruntime "
             f"{report['onnxruntime']} ({', '.join(report['ort_providers'])}); {m['date']}.",
             f"Command: `{report['command']}` ({report['duration_s']:g} s per run, median of "
             f"{report['rounds']} rounds, wall {report['wall_s']:.0f} s).", "",
             "| server | model | load | req/s | rows/s | p50 ms | p99 ms | errors | server CPU µs/req |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "failed" in r:
            lines.append(f"| {r['server']} | {r['model']} | {r['key'].rsplit('/', 1)[1]} | failed: "
                         f"{r['failed'][:80]} | | | | | |")
            continue
        lat, cpu = r["latency_ms"], r.get("server_cpu_us_per_req")
        lines.append(f"| {r['server']} | {r['model']} | c={r['concurrency']} | {r['throughput_rps']:.0f} "
                     f"| {r['rows_per_s']:.0f} | {lat['p50']:.2f} | {lat['p99']:.2f} | "
                     f"{sum(r['errors'].values())} | {'' if cpu is None else f'{cpu:.0f}'} |")
    lines += ["", "| in-process ceiling | batch | rows/s | ms per call | provider |", "|---|---|---|---|---|"]
    for name, rows in report["ceiling"].items():
        for c in rows:
            lines.append(f"| {name} | {c['batch']} | {c['rows_per_s']:.0f} | {c['ms_per_call']:.3f} | {c['provider']} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["ratios"].items()]
    lines += ["", "| server | variant | device |", "|---|---|---|"]
    for server, found in report["devices"].items():
        lines += [f"| {server} | {variant} | {device} |" for variant, device in sorted(found.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--runs", type=int, default=2, help="rounds; figures are medians")
    p.add_argument("--out", type=Path, default=BENCH / "results-gpu")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    args = p.parse_args(argv)
    import onnxruntime as ort

    provider = "cuda" if args.device == "gpu" else "cpu"
    if args.device == "gpu" and "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider ({ort.get_available_providers()}): "
              "install the gpu extra (onnxruntime-gpu) on a host with an NVIDIA GPU", file=sys.stderr)
        return 2
    out: Path = args.out
    (out / "runs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    digits_repo = onnx_repository(out)
    with_mobilenet = (MOBILENET_REPO / "mobilenets" / "ensemble.yaml").is_file()
    if not with_mobilenet:
        print(f"note: {MOBILENET_REPO} missing (bench/make_mobilenet.py, needs TensorFlow); MobileNetV2 skipped",
              flush=True)

    serve = [PY, "-m", "service.cli", "serve", "--device", args.device, "--poll-interval", "0", "--http-port", "0"]
    servers: dict[str, Server] = {}
    metrics: dict[str, int] = {}

    def add(name: str, repo: Path, extra: list[str], **kw) -> None:
        port, metrics[name] = free_port(), free_port()
        servers[name] = Server(name, serve + ["--model-repository", str(repo), "--grpc-port", str(port),
                                              "--metrics-port", str(metrics[name]), *extra], port, **kw)

    port = free_port()
    servers["floor"] = Server("floor", [PY, str(BENCH / "floor_server.py"), "--port", str(port)], port)
    add("quorum-native", digits_repo, ["--grpc-engine", "native"])
    add("quorum", digits_repo, ["--grpc-engine", "grpcio"])
    image_input = "input"
    if with_mobilenet:
        image_input = mobilenet_input_name()
        add("quorum-mobilenet", MOBILENET_REPO, ["--grpc-engine", "native"], ready_model="mobilenets",
            ready_shape=IMAGE_SHAPE, ready_input=image_input)

    image = dict(shape=IMAGE_SHAPE, input_name=image_input)
    cfgs = [Config("digits", "floor", "digits_mlp_a", concurrency=c) for c in (1, 64)]
    cfgs += [Config("digits", "quorum-native", m, concurrency=c) for m in ("digits_mlp_a", ENSEMBLE) for c in (1, 64)]
    cfgs += [Config("digits", "quorum", m, concurrency=64) for m in ("digits_mlp_a", ENSEMBLE)]
    if with_mobilenet:
        cfgs += [Config("mobilenet", "floor", "mobilenets", concurrency=8, **image)]
        cfgs += [Config("mobilenet", "quorum-mobilenet", "mobilenets", concurrency=c, **image) for c in (1, 8, 32)]
    runs: dict[str, list[dict]] = {c.key: [] for c in cfgs}
    ceilings: dict[str, list[list[dict]]] = {"digits_mlp_a": [], ENSEMBLE: [], "mobilenets": []}
    found: dict[str, dict[str, str]] = {}
    try:
        start_all(servers, out)
        found = {name: devices(port) for name, port in metrics.items()}
        for name, variants in found.items():
            print(f"{name}: {variants}", flush=True)
        for round_no in range(args.runs):
            print(f"round {round_no + 1}/{args.runs}", flush=True)
            for cfg in cfgs:
                runs[cfg.key].append(run_load(cfg, servers[cfg.server], args.duration, args.warmup, out, round_no))
            short = min(args.duration, 2.0)
            ceilings["digits_mlp_a"].append(run_ceiling([digits_repo / "digits_mlp_a" / "1"], "1,64", short, provider))
            ceilings[ENSEMBLE].append(run_ceiling([digits_repo / m / "1" for m in ONNX_MEMBERS], "1,64", short, provider))
            if with_mobilenet:
                ceilings["mobilenets"].append(run_ceiling([MOBILENET_REPO / m / "1" for m in MOBILENETS],
                                                          "1,8,32", args.duration, provider))
    finally:
        for s in servers.values():
            s.stop()

    results = [dict(median_result(runs[c.key]), server=c.server, key=c.key) for c in cfgs]
    ceiling = {name: median_ceiling(rounds) for name, rounds in ceilings.items() if rounds}
    by = {r["key"]: r for r in results}

    def get(server: str, model: str, c: int) -> dict | None:
        return by.get(f"{server}/v2/{model}/c{c}")

    def ceil(name: str, batch: int) -> dict | None:
        row = next((c for c in ceiling.get(name, []) if c["batch"] == batch), None)
        return row and {"rows_per_s": row["rows_per_s"]}

    floor64, floor1 = get("floor", "digits_mlp_a", 64), get("floor", "digits_mlp_a", 1)
    ratios = {
        "native one member c=64 / floor c=64": ratio(get("quorum-native", "digits_mlp_a", 64), floor64),
        "grpcio one member c=64 / floor c=64": ratio(get("quorum", "digits_mlp_a", 64), floor64),
        "native one member c=1 / floor c=1": ratio(get("quorum-native", "digits_mlp_a", 1), floor1),
        f"native {ENSEMBLE} c=64 / floor c=64": ratio(get("quorum-native", ENSEMBLE, 64), floor64),
        f"grpcio {ENSEMBLE} c=64 / floor c=64": ratio(get("quorum", ENSEMBLE, 64), floor64),
        "native one member c=64 rows/s / ceiling batch 64": ratio(get("quorum-native", "digits_mlp_a", 64),
                                                                ceil("digits_mlp_a", 64), "rows_per_s"),
        f"native {ENSEMBLE} c=64 rows/s / ceiling batch 64": ratio(get("quorum-native", ENSEMBLE, 64),
                                                                  ceil(ENSEMBLE, 64), "rows_per_s"),
    }
    if with_mobilenet:
        best = max((get("quorum-mobilenet", "mobilenets", c) or {"rows_per_s": 0} for c in (1, 8, 32)),
                   key=lambda r: r.get("rows_per_s", 0))
        top = max(ceiling.get("mobilenets", []), key=lambda c: c["rows_per_s"], default=None)
        ratios["MobileNetV2 x3 best rows/s / best ceiling"] = ratio(best, top and {"rows_per_s": top["rows_per_s"]},
                                                                   "rows_per_s")
    report = {"machine": machine(), "gpu": gpu_name(), "onnxruntime": ort.__version__,
              "ort_providers": ort.get_available_providers(),
              "command": " ".join(["python", "bench/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])]),
              "duration_s": args.duration, "rounds": args.runs, "results": results, "ceiling": ceiling,
              "ratios": ratios, "devices": found, "wall_s": time.monotonic() - started}
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / "results.md").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
