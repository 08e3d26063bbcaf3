"""gRPC health check of the server in this container: exit 0 when SERVING, 1 otherwise.

    python /opt/quorum/healthcheck.py [SERVICE]     # "" (readiness, default) or liveness

The image's HEALTHCHECK, and the Kubernetes exec probes of deploy/k8s/components/tls (the
kubelet's own gRPC probes speak plaintext only). Reads the server's settings from its
environment: QUORUM_GRPC_PORT; with QUORUM_TLS_CERT set it speaks TLS, checking the server
against HEALTHCHECK_CA (else QUORUM_TLS_CLIENT_CA, else the certificate itself) under the
first DNS name of the certificate, and with QUORUM_TLS_CLIENT_CA set (mutual TLS) it shows
the server's own certificate, which then needs the clientAuth usage too.
"""

import os
import ssl
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(name: str) -> bytes | None:
    path = os.environ.get(name)
    return open(path, "rb").read() if path else None


def _tls_name(cert_path: str) -> str:
    decoded = ssl._ssl._test_decode_cert(cert_path)  # the stdlib's PEM decoder (no extra package)
    names = [v for k, v in decoded.get("subjectAltName", ()) if k in ("DNS", "IP Address")]
    return names[0] if names else dict(x[0] for x in decoded["subject"])["commonName"]


def main(service: str) -> int:
    target = "127.0.0.1:" + os.environ.get("QUORUM_GRPC_PORT", "8500")
    cert = os.environ.get("QUORUM_TLS_CERT")
    if cert:
        mutual = bool(os.environ.get("QUORUM_TLS_CLIENT_CA"))
        roots = _read("HEALTHCHECK_CA") or _read("QUORUM_TLS_CLIENT_CA") or _read("QUORUM_TLS_CERT")
        credentials = grpc.ssl_channel_credentials(
            roots, _read("QUORUM_TLS_KEY") if mutual else None, _read("QUORUM_TLS_CERT") if mutual else None)
        channel = grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", _tls_name(cert))])
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=4).status
        except grpc.RpcError as e:
            print(f"health check {service!r} on {target}: {e.code().name} {e.details()}", file=sys.stderr)
            return 1
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
