"""Carry the Python wheels a GPU host lacks to it in parts that each fit one device call: download, pack, check, unpack.

    python scripts/gpu_carry.py download /tmp/gpu-wheels            # here: PyPI, cp312 manylinux x86-64
    python scripts/gpu_carry.py pack /tmp/gpu-wheels .gpu-carry --part-mib 60
    python3 scripts/gpu_carry.py check .gpu-carry --upto 2           # there, after the 2nd call
    python3 scripts/gpu_carry.py unpack .gpu-carry /tmp/site         # there, in the last call

`pack` puts the wheels into one tar, compresses it with xz -9e, and splits it into the fewest
parts of at most --part-mib, as equal as possible: `OUT_DIR/partNN/wheels.tar.xz.partNN`, each
folder with a copy of `SHA256SUMS` (every part's checksum and the whole archive's). One folder
travels per device call (`carry: [.gpu-carry/partNN]`); a warm machine keeps the folders of the
earlier calls (docs/performance.md, "Carrying onnxruntime-gpu to the GPU host", has the sequence).
`unpack` verifies every part, reassembles and verifies the archive, and installs the wheels with
`pip install --no-index --no-deps --target`; a missing or corrupt part ends it with one line
naming the part. Wheels of packages the host already has (protobuf, grpcio, ...) travel as
"conditional": installed only where the host's own version is older than Quorum needs.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import lzma
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
ARCHIVE = "wheels.tar.xz"
SUMS = "SHA256SUMS"
MANIFEST = "carry.json"  # inside the tar: which wheels are conditional, and on what
MIB = 1024 * 1024
CALL_LIMIT = 64 * MIB  # what one device call carries: the working tree plus the carried paths

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


def version_key(version: str) -> tuple:
    """Orders release versions (and their pre-releases) without `packaging`."""
    try:
        from packaging.version import Version

        return (Version(version),)
    except Exception:  # no packaging, or a version it cannot parse
        numbers = [int(n) for n in re.findall(r"\d+", version.split("+")[0])[:4]]
        return tuple(numbers)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def human(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


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


# --- pack ---------------------------------------------------------------------------------------

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


def travelling_tree_bytes() -> int | None:
    """What the working tree sends with every call (tracked and untracked-not-ignored files),
    when this is a git checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total = 0
    for name in listed.split(b"\0"):
        if name:
            path = ROOT / os.fsdecode(name)
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


def compress(tar_path: Path, out: Path, threads: int) -> None:
    if threads > 1 and shutil.which("xz"):
        with tar_path.open("rb") as src, out.open("wb") as dst:
            subprocess.run(["xz", "-9e", f"-T{threads}", "-c"], stdin=src, stdout=dst, check=True)
        return
    compressor = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                     preset=9 | lzma.PRESET_EXTREME)
    with tar_path.open("rb") as src, out.open("wb") as dst:
        for block in iter(lambda: src.read(4 * MIB), b""):
            dst.write(compressor.compress(block))
        dst.write(compressor.flush())


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def store_wheel(wheel: Path, out: Path) -> None:
    """The same wheel with its members stored, not deflated: xz then sees the bytes themselves
    (libonnxruntime_providers_cuda.so: 284 MB -> 185.5 MB with xz -9e, where its deflated copy
    hardly shrinks). The members, their order, names, modes and contents (so RECORD) are kept;
    reading each one checks its CRC."""
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as dst:
        for info in src.infolist():
            copy = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            copy.external_attr, copy.compress_type = info.external_attr, zipfile.ZIP_STORED
            with src.open(info) as data, dst.open(copy, "w", force_zip64=info.file_size > 2**31) as sink:
                shutil.copyfileobj(data, sink, 4 * MIB)


def pack(src: Path, out: Path, part_mib: float, threads: int, conditional: list[str]) -> list[Path]:
    wheels = sorted(src.glob("*.whl"))
    if not wheels:
        die(f"no *.whl in {src}")
    names = [wheel_name_version(p.name)[0] for p in wheels]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        die(f"{src} holds two versions of {', '.join(twice)}: keep one of each")
    limit = int(part_mib * MIB)
    if limit < 1:
        die("--part-mib must be positive")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # earlier parts of this folder: a new archive replaces them all
        if re.fullmatch(r"part\d{2,}", old.name) and old.is_dir():
            shutil.rmtree(old)
        elif old.name in (SUMS, ARCHIVE) or old.name.startswith(f".{ARCHIVE}"):
            old.unlink()
    manifest = {"conditional": conditional_minimums(names, conditional),
                "wheels": [p.name for p in wheels]}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=out, prefix=f".{ARCHIVE}.") as tmp:
        tar_path, whole = Path(tmp) / "wheels.tar", Path(tmp) / ARCHIVE
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
            def add(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))

            add(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
            for p in wheels:
                stored = Path(tmp) / p.name
                store_wheel(p, stored)
                info = tarfile.TarInfo(p.name)
                info.size, info.mode, info.mtime = stored.stat().st_size, 0o644, 0
                with stored.open("rb") as f:
                    tar.addfile(info, f)
                stored.unlink()
        raw = tar_path.stat().st_size
        compress(tar_path, whole, threads)
        seconds = time.monotonic() - started
        size = whole.stat().st_size
        count = max(1, math.ceil(size / limit))
        each = math.ceil(size / count)  # the fewest parts, as equal as possible
        lines, parts = [], []
        with whole.open("rb") as f:
            for i in range(1, count + 1):
                name = f"{ARCHIVE}.part{i:02d}"
                folder = out / f"part{i:02d}"
                folder.mkdir()
                data = f.read(each)
                (folder / name).write_bytes(data)
                lines.append(f"{hashlib.sha256(data).hexdigest()}  {name}")
                parts.append(folder / name)
        lines.append(f"{sha256(whole)}  {ARCHIVE}")
    sums = "\n".join(lines) + "\n"
    for part in parts:
        (part.parent / SUMS).write_text(sums)
    print(f"{len(wheels)} wheels, {human(sum(p.stat().st_size for p in wheels))} "
          f"(tar {human(raw)}) -> {ARCHIVE} {human(size)} with xz -9e "
          f"({'xz -T%d' % threads if threads > 1 and shutil.which('xz') else 'python lzma, 1 thread'}) "
          f"in {seconds:.0f} s")
    print(f"{count} part(s) of at most {part_mib:g} MiB:")
    tree = travelling_tree_bytes()
    for part in parts:
        sent = part.stat().st_size + (tree or 0)
        note = f"; with the working tree ({human(tree)}) {human(sent)} of 64 MiB" if tree is not None else ""
        print(f"  {_shown(part)}  {part.stat().st_size} bytes ({human(part.stat().st_size)}){note}")
        if tree is not None and sent > CALL_LIMIT:
            print(f"  warning: {part.name} and the working tree exceed one call's 64 MiB: pack again with a "
                  "smaller --part-mib", file=sys.stderr)
    print(f"total {size} bytes ({human(size)}); {SUMS} in every part's folder")
    return parts


# --- check and unpack ---------------------------------------------------------------------------

def read_sums(parts_dir: Path) -> tuple[list[tuple[str, str]], str]:
    """([(part name, sha256)], whole archive's sha256) from the SHA256SUMS beside the parts
    (each folder holds a copy; all must agree)."""
    copies = sorted(parts_dir.rglob(SUMS))
    if not copies:
        die(f"no {SUMS} under {parts_dir}: no part has arrived")
    texts = {c.read_text() for c in copies}
    if len(texts) > 1:
        die(f"the {SUMS} copies under {parts_dir} disagree (parts of two different packs?): "
            + ", ".join(str(c) for c in copies))
    parts, whole = [], None
    for line in texts.pop().splitlines():
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        if name == ARCHIVE:
            whole = digest
        else:
            parts.append((name, digest))
    if whole is None or not parts:
        die(f"{copies[0]} lists no parts or no whole archive")
    return parts, whole


def find_part(parts_dir: Path, name: str) -> Path | None:
    found = sorted(parts_dir.rglob(name))
    return found[0] if found else None


def verify_parts(parts_dir: Path, upto: int | None = None) -> list[Path]:
    """Each listed part (or the first `upto`) present and matching its checksum, in order."""
    parts, _ = read_sums(parts_dir)
    if upto is not None:
        parts = parts[:upto]
    paths = []
    for name, digest in parts:
        path = find_part(parts_dir, name)
        if path is None:
            die(f"missing part {name} (not under {parts_dir}; was the machine fresh, the earlier calls' "
                "parts gone?)")
        got = sha256(path)
        if got != digest:
            die(f"corrupt part {name} ({path}): sha256 {got[:16]}..., expected {digest[:16]}...")
        paths.append(path)
    return paths


def check(parts_dir: Path, upto: int | None) -> None:
    parts, _ = read_sums(parts_dir)
    paths = verify_parts(parts_dir, upto)
    for p in paths:
        print(f"{p.name}: ok ({p.stat().st_size} bytes, {p.parent})")
    rest = [name for name, _ in parts[len(paths):]]
    to_come = f"; still to come: {', '.join(rest)}" if rest else ""
    print(f"{len(paths)} of {len(parts)} parts here and intact{to_come}")


def installed_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unpack(parts_dir: Path, target: Path, dry_run: bool = False) -> list[str]:
    paths = verify_parts(parts_dir)
    _, whole_digest = read_sums(parts_dir)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-carry-") as tmp:
        whole = Path(tmp) / ARCHIVE
        digest = hashlib.sha256()
        with whole.open("wb") as dst:
            for p in paths:
                with p.open("rb") as src:
                    for block in iter(lambda: src.read(4 * MIB), b""):
                        digest.update(block)
                        dst.write(block)
        if digest.hexdigest() != whole_digest:
            die(f"the reassembled {ARCHIVE} does not match its checksum in {SUMS} (parts of two packs?)")
        wheels_dir = Path(tmp) / "wheels"
        wheels_dir.mkdir()
        with tarfile.open(whole, "r:xz") as tar:
            members = tar.getmembers()
            for m in members:
                if not m.isfile() or "/" in m.name or m.name.startswith("."):
                    die(f"unexpected entry in {ARCHIVE}: {m.name}")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(wheels_dir, members=members, filter="data")
            else:
                tar.extractall(wheels_dir, members=members)
        whole.unlink()
        manifest = json.loads((wheels_dir / MANIFEST).read_text()) if (wheels_dir / MANIFEST).is_file() else {}
        rules: dict[str, str] = manifest.get("conditional", {})
        install, notes = [], []
        for wheel in sorted(wheels_dir.glob("*.whl")):
            name, version = wheel_name_version(wheel.name)
            minimum = rules.get(name)
            if minimum is not None:
                have = installed_version(name)
                if have is not None and version_key(have) >= version_key(minimum):
                    notes.append(f"kept the host's {name} {have} (>= {minimum}; carried {version} not installed)")
                    continue
                notes.append(f"installing {name} {version}: the host has {have or 'none'}, Quorum needs >= {minimum}")
            install.append(wheel)
        print(f"{len(paths)} parts verified and reassembled; {len(install)} wheels to install into {target} "
              f"({time.monotonic() - started:.0f} s)")
        for note in notes:
            print(f"  {note}")
        if not dry_run and install:
            target.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                       "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(target),
                       *map(str, install)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                die(f"pip install into {target} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        print(f"installed into {target} in {time.monotonic() - started:.0f} s: "
              + ", ".join(wheel_name_version(w.name)[0] for w in install))
        return [w.name for w in install]


# --- command line -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("download", help="pip download the wheels the GPU host lacks (cp312 manylinux x86-64)")
    p.add_argument("dest", type=Path)
    p.add_argument("--tensorflow-from", type=Path, default=None,
                   help="site-packages folder or wheel of TensorFlow 2.21.0 for quorum-tf-protos "
                        "(default: the TensorFlow installed here)")
    p = sub.add_parser("pack", help="tar + xz -9e + split into parts with SHA256SUMS")
    p.add_argument("src_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--part-mib", type=float, default=60.0, help="largest part, MiB (default 60; a float)")
    p.add_argument("--threads", type=int, default=1,
                   help="xz threads: 1 (default) compresses with python's lzma (one block, the best ratio); "
                        "more runs the xz binary with -T")
    p.add_argument("--conditional", action="append", default=[], metavar="NAME>=VERSION",
                   help="install this carried wheel only where the host's NAME is older (beside the built-in ones)")
    p = sub.add_parser("check", help="verify the parts that have arrived (all, or the first --upto)")
    p.add_argument("parts_dir", type=Path)
    p.add_argument("--upto", type=int, default=None, help="require parts 1..N to be here and intact")
    p = sub.add_parser("unpack", help="verify, reassemble, verify, extract and pip install --target")
    p.add_argument("parts_dir", type=Path)
    p.add_argument("target", type=Path)
    p.add_argument("--dry-run", action="store_true", help="verify and decide, install nothing")
    sub.add_parser("list", help="the wheels carried, and why")
    args = parser.parse_args(argv)
    if args.command == "download":
        download(args.dest, args.tensorflow_from)
    elif args.command == "pack":
        pack(args.src_dir, args.out_dir, args.part_mib, args.threads, args.conditional)
    elif args.command == "check":
        check(args.parts_dir, args.upto)
    elif args.command == "unpack":
        unpack(args.parts_dir, args.target, args.dry_run)
    else:
        for w in [*WHEELS, TF_PROTOS]:
            condition = f" (only where the host's is older than {w.minimum})" if w.minimum else ""
            print(f"{w.name}=={w.version}{condition}: {w.why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
