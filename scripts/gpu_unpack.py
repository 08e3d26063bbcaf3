"""Verify the carried parts and install the wheels on the GPU host: check, unpack (standard library only).

The host side of scripts/gpu_carry.py (which packs the parts here and is the command line there):
`check` verifies the parts that have arrived against `SHA256SUMS`; `unpack` verifies every
part, reassembles and verifies the archive, and installs its wheels with `pip install
--no-index --no-deps --target`, each "conditional" one only where the host's own version is
older than the carry manifest's minimum. A missing or corrupt part ends either with one line
naming the part. The GPU host's python3 runs this with the standard library alone
(`packaging`, where present, only orders versions).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# scripts/ is sys.path[0] when gpu_carry.py runs as a script (here, and `python3 scripts/gpu_carry.py` there)
from gpu_wheels import MIB, die, wheel_name_version

ARCHIVE = "wheels.tar.xz"
SUMS = "SHA256SUMS"
MANIFEST = "carry.json"  # inside the tar: which wheels are conditional, and on what


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
