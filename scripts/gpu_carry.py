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
"conditional": installed only where the host's own version is older than Quorum needs. Which
wheels travel, and how `download` fetches and builds them: scripts/gpu_wheels.py; how `check`
and `unpack` verify and install on the host: scripts/gpu_unpack.py.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

# scripts/ is sys.path[0] when this runs as a script (here, and `python3 scripts/gpu_carry.py` there)
from gpu_unpack import ARCHIVE, MANIFEST, SUMS, check, sha256, unpack
from gpu_wheels import MIB, TF_PROTOS, WHEELS, conditional_minimums, die, download, human, wheel_name_version

ROOT = Path(__file__).resolve().parent.parent
CALL_LIMIT = 64 * MIB  # what one device call carries: the working tree plus the carried paths


# --- pack ---------------------------------------------------------------------------------------

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
