"""The standard benchmark suite, side by side on one machine: `make bench`.

    python bench/run_suite.py [--duration 5] [--runs 2] [--out bench/results] [--quick]

Starts every server first (the floor, MLServer, Quorum on the bundled digits repository,
Quorum on the MobileNetV2 bench repository), waits until each answers, then runs every
configuration against every server in rounds, so that the runs of one round see the
same machine; each figure is the median over the rounds. The in-process ceiling (ONNX
Runtime, no RPC) is measured in the same rounds. Each load run is bench/loadgen.py in
its own process. Writes results.json, results.md and latency_throughput.png under --out.

Prerequisites: bench/setup_mlserver.sh (MLServer's own virtualenv; skipped with a note if
it is missing) and bench/make_mobilenet.py (the MobileNetV2 repository; built on first
use, about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable
MLSERVER = BENCH / ".venv-mlserver" / "bin" / "mlserver"
MOBILENET_REPO = BENCH / "repo"
MOBILENETS = ["mobilenet_v2_a", "mobilenet_v2_b", "mobilenet_v2_c"]
DIGITS_SHAPE = "1,64"
IMAGE_SHAPE = "1,224,224,3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    ready_model: str = "digits_mlp_a"
    ready_shape: str = DIGITS_SHAPE
    ready_input: str = "pixels"
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def start(self, out: Path) -> None:
        self.log = out / f"server-{self.name}.log"
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **self.env}
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Until one real inference answers (readiness alone says nothing about warm-up)."""
        sys.path.insert(0, str(BENCH))
        import grpc
        import loadgen

        method, _ = loadgen.METHODS["v2"]
        shape = tuple(int(d) for d in self.ready_shape.split(","))
        payload = loadgen.make_request("v2", self.ready_model, shape, self.ready_input)
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log}")
            try:
                with grpc.insecure_channel(f"localhost:{self.port}", options=[
                        ("grpc.max_send_message_length", 64 << 20)]) as ch:
                    ch.unary_unary(method)(payload, timeout=30)
                return
            except grpc.RpcError as exc:
                if time.monotonic() > end:
                    raise RuntimeError(f"{self.name} not ready after {timeout}s: {exc}") from exc
                time.sleep(1.0)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def start_all(servers: dict[str, Server], out: Path) -> None:
    """Start every server first, then wait for each: their warm-ups overlap."""
    for s in servers.values():
        s.start(out)
    for s in servers.values():
        s.wait_ready()
        print(f"{s.name} ready on port {s.port} (pid {s.proc.pid})", flush=True)


def mobilenet_input_name() -> str:
    manifest = json.loads((MOBILENET_REPO / MOBILENETS[0] / "1" / "variant.json").read_text())
    return manifest["inputs"][0]["name"]


@dataclass(frozen=True)
class Config:
    group: str          # "digits" or "mobilenet": which plot and table
    server: str
    model: str
    protocol: str = "v2"
    concurrency: int | None = None
    rate: float | None = None
    shape: str = DIGITS_SHAPE
    input_name: str = "pixels"
    duration_scale: float = 1.0

    @property
    def key(self) -> str:
        load = f"c{self.concurrency}" if self.concurrency is not None else f"r{self.rate:g}"
        return f"{self.server}/{self.protocol}/{self.model}/{load}"


def configs(servers: set[str], quick: bool, image_input: str) -> list[Config]:
    cs: list[Config] = []
    levels = [1, 64] if quick else [1, 16, 64]
    for server in ("floor", "mlserver", "quorum"):
        if server in servers:
            cs += [Config("digits", server, "digits_mlp_a", concurrency=c) for c in levels]
    if "quorum" in servers:
        cs += [Config("digits", "quorum", "digits", concurrency=c) for c in levels]
        cs += [Config("digits", "quorum", "digits_mlp_a", protocol="quorum", concurrency=64),
               Config("digits", "quorum", "digits", protocol="quorum", concurrency=64)]
    if "quorum-native" in servers:
        # The same server on pygrpc-native (--grpc-engine native): the targets name
        # both engines.
        cs += [Config("digits", "quorum-native", model, concurrency=c)
               for model in ("digits_mlp_a", "digits") for c in levels]
    for server in ("quorum", "quorum-native"):  # TF Serving's Predict, as its users send it
        if server in servers:
            cs.append(Config("digits", server, "digits_mlp_a", protocol="tfserving", concurrency=64))
    if not quick:
        # Open loop: Poisson arrivals, latency charged from the scheduled arrival.
        for server, rates in (("floor", (1000, 3000)), ("mlserver", (500, 1000)),
                              ("quorum", (500, 1000, 1500))):
            if server in servers:
                cs += [Config("digits", server, "digits_mlp_a", rate=r) for r in rates]
    image = dict(shape=IMAGE_SHAPE, input_name=image_input, duration_scale=2.0)
    if "floor" in servers:
        cs += [Config("mobilenet", "floor", "mobilenets", concurrency=c, **image) for c in (1, 8)]
    if "quorum-mobilenet" in servers:
        cs += [Config("mobilenet", "quorum-mobilenet", "mobilenets", concurrency=c, **image)
               for c in (1, 8)]
        if not quick:
            cs += [Config("mobilenet", "quorum-mobilenet", MOBILENETS[0], concurrency=8, **image)]
    return cs


def run_load(cfg: Config, server: Server, duration: float, warmup: float, out: Path,
             round_no: int) -> dict:
    path = out / "runs" / f"{cfg.key.replace('/', '_')}_{round_no}.json"
    argv = [PY, str(BENCH / "loadgen.py"), "--target", f"localhost:{server.port}",
            "--protocol", cfg.protocol, "--model", cfg.model, "--shape", cfg.shape,
            "--input-name", cfg.input_name, "--duration", str(duration * cfg.duration_scale),
            "--warmup", str(warmup), "--server-pid", str(server.proc.pid), "--json", str(path),
            "--label", server.name]
    argv += (["--concurrency", str(cfg.concurrency)] if cfg.concurrency is not None
             else ["--rate", str(cfg.rate)])
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  {cfg.key}: loadgen failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return {"failed": done.stderr[-2000:]}
    print("  " + done.stderr.strip().splitlines()[-1], flush=True)
    return json.loads(path.read_text())


def run_ceiling(models: list[Path], batches: str, duration: float, provider: str = "cpu") -> list[dict]:
    argv = [PY, str(BENCH / "ceiling.py"), "--batch", batches, "--duration", str(duration),
            "--provider", provider]
    for m in models:
        argv += ["--model", str(m)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True)
    for line in done.stderr.strip().splitlines()[-len(batches.split(",")):]:
        print("  " + line, flush=True)
    return json.loads(done.stdout)


def median_result(runs: list[dict]) -> dict:
    """Per-metric medians over the rounds (for two rounds, their mean)."""
    ok = [r for r in runs if "failed" not in r]
    if not ok:
        return runs[0]
    med = dict(ok[0])
    for k in ("throughput_rps", "rows_per_s", "client_cpu_cores", "server_cpu_cores",
              "client_cpu_us_per_req", "server_cpu_us_per_req"):
        values = [r[k] for r in ok if r.get(k) is not None]
        med[k] = statistics.median(values) if values else None
    med["latency_ms"] = {k: statistics.median(r["latency_ms"][k] for r in ok)
                         for k in ok[0]["latency_ms"]}
    errors: dict[str, int] = {}
    for r in ok:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    med["errors"] = errors
    med["runs"] = len(ok)
    med["throughput_each"] = [round(r["throughput_rps"], 1) for r in ok]
    return med


def median_ceiling(rounds: list[list[dict]]) -> list[dict]:
    """Per batch size, the median rows/s over the rounds (and each round's figure)."""
    return [dict(rounds[0][i], rows_per_s=statistics.median(r[i]["rows_per_s"] for r in rounds),
                 each=[round(r[i]["rows_per_s"], 1) for r in rounds])
            for i in range(len(rounds[0]))] if rounds else []


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) / 2**20
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1),
            "python": platform.python_version(), "kernel": platform.release(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--runs", type=int, default=2, help="rounds; figures are medians")
    p.add_argument("--out", type=Path, default=BENCH / "results")
    p.add_argument("--quick", action="store_true", help="fewer configurations (smoke test)")
    p.add_argument("--skip", action="append", default=[],
                   help="server to leave out: floor, mlserver, quorum, quorum-native, quorum-mobilenet")
    p.add_argument("--quorum-env", action="append", default=[],
                   help="KEY=VALUE for the Quorum servers, e.g. QUORUM_MONITORING=false")
    args = p.parse_args(argv)
    out: Path = args.out
    (out / "runs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    if "quorum-mobilenet" not in args.skip and not (MOBILENET_REPO / "mobilenets" / "ensemble.yaml").is_file():
        print("building the MobileNetV2 repository (bench/make_mobilenet.py)", flush=True)
        subprocess.run([PY, str(BENCH / "make_mobilenet.py")], cwd=ROOT, check=True)
    if "mlserver" not in args.skip and not MLSERVER.exists():
        print(f"note: {MLSERVER} missing (run bench/setup_mlserver.sh); MLServer skipped", flush=True)
        args.skip.append("mlserver")
    quorum_env = dict(kv.split("=", 1) for kv in args.quorum_env)

    serve = [PY, "-m", "service.cli", "serve", "--device", "cpu", "--poll-interval", "0"]
    servers: dict[str, Server] = {}

    def add(server: Server) -> None:
        if server.name not in args.skip:
            servers[server.name] = server

    port = free_port()
    add(Server("floor", [PY, str(BENCH / "floor_server.py"), "--port", str(port)], port))
    port = free_port()
    add(Server("mlserver", [str(MLSERVER), "start", str(BENCH / "mlserver_runtime")], port,
               env={"MLSERVER_GRPC_PORT": str(port), "MLSERVER_HTTP_PORT": str(free_port()),
                    "MLSERVER_METRICS_PORT": str(free_port())}))
    port = free_port()
    add(Server("quorum", serve + ["--model-repository", str(ROOT / "models"), "--grpc-port", str(port),
                                  "--metrics-port", str(free_port()), "--http-port", "0"], port, env=quorum_env))
    port = free_port()
    add(Server("quorum-native", serve + ["--model-repository", str(ROOT / "models"), "--grpc-port", str(port),
                                         "--metrics-port", str(free_port()), "--http-port", "0",
                                         "--grpc-engine", "native"], port, env=quorum_env))
    port = free_port()
    image_input = mobilenet_input_name() if "quorum-mobilenet" not in args.skip else "input"
    add(Server("quorum-mobilenet", serve + ["--model-repository", str(MOBILENET_REPO), "--grpc-port", str(port),
                                            "--metrics-port", str(free_port()), "--http-port", "0"], port,
               # One intra-op thread per member: the three members then run side by side on
               # the two cores instead of six ONNX Runtime threads fighting over them.
               env={"QUORUM_INTRA_OP_THREADS": "1", **quorum_env},
               ready_model="mobilenets", ready_shape=IMAGE_SHAPE, ready_input=image_input))

    cfgs = configs(set(servers), args.quick, image_input)
    runs: dict[str, list[dict]] = {c.key: [] for c in cfgs}
    ceilings: dict[str, list[list[dict]]] = {"digits_mlp_a": [], "mobilenets": []}
    try:
        start_all(servers, out)
        for round_no in range(args.runs):
            print(f"round {round_no + 1}/{args.runs}", flush=True)
            for cfg in cfgs:
                runs[cfg.key].append(run_load(cfg, servers[cfg.server], args.duration, args.warmup,
                                              out, round_no))
            ceilings["digits_mlp_a"].append(run_ceiling([ROOT / "models" / "digits_mlp_a" / "1"],
                                                        "1,64", min(args.duration, 2.0)))
            if (MOBILENET_REPO / MOBILENETS[0]).is_dir():
                ceilings["mobilenets"].append(run_ceiling(
                    [MOBILENET_REPO / m / "1" for m in MOBILENETS], "1,8", args.duration))
    finally:
        for s in servers.values():
            s.stop()

    results = [dict(median_result(runs[c.key]), group=c.group, server=c.server, key=c.key) for c in cfgs]
    ceiling = {name: median_ceiling(rounds) for name, rounds in ceilings.items()}
    report = {"machine": machine(), "command": " ".join(["python", "bench/run_suite.py", *(argv or sys.argv[1:])]),
              "duration_s": args.duration, "rounds": args.runs, "quorum_env": quorum_env,
              "results": results, "ceiling": ceiling, "ratios": ratios(results, ceiling),
              "wall_s": round(time.monotonic() - started, 1)}
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    from report import markdown, plot  # bench/report.py

    (out / "results.md").write_text(markdown(report))
    plot(report, out / "latency_throughput.png")
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, latency_throughput.png in {report['wall_s']:.0f} s")
    return 0


def _find(results: list[dict], key: str) -> dict | None:
    return next((r for r in results if r["key"] == key and "failed" not in r), None)


def ratios(results: list[dict], ceiling: dict) -> list[dict]:
    """The issue's targets, each as measured / reference (for a bound, reference / measured)."""
    out = []
    floor = {c: _find(results, f"floor/v2/digits_mlp_a/c{c}") for c in (1, 64)}
    mls64 = _find(results, "mlserver/v2/digits_mlp_a/c64")
    for server, engine, single_want in (("quorum", "grpcio", 0.8), ("quorum-native", "native", 1.0)):
        single = {c: _find(results, f"{server}/v2/digits_mlp_a/c{c}") for c in (1, 64)}
        ens64 = _find(results, f"{server}/v2/digits/c64")
        if floor[64] and single[64]:
            out.append({"target": f"single member (digits_mlp_a), {engine}, c=64 / floor", "want": single_want,
                        "ratio": single[64]["throughput_rps"] / floor[64]["throughput_rps"]})
        if floor[1] and single[1]:
            out.append({"target": f"single member, {engine}, c=1 / floor", "want": 0.8,
                        "ratio": single[1]["throughput_rps"] / floor[1]["throughput_rps"]})
        if floor[64] and ens64:
            out.append({"target": f"5-member digits ensemble, {engine}, c=64 / floor", "want": 0.6,
                        "ratio": ens64["throughput_rps"] / floor[64]["throughput_rps"]})
            out.append({"target": f"ensemble, {engine}, 3 x floor's p99 / its p99 (c=64)", "want": 1.0,
                        "ratio": 3 * floor[64]["latency_ms"]["p99"] / ens64["latency_ms"]["p99"],
                        "note": f"p99 {ens64['latency_ms']['p99']:.1f} ms vs floor {floor[64]['latency_ms']['p99']:.1f} ms"})
        for what, r, budget in (("ensemble", ens64, 300), ("single member", single[64], 150)):
            if r and r.get("server_cpu_us_per_req"):
                out.append({"target": f"{what}, {engine}, {budget} µs / server CPU per request (c=64)", "want": 1.0,
                            "ratio": budget / r["server_cpu_us_per_req"],
                            "note": f"{r['server_cpu_us_per_req']:.0f} µs per request"})
        if mls64 and single[64]:
            out.append({"target": f"Quorum {engine} / MLServer throughput, c=64 (p99 must be <=)", "want": 3.0,
                        "ratio": single[64]["throughput_rps"] / mls64["throughput_rps"],
                        "note": f"p99 {single[64]['latency_ms']['p99']:.1f} ms vs {mls64['latency_ms']['p99']:.1f} ms",
                        "p99_ok": single[64]["latency_ms"]["p99"] <= mls64["latency_ms"]["p99"]})
    mob = [r for r in results if r["key"].startswith("quorum-mobilenet/v2/mobilenets/")]
    if mob and ceiling.get("mobilenets"):
        best = max(mob, key=lambda r: r["rows_per_s"])
        top = max(ceiling["mobilenets"], key=lambda c: c["rows_per_s"])
        out.append({"target": "MobileNetV2 ensemble rows/s / in-process ceiling", "want": 0.9,
                    "ratio": best["rows_per_s"] / top["rows_per_s"],
                    "note": f"{best['key']} {best['rows_per_s']:.1f} rows/s vs ceiling batch "
                            f"{top['batch']} {top['rows_per_s']:.1f} rows/s"})
    for r in out:
        r["met"] = r["ratio"] >= r["want"] and r.get("p99_ok", True)
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    sys.exit(main())
