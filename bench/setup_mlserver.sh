#!/usr/bin/env bash
# Creates bench/.venv-mlserver: MLServer 1.7.1 in its own virtualenv (its protobuf pins
# conflict with Quorum's). uvloop<0.22: MLServer's parallel workers crash under uvloop 0.23.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV=.venv-mlserver
if [ -x "$VENV/bin/mlserver" ] && [ -f "$VENV/.installed" ]; then
  exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "mlserver==1.7.1" "uvloop<0.22" "onnxruntime==1.31.1" "numpy==2.4.6"
touch "$VENV/.installed"
