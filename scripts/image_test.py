"""`make image-test`: the server from the built image's root filesystem, called from outside.

    .venv/bin/python scripts/image_test.py [IMAGE]      # as root; default localhost/quorum:<version>

`podman run` cannot start containers everywhere (here crun may not set RLIMIT_NOFILE), so
the image is run the way a runtime would, from its own config: `podman image mount` gives
its root filesystem, which a private mount namespace binds read-only (plus /proc, a few
/dev nodes and a tmpfs on /tmp, as Kubernetes' emptyDir); the image's ENTRYPOINT runs there
with the image's Env, WorkingDir and User (UID 10001), on the host's network. Then, with
clients from this checkout's venv: gRPC health (readiness, liveness), tritonclient (server
live and ready, the bundled ensemble and one member per runtime on the digits test split,
scored against scikit-learn's labels), /metrics, the image's HEALTHCHECK command run inside
the image, and a write to the root filesystem that must fail. SIGTERM must end the server
with status 0. Prints the image size.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SERVING = health_pb2.HealthCheckResponse.SERVING
MIN_ACCURACY = 0.9  # every checked model scores >= 94% on this split (models/README.md)
# Run as PID 1 would: a private mount namespace, the image root read-only, then the entrypoint.
LAUNCH = r"""
set -eu
mount --bind "$IMAGE_ROOT" "$ROOTFS"
mount -o remount,bind,ro "$ROOTFS"
mount -t proc proc "$ROOTFS/proc"
mount -t tmpfs -o mode=755,size=1m tmpfs "$ROOTFS/dev"
for node in null zero full random urandom; do
  touch "$ROOTFS/dev/$node"; mount --bind "/dev/$node" "$ROOTFS/dev/$node"
done
mkdir "$ROOTFS/dev/shm"; mount -t tmpfs -o mode=1777,size=64m tmpfs "$ROOTFS/dev/shm"
mount -t tmpfs -o mode=1777,size=1g tmpfs "$ROOTFS/tmp"
exec chroot --userspec="$RUN_AS" "$ROOTFS" "$@"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def podman(*args: str) -> str:
    return subprocess.run(["podman", *args], check=True, capture_output=True, text=True).stdout.strip()


def wait_ready(address: str, process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            sys.exit(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if health(address, "") == SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(1)
    sys.exit(f"not SERVING after {timeout} s:\n{log.read_text()[-4000:]}")


def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status


def in_image(pid: int, user: str, *command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A command in the server's mount namespace and root, as `user` (a HEALTHCHECK does this)."""
    uid, gid = user.split(":")
    prefix = ["nsenter", "--target", str(pid), "--mount", "--root", "--wd", f"--setuid={uid}", f"--setgid={gid}"]
    return subprocess.run([*prefix, "env", "-i", *(f"{k}={v}" for k, v in (env or {}).items()), *command],
                          capture_output=True, text=True, timeout=60)


def check_models(address: str) -> dict[str, float]:
    split = json.loads((ROOT / "models" / "digits_split.json").read_text())
    digits = load_digits()
    test = np.asarray(split["test"])
    pixels, labels = digits.data[test].astype(np.float32), digits.target[test]
    client = triton.InferenceServerClient(address)
    assert client.is_server_live() and client.is_server_ready()
    scores = {}
    # the ensemble, an ONNX Runtime member and a TensorFlow SavedModel member
    for model in ("digits", "digits_cnn_a", "digits_mlp_b"):
        assert client.is_model_ready(model), model
        predicted = []
        for rows in np.array_split(pixels, -(-len(pixels) // 64)):  # the models' max batch size is 64
            tensor = triton.InferInput("pixels", list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows)
            answer = client.infer(model, [tensor], outputs=[triton.InferRequestedOutput("class_index")])
            predicted.append(answer.as_numpy("class_index").reshape(-1))
        scores[model] = float(np.mean(np.concatenate(predicted) == labels))
        assert scores[model] >= MIN_ACCURACY, (model, scores[model])
    client.close()
    return scores


def main(image: str) -> None:
    # the Docker-format config: podman's own inspect leaves out the HEALTHCHECK
    inspect = subprocess.run(["buildah", "inspect", "--type", "image", image], check=True, capture_output=True, text=True)
    config = json.loads(inspect.stdout)["Docker"]["config"]
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image))
    user = config["User"]
    assert user.split(":")[0] not in ("", "0", "root"), f"image runs as {user!r}"
    env = dict(e.split("=", 1) for e in config["Env"])
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    env |= {"QUORUM_GRPC_PORT": str(grpc_port), "QUORUM_METRICS_PORT": str(metrics_port),
            "QUORUM_HTTP_PORT": str(http_port), "HOME": "/tmp"}
    command = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    healthcheck = (config.get("Healthcheck") or {}).get("Test") or []
    assert healthcheck[:1] == ["CMD"], f"no HEALTHCHECK in the image config (built with --format docker?): {healthcheck}"

    image_root = podman("image", "mount", image)
    work = Path(tempfile.mkdtemp(prefix="quorum-image-test-"))
    (work / "root").mkdir()
    log = work / "server.log"
    launch_env = {"PATH": os.environ["PATH"], "IMAGE_ROOT": image_root, "ROOTFS": str(work / "root"),
                  "RUN_AS": user}
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", LAUNCH, "launch",
            "env", "-i", "-C", config.get("WorkingDir") or "/", *(f"{k}={v}" for k, v in env.items()), *command]
    address = f"127.0.0.1:{grpc_port}"
    started = time.monotonic()
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, env=launch_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(address, process, log)
        print(f"image_test: SERVING after {time.monotonic() - started:.0f} s", flush=True)
        status = Path(f"/proc/{process.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [user.split(":")[0]] * 4, uid_line
        try:
            liveness = health(address, "liveness")
            assert liveness == SERVING, liveness
            print("image_test: health liveness SERVING")
        except grpc.RpcError as e:  # the liveness service comes with the operability work
            assert e.code() == grpc.StatusCode.NOT_FOUND, e
            print("image_test: this server has no `liveness` health service yet (NOT_FOUND)")
        scores = check_models(address)
        print("image_test: accuracy on the test split " + ", ".join(f"{m} {s:.3f}" for m, s in scores.items()))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert "quorum_requests_total" in metrics
        probe = in_image(process.pid, user, *healthcheck[1:], env=env)
        assert probe.returncode == 0, probe
        write = in_image(process.pid, user, "sh", "-c", "touch /opt/quorum/models/x", env=env)
        assert write.returncode != 0 and "Read-only file system" in write.stderr, write
        print("image_test: HEALTHCHECK passes; the root filesystem is read-only")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, log.read_text()[-4000:]
        assert health_down(address)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        podman("image", "unmount", image)
        for path in sorted(work.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        work.rmdir()
    print(f"image_test: passed; {image} is {size / 1e6:.0f} MB")


def health_down(address: str) -> bool:
    try:
        health(address, "")
    except grpc.RpcError as e:
        return e.code() == grpc.StatusCode.UNAVAILABLE
    return False


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else f"localhost/quorum:{VERSION}")
