"""Throwaway PKI for the TLS tests, made with the `openssl` command line: a CA, a server
certificate for localhost / 127.0.0.1 (subjectAltName) and client certificates."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes]:
        """(private key, certificate chain) as grpc.ssl_channel_credentials takes them."""
        return self.key.read_bytes(), self.cert.read_bytes()


@dataclass(frozen=True)
class Pki:
    ca: Pair
    server: Pair
    client: Pair
    stranger: Pair
    """A client certificate signed by another CA: mTLS must refuse it."""


def make_ca(folder: Path, name: str) -> Pair:
    _openssl("req", "-x509", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    return Pair(folder / f"{name}.pem", folder / f"{name}.key")


def issue(folder: Path, ca: Pair, name: str, *, server: bool) -> Pair:
    extensions = folder / f"{name}.ext"
    extensions.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n" if server
        else "extendedKeyUsage=clientAuth\n")
    _openssl("req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca.cert), "-CAkey", str(ca.key),
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", str(extensions), cwd=folder)
    return Pair(folder / f"{name}.pem", folder / f"{name}.key")


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca = make_ca(folder, "quorum-test-ca")
    other = make_ca(folder, "other-ca")
    return Pki(ca=ca, server=issue(folder, ca, "localhost", server=True),
               client=issue(folder, ca, "client", server=False),
               stranger=issue(folder, other, "stranger", server=False))
