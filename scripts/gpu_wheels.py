"""Which wheels a GPU host lacks, and how to fetch or build them: the list, pip download, quorum-tf-protos.

`WHEELS` names every wheel that scripts/gpu_carry.py carries to the GPU host, at the version
Quorum needs, and why (how the list was derived is the comment above it). A "conditional" one
(`minimum`) is for a package the host has: installed there only where the host's version is
older. `download` fetches them from PyPI for cp312 manylinux x86-64 and builds
`quorum-tf-protos` (TensorFlow's *_pb2 files that tensorflow-serving-api imports) from a
TensorFlow here. Standard library only: gpu_carry.py and gpu_unpack.py import this on the GPU host too.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

MIB = 1024 * 1024
# What `pip download` asks for: CPython 3.12 (the GPU host's python3) on manylinux x86-64.
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
# Tried for one wheel only when PLATFORMS find none (pip matches manylinux_2_N exactly). The GPU
# host's python3 is Ubuntu 24.04's 3.12.3 (glibc 2.39), so any of these runs there.
MORE_PLATFORMS = ["manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64",
                  "manylinux_2_34_x86_64", "manylinux_2_35_x86_64"]


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    why: str
    minimum: str | None = None
    """Conditional: the host has this package; install the carried wheel only where the
    host's version is older than `minimum` (None: the host lacks it, always install)."""


# How this list was derived (2026-12-07):
# - What an ONNX-only `quorum serve` imports: `python -X importtime -m service.cli serve` on a
#   repository of the ONNX digits variants and their ensemble, with --grpc-engine native,
#   --event-loop uvloop, --log-format json and --otlp-endpoint set (every optional import on),
#   and requests answered; each imported top-level module mapped to its distribution
#   (importlib.metadata.packages_distributions). grpc_tools (grpc._runtime_protos tries it,
#   optional) and brotli (aiohttp, optional) are imported only where present: not carried.
#   TensorFlow is not imported, but tensorflow_serving.apis is (service/server.py, service/api/
#   tfserving.py), and its *_pb2 import `tensorflow.core.*_pb2`: those files travel alone as
#   the wheel `quorum-tf-protos` (TF_PROTOS below; service/tf_protos.py loads them without
#   tensorflow/__init__).
# - What the GPU tests and bench/gpu_suite.py import beyond the server: tests/e2e/conftest.py
#   imports tritonclient.grpc (test_user_paths' placement test); pyproject's asyncio_mode=auto
#   needs pytest-asyncio (tests/repository/test_placement.py has async tests); bench/ needs
#   nothing more (grpc, numpy, onnxruntime, tensorflow_serving protos).
# - Each distribution checked against the GPU host's package list (/work/.library/device/
#   KINDS.md, "Python packages already there"): only those it lacks are carried, at the versions
#   pyproject.toml pins (its dependencies and its `gpu` and `test` extras), or, for those it
#   does not pin, the versions the project's .venv resolved and tests with. Their Requires-Dist
#   checked the same way (with --no-deps nothing else comes).
# - The host has protobuf, grpcio, typing-extensions and pytest, of versions nobody recorded:
#   the project's generated code (service/_proto, grpcio-health-checking 1.85.1) refuses a
#   protobuf runtime older than its gencode (7.35) and a grpcio older than 1.85.1; pydantic-core
#   2.50.5 requires typing-extensions>=4.16.0; pytest-asyncio 1.5.0 pytest>=8.4. They travel as
#   conditional wheels (`minimum`): installed only where the host's own version is older, so the
#   host keeps one version of each otherwise.
# - Not carried, though pyproject names them: tensorflow (SavedModels only; 600 MB), tf2onnx,
#   skl2onnx, scikit-learn (export; the host has scikit-learn), onnx, numpy, scipy, aiohttp,
#   prometheus-client, PyYAML, uvloop, requests, nvidia-ml-py (the host has them all).
WHEELS = [
    Wheel("onnxruntime-gpu", "1.31.1", "pyproject's gpu extra: ONNX Runtime with CUDAExecutionProvider (CUDA 13, "
          "cuDNN 9); shadows the host's CPU onnxruntime 1.30 (same `onnxruntime` module, first on PYTHONPATH)"),
    Wheel("pydantic", "2.14.4", "service/settings.py, service/repository/ (configs and manifests)"),
    Wheel("pydantic-core", "2.50.5", "pydantic 2.14.4 requires pydantic-core==2.50.5"),
    Wheel("pydantic-settings", "2.16.3", "service/settings.py (QUORUM_* environment)"),
    Wheel("python-dotenv", "1.2.4", "pydantic-settings requires it (imported by pydantic_settings)"),
    Wheel("typing-inspection", "0.4.5", "pydantic and pydantic-settings require it"),
    Wheel("annotated-types", "0.8.0", "pydantic requires it"),
    Wheel("grpcio-health-checking", "1.85.1", "grpc.health.v1 (service/server.py, service/api/health.py)"),
    Wheel("grpcio-reflection", "1.85.1", "server reflection (service/api/reflection.py)"),
    Wheel("pygrpc-native", "0.5.0", "--grpc-engine native (service/api/engine.py; gpu_suite's quorum-native)"),
    Wheel("tensorflow-serving-api", "2.21.0", "TF Serving's protos (service/api/tfserving.py, server.py, "
          "bench/loadgen.py); its wheel is pure Python, and without TensorFlow it imports only with TF_PROTOS"),
    Wheel("opentelemetry-api", "1.45.2", "service/monitoring/tracing.py"),
    Wheel("opentelemetry-sdk", "1.45.2", "service/monitoring/tracing.py"),
    Wheel("opentelemetry-semantic-conventions", "0.66b2", "opentelemetry-sdk requires it"),
    Wheel("opentelemetry-exporter-otlp-proto-grpc", "1.45.2", "--otlp-endpoint (service/monitoring/tracing.py)"),
    Wheel("opentelemetry-exporter-otlp-proto-common", "1.45.2", "the OTLP exporter requires it"),
    Wheel("opentelemetry-exporter-otlp-common", "0.66b2", "the OTLP exporter requires it"),
    Wheel("opentelemetry-proto", "1.45.2", "the OTLP exporter requires it"),
    Wheel("googleapis-common-protos", "1.76.0", "the OTLP exporter imports google.rpc.error_details_pb2"),
    Wheel("python-json-logger", "4.0.0", "--log-format json (service/logs.py)"),
    Wheel("tritonclient", "2.73.0", "tests/e2e/conftest.py and test_user_paths.py (the GPU placement test)"),
    Wheel("python-rapidjson", "1.25", "tritonclient requires it"),
    Wheel("pytest-asyncio", "1.5.0", "the async tests (pyproject: asyncio_mode = auto), test_placement.py's too"),
    # Conditional: the host has these, of unrecorded versions.
    Wheel("protobuf", "7.36.2", "gencode 7.35 in service/_proto and grpcio-health-checking/-reflection 1.85.1",
          minimum="7.35.1"),
    Wheel("grpcio", "1.85.1", "the generated *_pb2_grpc.py (service/_proto, grpc_health) refuse an older grpcio",
          minimum="1.85.1"),
    Wheel("typing-extensions", "4.16.0", "pydantic 2.14.4 and pydantic-core 2.50.5 require >=4.16.0",
          minimum="4.16.0"),
    Wheel("pytest", "9.2.0", "pytest-asyncio 1.5.0 requires pytest>=8.4", minimum="8.4"),
]

# TensorFlow's own *_pb2 files that tensorflow_serving's import, without TensorFlow (a wheel of
# 600 MB the GPU host cannot be sent): built here from an installed TensorFlow, or a TF wheel.
TF_PROTOS = Wheel("quorum-tf-protos", "2.21.0", "tensorflow.core.*_pb2 that tensorflow-serving-api 2.21.0 imports, "
                  "taken from TensorFlow 2.21.0 (service/tf_protos.py imports them without TensorFlow)")
TF_STUB_INIT = '''"""Only TensorFlow's protocol buffers (quorum-tf-protos, scripts/gpu_carry.py): TensorFlow
itself is not installed here. service/tf_protos.py imports these *_pb2 modules without it."""


def __getattr__(name):
    raise AttributeError(f"module 'tensorflow' has no attribute '{name}': this 'tensorflow' holds only "
                         "TensorFlow's protos (quorum-tf-protos); TensorFlow itself is not installed")
'''


def die(message: str) -> NoReturn:
    """One clear line, exit status 1."""
    print(f"gpu_carry: {message}", file=sys.stderr)
    raise SystemExit(1)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(filename: str) -> tuple[str, str]:
    """(normalized distribution name, version) from a wheel's file name."""
    parts = Path(filename).name[:-len(".whl")].split("-")
    if len(parts) < 5 or not filename.endswith(".whl"):
        raise ValueError(f"not a wheel file name: {filename}")
    return normalize(parts[0]), parts[1]


def human(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


def conditional_minimums(names: list[str], extra: list[str]) -> dict[str, str]:
    """{normalized name: minimum} for the carried wheels that are conditional (WHEELS, plus
    --conditional NAME>=VERSION)."""
    rules = {normalize(w.name): w.minimum for w in WHEELS if w.minimum}
    for item in extra:
        name, sep, minimum = item.partition(">=")
        if not sep or not name or not minimum:
            die(f"--conditional wants NAME>=VERSION, got '{item}'")
        rules[normalize(name)] = minimum
    return {n: m for n, m in rules.items() if n in names}


# --- download ---------------------------------------------------------------------------------

def pip_download(wheel: Wheel, dest: Path) -> Path:
    """One wheel, no dependencies, for cp312 manylinux x86-64; the file it saved."""
    def run(platforms: list[str]) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--implementation", "cp", "--disable-pip-version-check",
                   *[arg for p in platforms for arg in ("--platform", p)], "-d", str(dest),
                   f"{wheel.name}=={wheel.version}"]
        return subprocess.run(command, capture_output=True, text=True)

    done = run(PLATFORMS)
    if done.returncode != 0:
        done = run(PLATFORMS + MORE_PLATFORMS)
        if done.returncode != 0:
            die(f"pip download {wheel.name}=={wheel.version} failed: {done.stderr.strip().splitlines()[-1:]}")
        print(f"  {wheel.name}: needed one of {' '.join(MORE_PLATFORMS)}", flush=True)
    found = [p for p in dest.glob("*.whl") if wheel_name_version(p.name) == (normalize(wheel.name), wheel.version)]
    if len(found) != 1:
        die(f"{wheel.name}=={wheel.version}: expected one wheel in {dest}, found {[p.name for p in found]}")
    return found[0]


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def write_wheel(dest: Path, name: str, version: str, files: dict[str, bytes], summary: str) -> Path:
    """A pure-Python wheel (py3-none-any) holding `files` (path in the wheel: content)."""
    dist = re.sub(r"[-.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    files = dict(files)
    files[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                 f"Summary: {summary}\n").encode()
    files[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: scripts/gpu_carry.py\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n")
    tops = sorted({p.split("/")[0] for p in files if not p.startswith(info)})
    files[f"{info}/top_level.txt"] = ("\n".join(tops) + "\n").encode()
    record = [_record_line(p, data) for p, data in sorted(files.items())] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = dest / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(files):
            info_ = zipfile.ZipInfo(p, date_time=(2020, 1, 1, 0, 0, 0))
            info_.external_attr = 0o644 << 16
            info_.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info_, files[p])
    return path


_TF_IMPORT = re.compile(r"^\s*(?:from\s+(tensorflow(?:\.\w+)*)\s+import\s+(\w+)|import\s+(tensorflow(?:\.\w+)+))", re.M)


class _Tree:
    """Files of a site-packages folder or of a wheel, by path ('tensorflow/core/...py')."""

    def __init__(self, where: Path) -> None:
        self.zip = zipfile.ZipFile(where) if where.is_file() else None
        self.root = where

    def read(self, path: str) -> bytes | None:
        if self.zip is not None:
            try:
                return self.zip.read(path)
            except KeyError:
                return None
        file = self.root / path
        return file.read_bytes() if file.is_file() else None

    def python_files(self, top: str) -> list[str]:
        if self.zip is not None:
            return [n for n in self.zip.namelist() if n.startswith(top + "/") and n.endswith(".py")]
        return [p.relative_to(self.root).as_posix() for p in (self.root / top).rglob("*.py")]


def tf_protos_files(serving: _Tree, tensorflow: _Tree) -> dict[str, bytes]:
    """Every tensorflow.* module that tensorflow_serving's files import, transitively, and the
    package __init__ files above them (empty; the top one a stub saying what it is)."""
    wanted: dict[str, bytes] = {}
    queue = [serving.read(p) or b"" for p in serving.python_files("tensorflow_serving")]
    while queue:
        text = queue.pop().decode("utf-8", "replace")
        for package, name, plain in _TF_IMPORT.findall(text):
            candidates = [f"{package}.{name}", package] if package else [plain]
            for module in candidates:
                path = module.replace(".", "/") + ".py"
                if path in wanted:
                    break
                data = tensorflow.read(path)
                if data is not None:
                    wanted[path] = data
                    queue.append(data)
                    break
            else:
                if package and tensorflow.read(package.replace(".", "/") + "/__init__.py") is None:
                    die(f"tensorflow_serving imports {package or plain}, not found in the TensorFlow given")
    if not wanted:
        die("found no tensorflow.* module that tensorflow_serving imports: wrong TensorFlow or serving wheel?")
    for path in list(wanted):
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            init = "/".join(parts[:depth]) + "/__init__.py"
            wanted.setdefault(init, TF_STUB_INIT.encode() if depth == 1 else b"")
    return wanted


def build_tf_protos(dest: Path, serving_wheel: Path, tensorflow_from: Path | None) -> Path:
    """quorum-tf-protos from the tensorflow-serving-api wheel and TensorFlow 2.21.0 (installed
    here, or the site-packages folder or TF wheel given)."""
    if tensorflow_from is None:
        import importlib.metadata
        import importlib.util

        spec = importlib.util.find_spec("tensorflow")  # finds it without running tensorflow/__init__
        if spec is None or not spec.submodule_search_locations:
            die("TensorFlow is not installed here: pass --tensorflow-from (a site-packages folder holding "
                f"tensorflow {TF_PROTOS.version}, or its wheel) to build {TF_PROTOS.name}")
        found = importlib.metadata.version("tensorflow")
        if found != TF_PROTOS.version:
            die(f"TensorFlow here is {found}, tensorflow-serving-api {TF_PROTOS.version} needs its protos: "
                "pass --tensorflow-from")
        tensorflow_from = Path(list(spec.submodule_search_locations)[0]).parent
    files = tf_protos_files(_Tree(serving_wheel), _Tree(tensorflow_from))
    return write_wheel(dest, TF_PROTOS.name, TF_PROTOS.version, files, TF_PROTOS.why)


def download(dest: Path, tensorflow_from: Path | None) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    saved = []
    for wheel in WHEELS:
        path = pip_download(wheel, dest)
        print(f"{path.name:90s} {human(path.stat().st_size):>10s}", flush=True)
        saved.append(path)
    serving = next(p for p in saved if wheel_name_version(p.name)[0] == "tensorflow-serving-api")
    tf = build_tf_protos(dest, serving, tensorflow_from)
    print(f"{tf.name:90s} {human(tf.stat().st_size):>10s} (built here)", flush=True)
    saved.append(tf)
    names = [wheel_name_version(p.name)[0] for p in dest.glob("*.whl")]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        die(f"{dest} holds two versions of {', '.join(twice)}: keep one of each (two stop the whole install)")
    total = sum(p.stat().st_size for p in saved)
    print(f"{len(saved)} wheels, {human(total)} in {dest}")
    return saved
