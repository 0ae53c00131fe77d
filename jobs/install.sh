#!/usr/bin/env bash
# Installs masklet and everything it needs into .venv (Python 3.11). torch/torchvision are pinned to the
# CUDA build these machines hold on disk (it runs on CPU too); sam2 is built without its CUDA extension
# (SAM2_BUILD_CUDA=0) and without build isolation, so its build does not fetch torch a second time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install -q --no-build-isolation -e '.[test]'
.venv/bin/python -m pip install -q --no-deps vos-benchmark==0.1.0  # evaluate's test oracle (pyproject.toml says why --no-deps)
echo "installed: $(.venv/bin/masklet --version 2>/dev/null || echo masklet)"
