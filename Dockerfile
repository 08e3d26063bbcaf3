# syntax=docker/dockerfile:1.7
#
# Quorum serving image. Two targets (`make image` / `make image-gpu` build them with podman,
# from a local base where no registry is reachable: scripts/image_build.sh):
#   docker build -t quorum:0.1.0-gpu .                 # default (last stage): CUDA 13 + cuDNN 9, onnxruntime-gpu
#   docker build -t quorum:0.1.0 --target cpu .        # CPU only, python:3.11-slim
# Both: non-root UID 10001, the bundled models/ at /opt/quorum/models, gRPC :8500
# (with grpc.health.v1.Health), HTTP :8501, Prometheus /metrics :8502. docs/deploy.md has
# the details, including how TensorFlow and ONNX Runtime share the GPU image.

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------
# CPU builder: the package (default install: onnxruntime CPU) into /opt/venv.
FROM ${PYTHON_IMAGE} AS cpu-builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# binutils: `strip` for scripts/image_slim.sh
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies alone first: this layer (TensorFlow, the slow one) is rebuilt only when
# pyproject.toml changes, and pip's cache survives between builds in a cache mount.
COPY pyproject.toml scripts/image_requirements.py ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python image_requirements.py < pyproject.toml > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
# Then the protos (grpcio-tools is installed now) and the package, whose wheel carries
# the generated service/_proto; then everything serving does not need goes. Only what the
# package is made of is copied, so a change to models/ or the health check reuses this.
COPY README.md ./
COPY protos protos
COPY scripts/gen_protos.py scripts/image_slim.sh scripts/
COPY service service
RUN --mount=type=cache,target=/root/.cache/pip \
    python scripts/gen_protos.py \
    && pip install --no-deps . \
    && scripts/image_slim.sh /opt/venv \
    && python -c "import service._proto, service.cli, onnxruntime, tensorflow"

# ---------------------------------------------------------------------------------------
# CPU runtime.
FROM ${PYTHON_IMAGE} AS cpu
ARG APP_UID=10001
RUN groupadd --system --gid ${APP_UID} quorum \
    && useradd --system --uid ${APP_UID} --gid quorum --home-dir /home/quorum --create-home quorum
COPY --from=cpu-builder /opt/venv /opt/venv
COPY --chown=root:root models /opt/quorum/models
COPY --chown=root:root scripts/healthcheck.py /opt/quorum/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    QUORUM_MODEL_REPOSITORY=/opt/quorum/models \
    QUORUM_DEVICE=cpu
WORKDIR /home/quorum
USER 10001:10001
EXPOSE 8500 8501 8502
# gRPC health "" (readiness): SERVING once every model is loaded, NOT_SERVING while
# draining; speaks TLS when QUORUM_TLS_CERT is set (scripts/healthcheck.py).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/quorum/healthcheck.py"]
ENTRYPOINT ["quorum", "serve"]

# ---------------------------------------------------------------------------------------
# GPU builder: same package on Python 3.11 (deadsnakes; Ubuntu 24.04 ships 3.12; skipped
# when the base already has python3.11, as a local stand-in base does), with onnxruntime-gpu
# instead of onnxruntime: both install the `onnxruntime` module, so the CPU wheel is never
# installed (scripts/image_requirements.py --gpu).
FROM ${CUDA_IMAGE} AS gpu-builder
ARG DEBIAN_FRONTEND=noninteractive
# 1: also install TensorFlow's own CUDA 12 wheels (tensorflow[and-cuda]); see docs/deploy.md.
ARG TF_AND_CUDA=0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN command -v python3.11 >/dev/null || { \
      apt-get update \
      && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
      && add-apt-repository -y ppa:deadsnakes/ppa \
      && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
      && rm -rf /var/lib/apt/lists/*; }
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml scripts/image_requirements.py ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python image_requirements.py --gpu < pyproject.toml > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && if [ "${TF_AND_CUDA}" = "1" ]; then \
         tf=$(pip show tensorflow | sed -n 's/^Version: //p'); pip install "tensorflow[and-cuda]==${tf}"; \
       fi
COPY README.md ./
COPY protos protos
COPY scripts/gen_protos.py scripts/image_slim.sh scripts/
COPY service service
RUN --mount=type=cache,target=/root/.cache/pip \
    python scripts/gen_protos.py \
    && pip install --no-deps . \
    && scripts/image_slim.sh /opt/venv \
    && python -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers(), o.get_available_providers()" \
    && python -c "import service._proto, service.cli, tensorflow"

# ---------------------------------------------------------------------------------------
# GPU runtime (default target).
FROM ${CUDA_IMAGE} AS gpu
ARG DEBIAN_FRONTEND=noninteractive
ARG APP_UID=10001
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN { command -v python3.11 >/dev/null || { \
      apt-get update \
      && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
      && add-apt-repository -y ppa:deadsnakes/ppa \
      && apt-get install -y --no-install-recommends python3.11 \
      && apt-get purge -y --auto-remove software-properties-common gpg-agent \
      && rm -rf /var/lib/apt/lists/*; }; } \
    && groupadd --system --gid ${APP_UID} quorum \
    && useradd --system --uid ${APP_UID} --gid quorum --home-dir /home/quorum --create-home quorum
COPY --from=gpu-builder /opt/venv /opt/venv
COPY --chown=root:root models /opt/quorum/models
COPY --chown=root:root scripts/healthcheck.py /opt/quorum/healthcheck.py
# The base image puts CUDA 13 and cuDNN 9 on the loader path (ldconfig), which is what
# onnxruntime-gpu links against. NVIDIA_* tell the container toolkit what to mount.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    QUORUM_MODEL_REPOSITORY=/opt/quorum/models \
    QUORUM_DEVICE=auto \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/quorum
USER 10001:10001
EXPOSE 8500 8501 8502
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "/opt/quorum/healthcheck.py"]
ENTRYPOINT ["quorum", "serve"]
