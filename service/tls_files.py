"""The server's TLS files, checked when the settings are parsed, before any port is bound:
each problem is one ValueError naming the setting (and its QUORUM_* variable) and the path,
rather than a traceback or gRPC's "failed to bind" once the server is half started.

The pair is loaded with Python's `ssl` as the HTTP front loads it (gRPC reads the same PEM
bytes): a swapped pair, a key of another certificate, an encrypted key or a file that holds
no PEM block of the right kind are each named.
"""

from __future__ import annotations

import ssl
from pathlib import Path

_CERTIFICATE = "-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = "PRIVATE KEY-----"  # BEGIN PRIVATE KEY, BEGIN EC/RSA PRIVATE KEY, ENCRYPTED PRIVATE KEY


class _Encrypted(Exception):
    """The key asked for a passphrase (OpenSSL would otherwise prompt on the terminal)."""


def _no_passphrase() -> bytes:
    raise _Encrypted


def _where(setting: str, path: Path) -> str:
    return f"{setting} {str(path)!r} (QUORUM_{setting.upper()})"


def _pem(setting: str, path: Path) -> str:
    """The file's text, or ValueError: missing, unreadable, a folder, empty."""
    where = _where(setting, path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ValueError(f"{where} is a folder, not a PEM file") from None
    except OSError as exc:
        raise ValueError(f"{where} cannot be read: {exc.strerror or exc}") from None
    if not data.strip():
        raise ValueError(f"{where} is empty")
    return data.decode("ascii", errors="replace")


def check_tls_files(cert: Path, key: Path, client_ca: Path | None) -> None:
    """ValueError naming the first setting whose file is not what it must be."""
    cert_text, key_text = _pem("tls_cert", cert), _pem("tls_key", key)
    cert_holds_key = _PRIVATE_KEY in cert_text and _CERTIFICATE not in cert_text
    if cert_holds_key and _CERTIFICATE in key_text:
        raise ValueError(f"{_where('tls_cert', cert)} holds a private key and {_where('tls_key', key)} "
                         "a certificate: the two are swapped")
    if cert_holds_key:
        raise ValueError(f"{_where('tls_cert', cert)} holds a private key, not a certificate")
    if _CERTIFICATE not in cert_text:
        raise ValueError(f"{_where('tls_cert', cert)} holds no PEM certificate ({_CERTIFICATE})")
    if _PRIVATE_KEY not in key_text:
        what = "a certificate, not a private key" if _CERTIFICATE in key_text else "no PEM private key"
        raise ValueError(f"{_where('tls_key', key)} holds {what}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _Encrypted:
        raise ValueError(f"{_where('tls_key', key)} is encrypted with a passphrase: give the key "
                         "unencrypted (e.g. from a mounted Secret)") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"{_where('tls_key', key)} is not the private key of the certificate in "
                             f"{_where('tls_cert', cert)}") from None
        raise ValueError(f"{_where('tls_cert', cert)} and {_where('tls_key', key)} cannot be loaded as a "
                         f"certificate chain and its key: {exc.reason or exc}") from None
    except OSError as exc:  # the file changed between the reads above and this one
        raise ValueError(f"tls_cert or tls_key cannot be read: {exc.strerror or exc}") from None
    if client_ca is None:
        return
    if _CERTIFICATE not in _pem("tls_client_ca", client_ca):
        raise ValueError(f"{_where('tls_client_ca', client_ca)} holds no PEM certificate ({_CERTIFICATE})")
    try:
        context.load_verify_locations(cafile=client_ca)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise ValueError(f"{_where('tls_client_ca', client_ca)} cannot be loaded as a CA bundle: {reason}") from None
