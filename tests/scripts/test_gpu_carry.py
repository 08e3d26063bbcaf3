"""scripts/gpu_carry.py end to end, without network: tiny wheels packed into several parts,
reassembled, verified and installed into a temporary target, then imported from it; a corrupt
and a missing part each stop `unpack` with a line naming the part."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_carry.py"
PART_MIB = 0.01  # 10 KiB parts: the ~45 KiB archive below travels in several
NOISE = random.Random(41).randbytes(40_000)  # incompressible, so xz leaves several parts


def _wheel(where: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A pure-Python wheel written by hand: files, METADATA, WHEEL and a RECORD of them."""
    info = f"{name}-{version}.dist-info"
    files = {**files,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    files[f"{info}/RECORD"] = ("\n".join(record + [f"{info}/RECORD,,"]) + "\n").encode()
    wheel = where / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


def _carry(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """Four tiny wheels packed into 10 KiB parts: carry_a (with 40 kB of noise), carry_b, carry_c
    (conditional, the host lacks it: installed) and a `pytest` 0.0.1 (conditional, the host's
    pytest is newer: not installed)."""
    tmp = tmp_path_factory.mktemp("carry")
    wheels = tmp / "wheels"
    wheels.mkdir()
    _wheel(wheels, "carry_a", "1.0", {"carry_a/__init__.py": b"VALUE = 'a'\n", "carry_a/noise.bin": NOISE})
    _wheel(wheels, "carry_b", "2.0", {"carry_b.py": b"VALUE = 'b'\n"})
    _wheel(wheels, "carry_c", "3.0", {"carry_c/__init__.py": b"VALUE = 'c'\n"})
    _wheel(wheels, "pytest", "0.0.1", {"pytest/__init__.py": b"raise ImportError('the carried stand-in')\n"})
    done = _carry("pack", wheels, tmp / "parts", "--part-mib", PART_MIB,
                  "--conditional", "carry_c>=3.0", "--conditional", "pytest>=0.0.1", cwd=tmp)
    assert done.returncode == 0, done.stderr
    assert "part(s) of at most 0.01 MiB" in done.stdout
    return tmp / "parts"


def _parts(parts: Path) -> list[Path]:
    return sorted(parts.glob("part*/wheels.tar.xz.part*"))


def test_pack_splits_into_small_parts_each_with_the_checksums(packed):
    parts = _parts(packed)
    assert len(parts) >= 4
    assert [p.name for p in parts] == [f"wheels.tar.xz.part{i:02d}" for i in range(1, len(parts) + 1)]
    assert all(p.parent.name == f"part{i:02d}" for i, p in enumerate(parts, 1))  # one folder per call
    assert all(p.stat().st_size <= PART_MIB * 1024 * 1024 for p in parts)
    sums = {(p.parent / "SHA256SUMS").read_text() for p in parts}
    assert len(sums) == 1  # every folder holds the same list
    listed = {name: digest for digest, name in (line.split("  ") for line in sums.pop().splitlines())}
    for p in parts:
        assert listed[p.name] == hashlib.sha256(p.read_bytes()).hexdigest()
    whole = b"".join(p.read_bytes() for p in parts)
    assert listed["wheels.tar.xz"] == hashlib.sha256(whole).hexdigest()


def test_unpack_installs_the_wheels_where_they_import(packed, tmp_path):
    target = tmp_path / "site"
    done = _carry("unpack", packed, target, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "parts verified and reassembled" in done.stdout
    assert "kept the host's pytest" in done.stdout  # conditional, and the host's is newer
    assert "installing carry-c 3.0" in done.stdout  # conditional, and the host lacks it
    assert not (target / "pytest").exists()
    probe = ("import carry_a, carry_b, carry_c, pathlib; "
             "print(carry_a.VALUE + carry_b.VALUE + carry_c.VALUE, carry_a.__file__); "
             "print(pathlib.Path(carry_a.__file__).with_name('noise.bin').read_bytes().hex())")
    env = {**os.environ, "PYTHONPATH": str(target)}
    imported = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)
    assert imported.returncode == 0, imported.stderr
    first, noise = imported.stdout.splitlines()
    assert first.startswith("abc ") and str(target) in first
    assert bytes.fromhex(noise) == NOISE


def test_a_corrupt_part_is_named_and_nothing_is_installed(packed, tmp_path):
    parts = tmp_path / "parts"
    shutil.copytree(packed, parts)
    second = _parts(parts)[1]
    data = bytearray(second.read_bytes())
    data[len(data) // 2] ^= 0xFF
    second.write_bytes(bytes(data))
    done = _carry("unpack", parts, tmp_path / "site", cwd=tmp_path)
    assert done.returncode != 0
    assert "corrupt part wheels.tar.xz.part02" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # one clear line
    assert not (tmp_path / "site").exists()


def test_a_missing_part_is_named_and_check_tells_what_has_arrived(packed, tmp_path):
    parts = tmp_path / "parts"
    shutil.copytree(packed, parts)
    shutil.rmtree(parts / "part03")  # the call that carried it went to a fresh machine
    done = _carry("unpack", parts, tmp_path / "site", cwd=tmp_path)
    assert done.returncode != 0
    assert "missing part wheels.tar.xz.part03" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "site").exists()
    so_far = _carry("check", parts, "--upto", 2, cwd=tmp_path)  # after the second call: fine
    assert so_far.returncode == 0, so_far.stderr
    assert "2 of" in so_far.stdout and "still to come: wheels.tar.xz.part03" in so_far.stdout
    everything = _carry("check", parts, cwd=tmp_path)
    assert everything.returncode != 0 and "missing part wheels.tar.xz.part03" in everything.stderr


def test_pack_refuses_two_versions_of_one_package(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "carry_a", "1.0", {"carry_a.py": b""})
    _wheel(wheels, "carry_a", "1.1", {"carry_a.py": b""})
    done = _carry("pack", wheels, tmp_path / "parts", cwd=tmp_path)
    assert done.returncode != 0 and "two versions of carry-a" in done.stderr
