#!/usr/bin/env bash
# One-time set-up of a fresh machine: .venv, torch + torchvision, the project, Fashion-MNIST.
# Idempotent: a finished step is skipped. Used by `make demo` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_PINS=${TORCH_PINS:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_PINS (a few minutes)"
  "$VENV/bin/pip" install --quiet $TORCH_PINS
fi
stamp="$VENV/.specialists-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing the project (pip install -e .[dev])"
  "$VENV/bin/pip" install --quiet -e ".[dev]"
  touch "$stamp"
fi
bash scripts/ensure-fashion-mnist.sh
